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
    ("model.name", "resnet50", "valid: "),
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


@pytest.mark.parametrize("name", ["cifar10_resnet18_defenses", "cifar10_wrn34_defenses",
                                  "cifar10_vgg16_defenses", "svhn_resnet18_defenses"])
def test_paper_variants_are_the_authors_recipes_beside_the_common_ones(name):
  module = _load(os.path.join(ROOT, "configs", f"{name}.py"))
  common = [v for v in module.VARIANTS if not v.endswith("_paper")]
  papers = [v for v in module.VARIANTS if v.endswith("_paper")]
  assert sorted(papers) == sorted(f"{v}_paper" for v in common if v.endswith(("_cas", "_fsr")))
  for variant in papers:
    paper, plain = module.get_config(variant), module.get_config(variant[:-len("_paper")])
    assert plain.train.select == "final" and plain.eval.protocol == "none"
    assert paper.train.select == "best_test"
    assert paper.model.to_dict() == plain.model.to_dict()
    assert paper.data.to_dict() == plain.data.to_dict()
    assert paper.defense.name == plain.defense.name
    if variant.startswith("at_cas"):
      assert paper.eval.protocol == "cas" and paper.train.epochs == 200
      assert paper.train.optimizer.weight_decay == 1e-4
    if variant.startswith("trades_cas"):
      assert paper.objective.kwargs.beta == 4.0 and paper.defense.kwargs.objective_beta == 4.0
    if variant.startswith("mart_cas"):
      assert paper.objective.kwargs.beta == 5.0 and paper.train.epochs == 120
      assert tuple(paper.train.optimizer.milestones) == (75, 90, 100)
    if "_fsr" in variant:
      assert paper.eval.protocol == "fsr"
      assert tuple(paper.train.optimizer.milestones) == (74, 89)
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
