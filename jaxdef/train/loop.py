"""The training loop: config -> data -> model -> jitted step on the mesh -> checkpoints.

Reads top to bottom: set-up (mesh, data, model, state), resume from the
newest usable checkpoint, the step loop with a progress bar, per-epoch
evaluation, asynchronous checkpoints, and a final summary table.

Faults: SIGTERM or SIGINT saves a checkpoint at the current step, waits for
the write and returns ``{"preempted_at": step}``; a kill at any other moment
resumes from the last complete checkpoint. A non-finite loss or gradient
never reaches the state; ``train.on_nonfinite`` either stops the run
(:class:`TrainingDiverged`, naming the step and the last good checkpoint) or
skips the batch and counts it. A failed checkpoint write stops the run with
:class:`CheckpointWriteError`, naming the checkpoint that is still usable.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxdef import data as data_lib
from jaxdef.build import DataMeta, build
from jaxdef.config import validate
from jaxdef.errors import TrainingDiverged
from jaxdef.train import checkpoint as ckpt
from jaxdef.train.mesh import batch_sharded, data_mesh, replicated
from jaxdef.train.metrics import MetricsLog, markdown_table
from jaxdef.train.state import TrainState, graft_variables, init_train_state, make_optimizer
from jaxdef.train.step import (INIT_STREAM, AttackBudget, make_eval_step, make_train_step,
                               stream_key)


def data_meta(dataset: Any) -> DataMeta:
  return DataMeta(name=dataset.name, num_classes=int(dataset.num_classes),
                  image_shape=tuple(int(s) for s in dataset.image_shape),
                  mean=tuple(float(m) for m in dataset.mean),
                  std=tuple(float(s) for s in dataset.std))


def jit_steps(config: ml_collections.ConfigDict, *, model, objective, defense, tx, mesh,
              steps_per_epoch: int) -> tuple[Any, Any]:
  """The run's ``jax.jit``-ed train and evaluation steps over ``mesh``.

  Train: ``(state, images, labels) -> (state, metrics)`` with the state
  replicated and donated and the batch sharded on ``data``. Eval:
  ``(state, images, labels, mask, step, batch) -> counts``, clean + PGD-
  ``train.eval_pgd_steps``. Both PGD loops unroll by ``attack.unroll`` (0: by
  backend, :func:`jaxdef.attacks.pgd.loop_unroll`). The loop and :mod:`jaxdef.bench` both call this,
  so the benchmark times the program that training runs.
  """
  att, tc = config.attack, config.train
  rep, shard = replicated(mesh), batch_sharded(mesh)
  budget = AttackBudget(eps=att.eps, step_size=att.step_size, steps=att.steps, norm=att.norm,
                        bn=att.bn, warmup_steps=int(att.warmup_epochs * steps_per_epoch),
                        unroll=att.unroll or None)
  train_step = jax.jit(
      make_train_step(model=model, tx=tx, objective=objective, defense=defense,
                      budget=budget, augment=config.data.augment, ema_decay=tc.ema_decay,
                      seed=config.seed, trainable=tc.get("trainable", "")),
      in_shardings=(rep, shard, shard), out_shardings=(rep, rep), donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(model=model, eps=att.eps, step_size=tc.eval_pgd_step_size,
                     steps=tc.eval_pgd_steps, norm=att.norm, use_ema=tc.ema_decay > 0,
                     seed=config.seed, unroll=att.unroll or None),
      in_shardings=(rep, shard, shard, shard, rep, rep), out_shardings=rep)
  return train_step, eval_step


def check_init_from(init_from: ml_collections.ConfigDict) -> None:
  """One-line :class:`ConfigError` for an empty ``train.init_from`` entry, before
  any work (a config file may leave it to be given on the command line, so
  :func:`jaxdef.config.validate` accepts it empty)."""
  from jaxdef.errors import ConfigError
  for subtree, source in init_from.items():
    if not source:
      raise ConfigError(f"train.init_from.{subtree} is empty: give the --workdir of a trained "
                        f"run to initialise {subtree!r} from (see the config file's first "
                        f"comment for its flag)")


def init_from_runs(state: TrainState, init_from: ml_collections.ConfigDict,
                   sharding) -> TrainState:
  """``train.init_from`` ({subtree: workdir}): a fresh run's ``subtree`` of
  parameters and BatchNorm statistics taken from the model of a trained run
  (:func:`jaxdef.api.restore_model`: its EMA weights if it kept an EMA).
  Only at the start of a run: a resumed run has its own checkpoint."""
  from jaxdef.api import restore_model
  for subtree, source in init_from.items():
    _, _, variables, _ = restore_model(source)
    state = graft_variables(state, subtree, variables)
  return jax.device_put(state, sharding)


def evaluate_state(eval_step, state: TrainState, dataset: Any, *, num_examples: int,
                   batch_size: int, sharding, step: int) -> dict[str, float]:
  """Clean and PGD accuracy (%) on the first ``num_examples`` test images."""
  n = min(num_examples, len(dataset.y_test))
  totals = {"clean": 0, "pgd": 0, "count": 0}
  batches = data_lib.eval_batches(dataset.x_test[:n], dataset.y_test[:n], batch_size, sharding)
  for i, (x, y, mask) in enumerate(batches):
    counts = jax.device_get(eval_step(state, x, y, mask, np.int32(step), np.int32(i)))
    for k in totals:
      totals[k] += int(counts[k])
  count = max(totals["count"], 1)
  return {"clean_acc": 100.0 * totals["clean"] / count,
          "pgd_acc": 100.0 * totals["pgd"] / count, "eval_examples": totals["count"]}


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, Optional[int]]]:
  """While active, SIGTERM / SIGINT set ``flag["signal"]`` instead of killing.

  The loop checks the flag after every step. Outside the main thread (where
  Python cannot install handlers) this is a no-op.
  """
  flag: dict[str, Optional[int]] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  def handler(signum, frame):
    flag["signal"] = signum
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None,
                       progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the final summary.

  ``stop_after_steps`` abandons the run after that global step without a
  final save, as a crash would (tests use it to check resumption).
  """
  with stop_requests() as stop:
    return _train(config, workdir, stop, stop_after_steps, progress)


def _train(config, workdir, stop, stop_after_steps, progress) -> dict[str, Any]:
  # ---- set-up: mesh, data, model --------------------------------------------------
  mesh = data_mesh()
  validate(config, jax.device_count())
  check_init_from(config.train.get("init_from", {}))
  dataset = data_lib.load_dataset(config.data)
  meta = data_meta(dataset)
  model, objective, defense = build(config, meta)
  tc = config.train
  steps_per_epoch = len(dataset.y_train) // tc.batch_size
  if steps_per_epoch == 0:
    from jaxdef.errors import ConfigError
    raise ConfigError(f"train.batch_size={tc.batch_size} is larger than the training set "
                      f"({len(dataset.y_train)} examples)")
  total_steps = int(tc.epochs * steps_per_epoch)
  tx = make_optimizer(tc.optimizer, total_steps, steps_per_epoch,
                      trainable=tc.get("trainable", ""))
  rep, shard = replicated(mesh), batch_sharded(mesh)

  # ---- state: fresh, or the newest checkpoint --------------------------------------
  init = jax.jit(lambda: init_train_state(model, tx, stream_key(config.seed, INIT_STREAM),
                                           image_shape=meta.image_shape), out_shardings=rep)
  ckpt.check_same_run(workdir, config, meta.to_dict())
  state = init()
  is_main = jax.process_index() == 0
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=tc.max_to_keep)
  start_step, restored = ckpt.restore_latest(
      manager, state, warn=lambda m: print(m, flush=True) if is_main else None)
  if restored is not None:
    state = restored
  elif tc.get("init_from"):
    state = init_from_runs(state, tc.init_from, rep)
  start_step = int(start_step or 0)
  if is_main:
    ckpt.write_run_config(workdir, config, meta.to_dict())
  log = MetricsLog(workdir, enabled=is_main)

  # ---- compiled steps ------------------------------------------------------------
  train_step, eval_step = jit_steps(config, model=model, objective=objective, defense=defense,
                                    tx=tx, mesh=mesh, steps_per_epoch=steps_per_epoch)

  def run_eval(step):
    res = evaluate_state(eval_step, state, dataset, num_examples=tc.eval_examples,
                         batch_size=tc.eval_batch_size, sharding=shard, step=step)
    log.write({"step": step, "epoch": step / steps_per_epoch, "split": "test", **res})
    return res

  # ---- the loop ---------------------------------------------------------------------
  bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True)
  t_window, n_window, images_per_s = time.perf_counter(), 0, float("nan")
  last_eval: dict[str, float] = {}
  t_start = time.perf_counter()
  saved_step, skipped = start_step, 0
  pending = (None, None)

  def shut_down(step_done):
    """Waits for pending checkpoint writes (raising if one failed), closes up."""
    bar.close()
    ckpt.finish(manager, step_done)
    manager.close()

  def check_finite(step_done, finite) -> bool:
    """False if that step was skipped; raises in 'stop' mode (update not applied)."""
    if bool(finite):
      return True
    if tc.on_nonfinite == "stop":
      shut_down(step_done)
      raise TrainingDiverged(
          f"non-finite loss or gradient at step {step_done} (update not applied); last good "
          f"checkpoint: step {manager.latest_step()} in {manager.directory}; set "
          f"train.on_nonfinite=skip to skip such batches")
    log.write({"step": step_done, "split": "train", "skipped_nonfinite": True})
    return False

  def save(step):
    nonlocal saved_step
    if step != saved_step:
      ckpt.save(manager, step, state, previous_step=saved_step)
      saved_step = step

  for step in range(start_step, total_steps):
    idx = data_lib.train_batch_indices(len(dataset.y_train), tc.batch_size, config.seed, step)
    x, y = data_lib.shard_batch(dataset.x_train, dataset.y_train, idx, shard)
    state, metrics = train_step(state, x, y)
    done = step + 1
    n_window += 1
    # Read the previous step's flag, not this one's: no host sync per step.
    pending, (checked_step, finite) = (done, metrics["finite"]), pending
    if checked_step is not None and not check_finite(checked_step, finite):
      skipped += 1
    if done % tc.log_every_steps == 0 or done == total_steps:
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      if step > start_step:  # the first window includes compilation
        images_per_s = n_window * tc.batch_size / (now - t_window)
      t_window, n_window = now, 0
      record = {k: float(v) for k, v in metrics.items()}
      log.write({"step": done, "epoch": done / steps_per_epoch, "split": "train",
                 "images_per_s": images_per_s, **record})
      bar.set_postfix(loss=f"{record['loss']:.3f}", adv_acc=f"{record['adv_acc']:.2f}",
                      img_s=f"{images_per_s:.0f}")
    bar.update(1)
    if stop_after_steps is not None and done >= stop_after_steps:
      shut_down(done)
      return {"stopped_at": done}
    if stop["signal"] is not None:
      save(done)
      shut_down(done)
      name = signal.Signals(stop["signal"]).name
      if is_main:
        print(f"{name} at step {done}: checkpoint saved in {manager.directory}; run the same "
              f"command again to resume", flush=True)
      return {"preempted_at": done, "signal": name}
    end_of_epoch = done % steps_per_epoch == 0
    epoch = done // steps_per_epoch
    if end_of_epoch and (epoch % tc.eval_every_epochs == 0 or done == total_steps):
      last_eval = run_eval(done)
      bar.write(f"epoch {epoch}: clean {last_eval['clean_acc']:.2f}%  "
                f"PGD-{tc.eval_pgd_steps} {last_eval['pgd_acc']:.2f}%")
    if done % tc.checkpoint_every_steps == 0 or done == total_steps:
      save(done)
  if pending[0] is not None and not check_finite(*pending):
    skipped += 1
  shut_down(total_steps)
  if not last_eval:
    last_eval = run_eval(total_steps)
  summary = {
      "steps": total_steps, "epochs": tc.epochs, "model": config.model.name,
      "defense": config.defense.name, "objective": config.objective.name,
      "dataset": meta.name, "eps": config.attack.eps,
      "train_seconds": time.perf_counter() - t_start,
      "images_per_s": images_per_s, "skipped_nonfinite_steps": skipped, **last_eval,
  }
  if is_main:
    log.write({"split": "summary", **summary})
  return summary


def summary_table(summary: dict[str, Any]) -> str:
  """The final summary as a two-column Markdown table."""
  rows = [(k, round(v, 2) if isinstance(v, float) else v) for k, v in summary.items()
          if not (isinstance(v, float) and np.isnan(v))]
  return markdown_table(["metric", "value"], rows)
