"""The training loop: config -> data -> model -> jitted step on the mesh -> checkpoints.

Reads top to bottom: set-up (mesh, data, model, state), resume from the
newest checkpoint, the step loop with a progress bar, per-epoch evaluation,
asynchronous checkpoints, and a final summary table.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from jaxdef import data as data_lib
from jaxdef.build import DataMeta, build
from jaxdef.config import validate
from jaxdef.train import checkpoint as ckpt
from jaxdef.train.mesh import batch_sharded, data_mesh, replicated
from jaxdef.train.metrics import MetricsLog, markdown_table
from jaxdef.train.state import TrainState, init_train_state, make_optimizer
from jaxdef.train.step import AttackBudget, make_eval_step, make_train_step


def data_meta(dataset: Any) -> DataMeta:
  return DataMeta(name=dataset.name, num_classes=int(dataset.num_classes),
                  image_shape=tuple(int(s) for s in dataset.image_shape),
                  mean=tuple(float(m) for m in dataset.mean),
                  std=tuple(float(s) for s in dataset.std))


def evaluate_state(eval_step, state: TrainState, dataset: Any, *, num_examples: int,
                   batch_size: int, sharding, key: jax.Array) -> dict[str, float]:
  """Clean and PGD accuracy (%) on the first ``num_examples`` test images."""
  n = min(num_examples, len(dataset.y_test))
  totals = {"clean": 0, "pgd": 0, "count": 0}
  batches = data_lib.eval_batches(dataset.x_test[:n], dataset.y_test[:n], batch_size, sharding)
  for i, (x, y, mask) in enumerate(batches):
    counts = jax.device_get(eval_step(state, x, y, mask, jax.random.fold_in(key, i)))
    for k in totals:
      totals[k] += int(counts[k])
  count = max(totals["count"], 1)
  return {"clean_acc": 100.0 * totals["clean"] / count,
          "pgd_acc": 100.0 * totals["pgd"] / count, "eval_examples": totals["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None,
                       progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the final summary.

  ``stop_after_steps`` abandons the run after that global step without a
  final save, as a crash would (tests use it to check resumption).
  """
  # ---- set-up: mesh, data, model --------------------------------------------------
  mesh = data_mesh()
  validate(config, jax.device_count())
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
  tx = make_optimizer(tc.optimizer, total_steps, steps_per_epoch)
  rep, shard = replicated(mesh), batch_sharded(mesh)
  root_key = jax.random.key(config.seed)
  init_key, train_key, eval_key = (jax.random.fold_in(root_key, i) for i in range(3))

  # ---- state: fresh, or the newest checkpoint --------------------------------------
  init = jax.jit(functools.partial(init_train_state, model, tx, image_shape=meta.image_shape),
                 out_shardings=rep)
  state = init(init_key)
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=tc.max_to_keep)
  start_step, restored = ckpt.restore_latest(manager, state)
  if restored is not None:
    state = restored
  start_step = int(start_step or 0)
  is_main = jax.process_index() == 0
  if is_main:
    ckpt.write_run_config(workdir, config, meta.to_dict())
  log = MetricsLog(workdir, enabled=is_main)

  # ---- compiled steps ------------------------------------------------------------
  att = config.attack
  budget = AttackBudget(eps=att.eps, step_size=att.step_size, steps=att.steps, norm=att.norm,
                        bn=att.bn, warmup_steps=int(att.warmup_epochs * steps_per_epoch),
                        unroll=att.unroll or None)
  train_step = jax.jit(
      make_train_step(model=model, tx=tx, objective=objective, defense=defense,
                      budget=budget, augment=config.data.augment, ema_decay=tc.ema_decay),
      in_shardings=(rep, shard, shard, rep), out_shardings=(rep, rep), donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(model=model, eps=att.eps, step_size=tc.eval_pgd_step_size,
                     steps=tc.eval_pgd_steps, norm=att.norm, use_ema=tc.ema_decay > 0),
      in_shardings=(rep, shard, shard, shard, rep), out_shardings=rep)
  train_key = jax.device_put(train_key, rep)

  def run_eval(step):
    res = evaluate_state(eval_step, state, dataset, num_examples=tc.eval_examples,
                         batch_size=tc.eval_batch_size, sharding=shard,
                         key=jax.random.fold_in(eval_key, step))
    log.write({"step": step, "epoch": step / steps_per_epoch, "split": "test", **res})
    return res

  # ---- the loop ---------------------------------------------------------------------
  bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True)
  t_window, n_window, images_per_s = time.perf_counter(), 0, float("nan")
  last_eval: dict[str, float] = {}
  t_start = time.perf_counter()
  for step in range(start_step, total_steps):
    idx = data_lib.train_batch_indices(len(dataset.y_train), tc.batch_size, config.seed, step)
    x, y = data_lib.shard_batch(dataset.x_train, dataset.y_train, idx, shard)
    state, metrics = train_step(state, x, y, train_key)
    done = step + 1
    n_window += 1
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
      manager.wait_until_finished()
      manager.close()
      bar.close()
      return {"stopped_at": done}
    end_of_epoch = done % steps_per_epoch == 0
    epoch = done // steps_per_epoch
    if end_of_epoch and (epoch % tc.eval_every_epochs == 0 or done == total_steps):
      last_eval = run_eval(done)
      bar.write(f"epoch {epoch}: clean {last_eval['clean_acc']:.2f}%  "
                f"PGD-{tc.eval_pgd_steps} {last_eval['pgd_acc']:.2f}%")
    if done % tc.checkpoint_every_steps == 0 or done == total_steps:
      ckpt.save(manager, done, state)
  bar.close()
  manager.wait_until_finished()
  manager.close()
  if not last_eval:
    last_eval = run_eval(total_steps)
  summary = {
      "steps": total_steps, "epochs": tc.epochs, "model": config.model.name,
      "defense": config.defense.name, "objective": config.objective.name,
      "dataset": meta.name, "eps": att.eps, "train_seconds": time.perf_counter() - t_start,
      "images_per_s": images_per_s, **last_eval,
  }
  if is_main:
    log.write({"split": "summary", **summary})
  return summary


def summary_table(summary: dict[str, Any]) -> str:
  """The final summary as a two-column Markdown table."""
  rows = [(k, round(v, 2) if isinstance(v, float) else v) for k, v in summary.items()
          if not (isinstance(v, float) and np.isnan(v))]
  return markdown_table(["metric", "value"], rows)
