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
