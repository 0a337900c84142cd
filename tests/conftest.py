"""Shared fixtures: tiny configs that compile and run in seconds on 2 CPU cores."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def tiny_config(**overrides):
  """The default config shrunk: 64 MNIST5k train images, PGD-3, batch 16."""
  from configs.default import get_config
  c = get_config()
  c.data.max_train = 64
  c.data.max_test = 32
  c.attack.steps = 3
  c.attack.step_size = 0.1
  c.attack.warmup_epochs = 0.0
  c.model.kwargs = {"width": 0.25}
  c.train.batch_size = 16
  c.train.epochs = 2
  c.train.eval_examples = 32
  c.train.eval_batch_size = 16
  c.train.eval_pgd_steps = 2
  c.train.eval_every_epochs = 1
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 3
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config
