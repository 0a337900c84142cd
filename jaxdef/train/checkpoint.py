"""Orbax checkpointing of the train state, and the run's saved config.

Saves are asynchronous (training continues while the previous step's state is
written); ``max_to_keep`` old steps are kept. Restoring reads into an abstract
target that carries the mesh shardings, so a run resumes on whatever devices
it now has.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


def checkpoint_manager(workdir: str, *, max_to_keep: int,
                       async_save: bool = True) -> ocp.CheckpointManager:
  """A manager over ``workdir/checkpoints`` (created if missing)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an (asynchronous) save of ``state`` at ``step``."""
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of ``state``, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Optional[int], Any]:
  """``(step, state)`` of the newest checkpoint, or ``(None, None)`` if none."""
  step = manager.latest_step()
  if step is None:
    return None, None
  return step, manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))


def write_run_config(workdir: str, config: ml_collections.ConfigDict,
                     meta: dict[str, Any]) -> None:
  """Writes ``workdir/config.json`` (config + data metadata), atomically."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()), "data_meta": meta}, f,
              indent=2)
  os.replace(tmp, path)


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The config and data metadata saved by :func:`write_run_config`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    from jaxdef.errors import ConfigError
    raise ConfigError(f"no trained run in {workdir!r} ({CONFIG_FILE} missing); train one with "
                      f"python launch.py --config CONFIG --workdir {workdir}")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(saved["config"]), saved["data_meta"]
