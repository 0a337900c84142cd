"""Every config file loads, validates, and says how to run it."""

import glob
import importlib.util
import inspect
import os

import pytest

from jaxdef.config import validate
from jaxdef.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _variants(module):
  """The variant names a config file accepts (``VARIANTS`` or its default argument)."""
  if hasattr(module, "VARIANTS"):
    return list(module.VARIANTS)
  params = inspect.signature(module.get_config).parameters
  if not params:
    return [None]
  default = next(iter(params.values())).default
  return [None if default is inspect.Parameter.empty else default]


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
  assert "python launch.py --config configs/" in head
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
