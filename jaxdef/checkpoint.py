"""Orbax checkpointing of the train state, and the run's saved config.

Saves are asynchronous (training continues while the previous step's state is
written); ``max_to_keep`` old steps are kept. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save
leaves the previous steps intact. Restoring reads into an abstract target
that carries the mesh shardings, so a run resumes on whatever devices it now
has. A checkpoint that cannot be read, or holds non-finite values, is moved
aside into ``workdir/corrupt_checkpoints/`` (never deleted) and the previous
one is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxdef.errors import CheckpointWriteError, ConfigError

CONFIG_FILE = "config.json"
CORRUPT_DIR = "corrupt_checkpoints"
CHECKPOINTS = "checkpoints"
# The checkpoint train.select keeps (best_val / best_test): one step, beside the others.
SELECTED = "selected_checkpoint"
# The key of a step's data position in its Orbax step metadata (custom_metadata).
DATA_POSITION = "data_position"


class _DropNotice(logging.Filter):
  """Drops log records whose message starts with ``prefix``."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self.prefix)


def checkpoint_manager(workdir: str, *, max_to_keep: int, async_save: bool = True,
                       read_only: bool = False, subdir: str = CHECKPOINTS
                       ) -> ocp.CheckpointManager:
  """A manager over ``workdir/subdir`` (created if missing, unless ``read_only``).

  The single item handler is declared rather than inferred: Orbax otherwise
  infers it from root metadata on disk, which a full disk can leave
  incomplete.
  """
  # A read-only manager is given the read-only values Orbax would otherwise set,
  # and warn about, itself (save_interval_steps 0, max_to_keep None).
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                         save_interval_steps=0 if read_only else 1,
                                         create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=async_save)
  quiet = _DropNotice("Given directory is read only")
  logger = logging.getLogger("absl")
  logger.addFilter(quiet)  # Orbax's notice on every read-only open, e.g. each restore()
  try:
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), subdir),
                                 options=options, item_handlers=ocp.StandardCheckpointHandler())
  finally:
    logger.removeFilter(quiet)


def _newest_step_or_none(workdir: str, subdir: str) -> Optional[int]:
  manager = checkpoint_manager(workdir, max_to_keep=1, async_save=False, read_only=True,
                               subdir=subdir)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def latest_step(workdir: str, subdir: str = CHECKPOINTS) -> int:
  """The newest checkpoint step in ``workdir/subdir``; a one-line ConfigError if
  there is none."""
  if not os.path.isdir(os.path.join(workdir, subdir)) and subdir != CHECKPOINTS:
    raise ConfigError(f"no checkpoint in {workdir!r}/{subdir}: the run selected none yet "
                      f"(train.select needs a finished per-epoch evaluation)")
  step = _newest_step_or_none(workdir, subdir)
  if step is None:
    raise ConfigError(f"no checkpoint in {workdir!r}/{subdir}; train first")
  return int(step)


def _write_error(manager: ocp.CheckpointManager, step: int, error: Exception
                 ) -> CheckpointWriteError:
  try:
    manager.reload()
    previous = manager.latest_step()
  except Exception:  # pylint: disable=broad-except  (a manager closed mid-failure)
    directory = os.fspath(manager.directory)
    previous = _newest_step_or_none(os.path.dirname(directory), os.path.basename(directory))
  kept = (f"the checkpoint at step {previous} is still usable" if previous is not None
          else "no earlier checkpoint exists")
  text = str(error)
  if "No space left on device" in text:
    reason = "No space left on device"
  else:
    reason = (text.splitlines() or [type(error).__name__])[0][:300]
  return CheckpointWriteError(f"could not write the checkpoint at step {step} "
                              f"({type(error).__name__}: {reason}); {kept}")


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         previous_step: Optional[int] = None,
         data_position: Optional[dict[str, Any]] = None) -> None:
  """Starts an (asynchronous) save of ``state`` at ``step``.

  First waits for the previous asynchronous save (``previous_step``), so that
  a failure is reported against the step whose write failed. Raises
  :class:`CheckpointWriteError` naming the last usable checkpoint.
  ``data_position`` (JSON: where the step is in the training data) is saved
  in the step's own metadata, written with it (:func:`data_position`).
  """
  if previous_step is not None:
    finish(manager, previous_step)
  extra = {} if data_position is None else {"custom_metadata": {DATA_POSITION: data_position}}
  try:
    manager.save(step, args=ocp.args.StandardSave(state), force=True, **extra)
  except Exception as e:  # Orbax re-raises background write errors here too
    raise _write_error(manager, step, e) from e


def finish(manager: ocp.CheckpointManager, step: int, *, close: bool = False) -> None:
  """Waits for pending asynchronous saves, then closes ``manager`` when ``close``;
  a failed write (also one that surfaces only on closing, e.g. a full disk
  during the last save's clean-up) raises as in :func:`save`."""
  try:
    manager.wait_until_finished()
    if close:
      manager.close()
  except Exception as e:
    raise _write_error(manager, step, e) from e


def data_position(manager: ocp.CheckpointManager, step: int) -> Optional[dict[str, Any]]:
  """The data position saved with checkpoint ``step`` (:func:`save`), or None
  for a checkpoint saved without one (e.g. before jaxdef saved it)."""
  custom = getattr(manager.metadata(step), "custom_metadata", None) or {}
  return custom.get(DATA_POSITION)


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of ``state``, the restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def restore_local(manager: ocp.CheckpointManager, step: int) -> Any:
  """Checkpoint ``step`` on this process's first device, whatever topology wrote it.

  The target comes from the checkpoint's own metadata (shapes and dtypes), so
  a run saved by 8 devices or 2 hosts reads back on one CPU.
  """
  device = jax.local_devices()[0]
  meta = manager.item_metadata(step)
  tree = getattr(meta, "tree", meta)
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                     sharding=jax.sharding.SingleDeviceSharding(device)),
      tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  return manager.restore(step, args=ocp.args.StandardRestore(target))


def all_finite(tree: Any) -> bool:
  """No NaN or infinity in any floating-point leaf."""
  return all(bool(np.all(np.isfinite(np.asarray(leaf, np.float32))))
             for leaf in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(leaf).dtype, np.floating)
             or str(getattr(leaf, "dtype", "")) == "bfloat16")


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves checkpoint ``step`` to ``<workdir>/corrupt_checkpoints/`` and returns where."""
  root = os.path.dirname(str(manager.directory))
  src = os.path.join(str(manager.directory), str(step))
  dst_dir = os.path.join(root, CORRUPT_DIR)
  os.makedirs(dst_dir, exist_ok=True)
  dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.replace(src, dst)
  manager.reload()
  return dst


def _restore_fields(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
  """Checkpoint ``step`` read into ``target``'s shapes and shardings.

  A dataclass target (the train state) is read as the fields the checkpoint
  holds; a field it lacks (written before the field existed) or saved as None
  keeps ``target``'s value, so an old checkpoint still restores and a new
  field (Free training's perturbation) starts as a fresh run's.
  """
  if not dataclasses.is_dataclass(target):
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target)))
  meta = manager.item_metadata(step)
  saved = getattr(meta, "tree", meta)
  held = {f.name: getattr(target, f.name) if saved[f.name] is not None else None
          for f in dataclasses.fields(target) if f.name in saved}
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(held)))
  return target.replace(**{k: getattr(target, k) if v is None else v
                           for k, v in restored.items()})


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   warn: Callable[[str], None] = print) -> tuple[Optional[int], Any]:
  """``(step, state)`` of the newest readable checkpoint, or ``(None, None)``.

  A checkpoint that fails to restore or holds non-finite values is reported
  through ``warn``, moved aside with :func:`set_aside`, and the previous one
  is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = _restore_fields(manager, step, target)
      if not all_finite(state):
        raise ValueError("it holds NaN or infinite values")
      return step, state
    except Exception as e:  # any unreadable checkpoint: fall back, keep the files
      reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
      moved = set_aside(manager, step)
      warn(f"warning: checkpoint at step {step} is unusable ({type(e).__name__}: {reason}); "
           f"moved to {moved}; trying the previous one")
  return None, None


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


# Fields that fix the shapes of the saved parameters: a checkpoint only fits a
# config that agrees on all of them.
RUN_IDENTITY = ("model.name", "model.kwargs", "defense.name", "defense.kwargs")
META_IDENTITY = ("num_classes", "image_shape")


def _field(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  return node.to_dict() if hasattr(node, "to_dict") else node


# Fields a resumed run may change: they decide how the run is watched, evaluated,
# checkpointed or where its data lie, not what it trains. ``train.epochs`` may
# grow (an extension); every change is recorded in metrics.jsonl.
# The data's location and how it is read (data.streamed, data.workers) do not
# change the batches (the data position saved with each checkpoint guards its
# sizes and seed).
RUNTIME_FIELDS = ("eval", "nip", "data.data_dir", "data.path", "data.extra.path",
                  "data.streamed", "data.workers", "train.log_every_steps",
                  "train.eval_every_epochs", "train.eval_examples", "train.eval_batch_size",
                  "train.eval_pgd_steps", "train.eval_pgd_step_size",
                  "train.eval_pgd_random_start", "train.eval_pgd_joint", "train.eval_pgd_loss",
                  "train.checkpoint_every_steps", "train.max_to_keep", "train.on_nonfinite",
                  "train.stop_check_every_steps", "train.cast_params_once",
                  "model.remat")
EXTENSIBLE = ("train.epochs",)


def flat_fields(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{'a.b.c': leaf}`` of a nested dict (a ConfigDict as its JSON form); lists
  and tuples are leaves, compared as lists."""
  if hasattr(tree, "to_json_best_effort"):
    tree = json.loads(tree.to_json_best_effort())
  if not isinstance(tree, dict):
    return {prefix: _norm(tree)}
  if not tree and prefix:
    return {prefix: {}}
  out: dict[str, Any] = {}
  for key, value in tree.items():
    out.update(flat_fields(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def _runtime(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RUNTIME_FIELDS)


def config_changes(saved: Any, config: Any) -> tuple[dict[str, list], dict[str, list]]:
  """``(refused, allowed)``: the fields, ``{field: [old, new]}``, where ``config``
  differs from the ``saved`` run's config.

  Allowed: :data:`RUNTIME_FIELDS` and a growing ``train.epochs``; refused:
  everything else (it changes what is trained). A field one side lacks (a run
  saved before the field existed) is not compared.
  """
  old, new = flat_fields(saved), flat_fields(config)
  refused, allowed = {}, {}
  for field in sorted(old.keys() & new.keys()):
    if old[field] == new[field]:
      continue
    grows = (field in EXTENSIBLE and isinstance(old[field], (int, float))
             and isinstance(new[field], (int, float)) and new[field] > old[field])
    (allowed if _runtime(field) or grows else refused)[field] = [old[field], new[field]]
  return refused, allowed


def config_hash(config: Any) -> str:
  """12 hex digits of SHA-256 over the fields that decide what a run trains
  (all but :data:`RUNTIME_FIELDS` and :data:`EXTENSIBLE`), sorted: equal for
  the configs one run may be resumed with."""
  fields = {k: v for k, v in flat_fields(config).items()
            if not _runtime(k) and k not in EXTENSIBLE}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_same_run(workdir: str, config: ml_collections.ConfigDict,
                   meta: dict[str, Any]) -> dict[str, list]:
  """Refuses to resume ``workdir`` with a config that would change what it trains.

  Raises a one-line :class:`ConfigError`: first for a field that fixes the
  checkpoint's shapes (:func:`check_identity`), then for every other field
  :func:`config_changes` refuses, all named. Returns the allowed changes
  (``{}`` for a new workdir), for the caller to record.
  """
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return {}
  advice = (f"train a fresh run with another --workdir, or resume {workdir!r} with the "
            f"values it was started with")
  saved, saved_meta = read_run_config(workdir)
  check_identity(saved, saved_meta, config, meta, advice=advice)
  refused, allowed = config_changes(saved, config)
  if refused:
    shown = ", ".join(f"{k} ({v[0]!r} -> {v[1]!r})" for k, v in list(refused.items())[:6])
    more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
    raise ConfigError(f"{workdir!r} holds a run trained with other values of what it trains: "
                      f"{shown}{more}; {advice}")
  return allowed


def check_identity(saved: ml_collections.ConfigDict, saved_meta: dict[str, Any],
                   config: ml_collections.ConfigDict, meta: dict[str, Any], *,
                   advice: str) -> None:
  """One-line :class:`ConfigError` naming the first of :data:`RUN_IDENTITY` (and
  the data's :data:`META_IDENTITY`) where ``config`` / ``meta`` differ from the
  saved run; ``advice`` ends the message."""
  pairs = [(f, _field(saved, f), _field(config, f)) for f in RUN_IDENTITY]
  pairs += [(f"data {f}", _norm(saved_meta.get(f)), _norm(meta.get(f))) for f in META_IDENTITY]
  for field, old, new in pairs:
    if _norm(old) != _norm(new):
      raise ConfigError(f"the run has {field}={old!r} but the config has {new!r}; {advice}")


def _norm(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return [_norm(x) for x in v]
  if isinstance(v, dict):
    return {k: _norm(x) for k, x in sorted(v.items()) if x not in ({}, None)}
  return v


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The config and data metadata saved by :func:`write_run_config`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"no trained run in {workdir!r} ({CONFIG_FILE} missing); train one with "
                      f"jaxdef train --config CONFIG --workdir {workdir}")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(saved["config"]), saved["data_meta"]
