"""Shared fixtures: tiny configs that compile and run in seconds on 2 CPU cores."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


# The default config shrunk: 64 MNIST5k train images, a quarter-width CNN,
# PGD-3, batch 16, 2 epochs of 4 steps, checkpoints every 3 steps.
TINY = {
    "data.max_train": 64, "data.max_test": 32, "model.kwargs": {"width": 0.25},
    "attack.steps": 3, "attack.step_size": 0.1, "attack.warmup_epochs": 0.0,
    "train.batch_size": 16, "train.epochs": 2, "train.eval_examples": 32,
    "train.eval_batch_size": 16, "train.eval_pgd_steps": 2, "train.eval_every_epochs": 1,
    "train.log_every_steps": 2, "train.checkpoint_every_steps": 3,
}


def tiny_config(**overrides):
  """:data:`TINY` applied to the default config, then ``overrides`` ('a.b': value)."""
  from jaxdef.configs.default import get_config
  c = get_config()
  for key, value in (TINY | overrides).items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def latest_checkpoint(workdir):
  """``(step, saved state dict)`` of the newest checkpoint in ``workdir``, read-only."""
  from jaxdef import checkpoint as ckpt
  manager = ckpt.checkpoint_manager(str(workdir), max_to_keep=3, async_save=False,
                                    read_only=True)
  step = manager.latest_step()
  saved = ckpt.restore_local(manager, step)
  manager.close()
  return step, saved


def primitive_count(jaxpr, *names: str) -> int:
  """Equations of the primitives ``names`` in ``jaxpr`` and every sub-jaxpr
  (a loop body counted once, however many times it runs)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in names
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += primitive_count(inner, *names)
  return count


@pytest.fixture
def tiny():
  return tiny_config


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` from the TensorBoard event files in ``folder``
  (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
  import struct
  from tensorboardX.proto import event_pb2
  found: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(folder.iterdir()):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found
