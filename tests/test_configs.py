"""Every config file loads, validates, and says how to run it."""

import glob
import importlib.util
import os

import pytest

from jaxdef import shipped
from jaxdef.config import validate
from jaxdef.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not os.path.basename(p).startswith("_"))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants(module):
  """The variant names a config file accepts; [None] for a config without variants."""
  return list(shipped.variants(module)) or [None]


def test_there_are_config_files():
  assert any(p.endswith("default.py") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_loads_and_validates(path):
  module = _load(path)
  for variant in _variants(module):
    config = module.get_config() if variant is None else module.get_config(variant)
    validate(config, num_devices=1)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_starts_with_how_to_run_it(path):
  with open(path) as f:
    head = f.read(2000)
  assert head.startswith("#"), "the first comment says how to run the config"
  name = os.path.basename(path)[:-3]
  assert f"jaxdef train --config {name}" in head or f"jaxdef eval --config {name}" in head
  assert "Reaches" in head or "reaches" in head


def test_pgd_at_variants_follow_the_recipes():
  module = _load(os.path.join(ROOT, "configs", "pgd_at.py"))
  cifar = module.get_config("cifar10_wrn34_10")
  assert cifar.model.name == "wide_resnet" and cifar.model.kwargs.depth == 34
  assert cifar.attack.eps == pytest.approx(8 / 255) and cifar.attack.steps == 10
  assert cifar.train.optimizer.lr == 0.1 and tuple(cifar.train.optimizer.milestones) == (75, 90)
  svhn = module.get_config("svhn_resnet18")
  assert svhn.data.augment == "none" and svhn.train.optimizer.lr == 0.01
  assert svhn.attack.step_size == pytest.approx(1 / 255)
  with pytest.raises(ValueError, match="valid"):
    module.get_config("cifar10_resnet50")


@pytest.mark.parametrize("field,value,words", [
    ("model.name", "resnet9000", "valid: "),
    ("attack.eps", 0.0, "eps"),
    ("attack.eps", 1.5, "eps"),
    ("attack.step_size", -1.0, "step_size"),
    ("train.dtype", "float16", "bfloat16"),
    ("objective.name", "madry", "valid: "),
    ("defense.name", "magic", "valid: "),
])
def test_invalid_fields_are_reported_in_one_line(tiny, field, value, words):
  with pytest.raises(ConfigError) as err:
    validate(tiny(**{field: value}), num_devices=1)
  assert words in str(err.value) and "\n" not in str(err.value)


def test_batch_must_split_over_the_devices(tiny):
  with pytest.raises(ConfigError, match="device count"):
    validate(tiny(**{"train.batch_size": 50}), num_devices=8)


PAPER_CONFIGS = ["cifar10_resnet18_defenses", "cifar10_wrn34_defenses",
                 "cifar10_vgg16_defenses", "svhn_resnet18_defenses"]
# The authors' recipes, read from their scripts (CAS: bymavis/CAS_ICLR2021 train.py,
# train_trades_cifar10_cas.py, train_mart_cas.py, pgd_attack_cifar10_cas.py; FSR:
# wkim97/FSR train.py). "drops": the 0-based epochs whose first step runs at the lower
# rate; "start": the training attack's start; "select": (rule, PGD steps, step size,
# random start, joint, test images (0 = all)) of the checkpoint kept. CIFAR-10 values;
# SVHN keeps its own step 1/255 (and lr 0.01).
CAS_SELECT_TRADES_MART = ("best_test", 20, 0.003, True, True, 0)
AUTHORS = {
    "at_cas": dict(drops=(74, 89), epochs=200, weight_decay=1e-4, eps=8 / 255,
                   step=2 / 255, start="uniform", beta=None,
                   select=("best_test", 10, 2 / 255, False, True, 0)),
    "trades_cas": dict(drops=(74, 89, 99), epochs=100, weight_decay=5e-4, eps=0.031,
                       step=0.007, start="normal", beta=4.0, select=CAS_SELECT_TRADES_MART),
    "mart_cas": dict(drops=(74, 89, 99), epochs=120, weight_decay=2e-4, eps=0.031,
                     step=0.007, start="normal", beta=5.0, select=CAS_SELECT_TRADES_MART),
    "at_fsr": dict(drops=(74, 89), epochs=100, weight_decay=5e-4, eps=8 / 255, step=2 / 255,
                   start="uniform", beta=None, select=("final",)),
    "trades_fsr": dict(drops=(74, 89), epochs=100, weight_decay=5e-4, eps=8 / 255,
                       step=2 / 255, start="normal", beta=6.0, select=("final",)),
    "mart_fsr": dict(drops=(74, 89), epochs=100, weight_decay=2e-4, eps=8 / 255,
                     step=2 / 255, start="uniform", beta=6.0, select=("final",)),
}
# The authors' evaluations (jaxdef.config.PROTOCOLS, resolved at the threat model 8/255):
# (pgd step, pgd random start, fgsm random start, C&W steps, C&W kappa, joint columns).
AUTHORS_EVAL = {
    "cas": (0.003, True, True, 20, 0.0, "joint-fgsm,joint-pgd20,joint-cw"),
    "fsr": (0.8 / 255, False, False, 30, 50.0, "joint-pgd20,joint-pgd100"),
}


def _rate_drops(config, steps_per_epoch):
  """The 0-based epochs whose first step runs at a lower rate than the step before."""
  from jaxdef.train.state import learning_rate_schedule
  schedule = learning_rate_schedule(config.train.optimizer, 0, steps_per_epoch)
  return tuple(e for e in range(1, config.train.epochs)
               if float(schedule(e * steps_per_epoch)) < float(schedule(e * steps_per_epoch - 1)))


def _start(config):
  """The training attack's start as the step will use it (attack.init or the objective's)."""
  from jaxdef.objectives import create_objective
  own = create_objective(config.objective.name, **config.objective.kwargs.to_dict()).attack_init
  return config.attack.init or own


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_variants_are_the_authors_recipes_beside_the_common_ones(name):
  from jaxdef.config import resolve_eval_config
  from jaxdef.data import steps_per_epoch
  module = _load(os.path.join(ROOT, "configs", f"{name}.py"))
  common = [v for v in module.VARIANTS if not v.endswith("_paper")]
  papers = [v for v in module.VARIANTS if v.endswith("_paper")]
  assert sorted(papers) == sorted(f"{v}_paper" for v in common if v.endswith(("_cas", "_fsr")))
  svhn = name.startswith("svhn")
  for variant in papers:
    base = variant[:-len("_paper")]
    paper, plain, want = module.get_config(variant), module.get_config(base), AUTHORS[base]
    assert plain.train.select == "final" and plain.eval.protocol == "none"
    assert plain.model.normalize and not plain.data.keep_last_batch
    # What the paper variant keeps: the model, the data, the defense.
    assert {**paper.model.to_dict(), "normalize": True} == plain.model.to_dict()
    assert {**paper.data.to_dict(), "keep_last_batch": False} == plain.data.to_dict()
    assert paper.defense.name == plain.defense.name
    # Both codes feed [0, 1] images and keep the last partial batch: 391 steps of CIFAR-10.
    assert paper.model.normalize is False and paper.data.keep_last_batch is True
    n_train = 73257 if svhn else 50000
    per_epoch = steps_per_epoch(n_train, paper.train.batch_size, keep_last=True)
    assert per_epoch == -(-n_train // 128) and (svhn or per_epoch == 391)
    assert _rate_drops(paper, per_epoch) == want["drops"], variant
    assert paper.train.epochs == want["epochs"]
    assert paper.train.optimizer.weight_decay == want["weight_decay"]
    assert paper.train.optimizer.lr == (0.01 if svhn else 0.1)
    assert paper.attack.eps == pytest.approx(want["eps"])
    assert paper.attack.step_size == pytest.approx(1 / 255 if svhn else want["step"])
    assert _start(paper) == want["start"]
    if want["start"] == "normal":
      assert paper.attack.init_sigma == 0.001
    if want["beta"] is not None:
      assert paper.objective.kwargs.beta == want["beta"]
      if base.endswith("_cas"):
        assert paper.defense.kwargs.objective_beta == want["beta"]
    tc = paper.train
    rule = want["select"]
    assert tc.select == rule[0]
    if rule[0] == "best_test":
      step = 1 / 255 if svhn and base == "at_cas" else rule[2]
      assert (tc.eval_pgd_steps, tc.eval_pgd_random_start, tc.eval_pgd_joint,
              tc.eval_examples) == (rule[1], rule[3], rule[4], rule[5])
      assert tc.eval_pgd_step_size == pytest.approx(step)
    protocol = "cas" if base.endswith("_cas") else "fsr"
    assert paper.eval.protocol == protocol
    ev = resolve_eval_config(paper.eval, eps=paper.attack.eps, norm=paper.attack.norm)
    pgd_step, pgd_start, fgsm_start, cw_steps, kappa, joint = AUTHORS_EVAL[protocol]
    assert ev.eps == pytest.approx(8 / 255)
    assert ev.pgd_step_size == pytest.approx(pgd_step)
    assert (ev.pgd_random_start, ev.fgsm_random_start, ev.cw_steps, ev.cw_kappa) == (
        pgd_start, fgsm_start, cw_steps, kappa)
    assert ev.joint_attacks == joint and {"fgsm", "pgd20", "cw"} <= set(ev.attacks.split(","))
  with pytest.raises(ValueError, match="valid"):
    module.get_config("at_paper")


def test_aad_and_nip_paper_variants_follow_the_references():
  mnist = _load(os.path.join(ROOT, "configs", "aad_mnist.py")).get_config("paper")
  kwargs = mnist.defense.kwargs
  assert (kwargs.generator, kwargs.eps, kwargs.ball, kwargs.iterated) == (
      "stepll", 0.075, "chained", True)
  assert (kwargs.iou_select, kwargs.iou_threshold, kwargs.iou_extra) == (True, 0.595, 4)
  assert mnist.eval.protocol == "aad" and mnist.attack.eps == 0.3
  cifar = _load(os.path.join(ROOT, "configs", "aad_cifar10.py"))
  r18 = cifar.get_config("resnet18_paper")
  assert r18.model.name == "resnet18" and r18.defense.kwargs.layer == "stage3"
  assert r18.defense.kwargs.iou_select and r18.eval.protocol == "aad"
  assert not cifar.get_config("resnet18").defense.kwargs.iou_select
  for name in ("nip_mnist", "nip_cifar10_subset"):
    module = _load(os.path.join(ROOT, "configs", f"{name}.py"))
    paper, deployable = module.get_config("paper"), module.get_config()
    assert paper.eval.protocol == "nip" and deployable.eval.protocol == "none"
    assert paper.nip.to_dict() == deployable.nip.to_dict()
    assert paper.nip.oracle_signal == "probability"


@pytest.mark.parametrize("fields, data", [
    ({"data.name": "cifar10", "data.augment": "crop_flip"},
     "data.name='cifar10' trains on 32 px"),
    ({}, "data.name='mnist5k' trains on 28 px"),
    ({"data.augment": "rrc_flip", "data.image_size": 32},
     "trains on 32 px images \\(data.augment='rrc_flip'"),
])
def test_an_imagenet_model_on_small_images_is_refused_naming_both(tiny, fields, data):
  with pytest.raises(ConfigError, match=f"model.name='resnet50' is built for 224 px.*{data}") \
      as err:
    validate(tiny(**{"model.name": "resnet50", "model.kwargs": {}, **fields}), num_devices=1)
  assert "\n" not in str(err.value) and "data.image_size=224" in str(err.value)


def test_an_imagenet_model_is_accepted_once_the_images_are_resized(tiny):
  for size in (224, 128, 64):
    validate(tiny(**{"model.name": "resnet50", "model.kwargs": {}, "data.augment": "rrc_flip",
                     "data.image_size": size}), num_devices=1)


def test_data_of_unknown_size_is_checked_once_read(tiny, tmp_path):
  """An .npz of 32 px images: validate cannot know their size; prepare refuses them."""
  import numpy as np
  from jaxdef.train.loop import prepare
  rng = np.random.default_rng(0)
  path = tmp_path / "small.npz"
  np.savez(path, x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
           y_train=rng.integers(0, 10, 40), x_test=rng.integers(0, 256, (8, 32, 32, 3),
                                                                dtype=np.uint8),
           y_test=rng.integers(0, 10, 8))
  config = tiny(**{"model.name": "resnet50", "model.kwargs": {}, "data.name": "npz",
                   "data.path": str(path), "data.augment": "crop_flip"})
  validate(config, num_devices=1)
  with pytest.raises(ConfigError, match="built for 224 px inputs, but data.name='npz' trains on "
                                        "32 px images") as err:
    prepare(config)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("train.eval_pgd_loss", "kl"),
                                         ("train.label_smoothing", 1.0),
                                         ("train.label_smoothing", -0.1)])
def test_selection_loss_and_label_smoothing_mistakes_are_one_line(tiny, field, value):
  with pytest.raises(ConfigError, match=field) as err:
    validate(tiny(**{field: value}), num_devices=1)
  assert "\n" not in str(err.value)


def test_the_sota_variants_follow_train_wa_py():
  """Facts of DM-Improves-AT's train-wa.py (README command, watrain.py, trades.py)."""
  module = _load(os.path.join(ROOT, "configs", "sota.py"))
  gen = module.get_config("cifar10_wrn28_10_gen")
  assert (gen.model.name, gen.model.kwargs.depth, gen.model.kwargs.width) == (
      "dm_wide_resnet", 28, 10)
  assert gen.model.kwargs.activation == "swish" and gen.model.kwargs.bn_decay == 0.99
  assert gen.objective.name == "trades" and gen.objective.kwargs.beta == 5.0
  assert (gen.attack.steps, gen.attack.init, gen.attack.bn) == (10, "uniform", "train_no_update")
  assert gen.attack.step_size == pytest.approx(2 / 255)
  opt = gen.train.optimizer
  assert (opt.lr, opt.nesterov, opt.schedule, opt.weight_decay_on) == (
      0.2, True, "cosine", "no_norm")
  assert gen.train.batch_size == 512 and gen.train.label_smoothing == 0.1
  assert gen.data.extra_fraction == 0.7 and gen.data.val_size == 1024
  assert gen.train.ema_decay == 0.995
  # 123 epochs of 318 steps (154 real rows of the 48,976 left): 98 steps x 400 epochs.
  steps = gen.train.epochs * ((50_000 - 1024) // (512 - 358))
  assert abs(steps - 400 * 98) < 318 / 2
  assert opt.warmup_epochs == gen.train.ema_warmup_epochs == pytest.approx(0.025 * 123)
  assert (gen.train.select, gen.train.eval_pgd_steps, gen.train.eval_pgd_loss) == (
      "best_val", 40, "margin")
  plain = module.get_config("cifar10_wrn28_10")
  assert plain.data.extra_fraction == 0.0
  assert abs(plain.train.epochs * (48_976 // 512) - 400 * 98) < 95 / 2
  big = module.get_config("cifar10_wrn70_16_gen")
  assert (big.model.kwargs.depth, big.model.kwargs.width) == (70, 16)


def _one_step(config, tmp_path, side=32, **data):
  """Trains ``config`` for one step through the loop's own set-up on a tiny random
  set of ``side`` px images (80 train, 16 test; ``data`` overrides data.*), with
  one attack step, batch 20 and float32 (bfloat16 compiles slowly on CPU); the
  caller sets train.epochs."""
  import numpy as np
  from jaxdef.train import loop
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
  path = tmp_path / "data.npz"
  np.savez(path, x_train=images(80), y_train=rng.integers(0, 10, 80), x_test=images(16),
           y_test=rng.integers(0, 10, 16))
  config.data.update(name="npz", path=str(path), **data)
  config.attack.steps, config.train.eval_pgd_steps = 1, 1
  config.train.update(batch_size=20, eval_examples=16, eval_batch_size=16,
                      log_every_steps=1, dtype="float32")
  return loop.train_and_evaluate(config, str(tmp_path / "run"), stop_after_steps=1,
                                 progress=False)


def test_the_sota_recipe_takes_a_step_at_reduced_size(tmp_path):
  """The sota recipe (at WRN-10-1, with a tiny generated .npz mixed in and 16
  images held out) builds and trains a step."""
  import numpy as np
  rng = np.random.default_rng(1)
  generated = tmp_path / "gen.npz"
  np.savez(generated, image=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8),
           label=rng.integers(0, 10, 50))
  sota = _load(os.path.join(ROOT, "configs", "sota.py")).get_config("cifar10_wrn28_10_gen")
  sota.data.extra.path = str(generated)
  sota.model.kwargs = {**sota.model.kwargs.to_dict(), "depth": 10, "width": 1}
  sota.train.epochs = 1
  assert _one_step(sota, tmp_path, val_size=16) == {"stopped_at": 1}


@pytest.mark.parametrize("name,variant", [
    ("awp", "cifar10_wrn34_10_trades"), ("awp", "cifar10_preact18_at"),
    ("fast", "cifar10_preact18_fgsm_rs"), ("fast", "cifar10_preact18_n_fgsm"),
    ("fast", "cifar10_preact18_free")])
def test_the_awp_and_fast_recipes_take_a_step_at_reduced_size(tmp_path, name, variant):
  """Each AWP and fast-training recipe (its objective, attack, update rule and
  optimizer; WRN-34-10 shrunk to WRN-10-1, PreActResNet-18 as it is) trains a step,
  AWP active from the first step."""
  config = _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config(variant)
  if config.model.name == "wide_resnet":
    config.model.kwargs = {**config.model.kwargs.to_dict(), "depth": 10, "width": 1}
  if config.train.awp.gamma > 0:
    config.train.awp.warmup_epochs = 0
  # Free-m's epochs count updates: m of them read the 4 batches of the set once.
  config.train.epochs = max(config.attack.get("free_replays", 0), 1)
  assert _one_step(config, tmp_path) == {"stopped_at": 1}


@pytest.mark.parametrize("variant", ["resnet50_pgd", "resnet50_fgsm_rs"])
def test_the_imagenet_recipes_take_a_step_at_reduced_size(tmp_path, variant):
  """Each ImageNet recipe (its ResNet-50, attack, optimizer and augmentation;
  random-resized crops to 64 px of 72 px images) builds and trains a step: about
  30 s of compilation each on 2 CPU cores."""
  config = _load(os.path.join(ROOT, "configs", "imagenet.py")).get_config(variant)
  assert config.model.name == "resnet50" and config.data.augment == "rrc_flip"
  config.train.epochs = 1
  assert _one_step(config, tmp_path, side=72, image_size=64) == {"stopped_at": 1}
