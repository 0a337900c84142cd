"""The training loop: config -> data -> model -> jitted step on the mesh -> checkpoints.

Reads top to bottom: set-up (mesh, data, model, state), resume from the
newest usable checkpoint, the step loop with a progress bar, per-epoch
evaluation, asynchronous checkpoints, and a final summary table.

Faults: SIGTERM or SIGINT saves a checkpoint at the current step, waits for
the write and returns ``{"preempted_at": step}``; with several processes, a
signal sent to any of them stops all after the same step
(:class:`jaxdef.train.distributed.StopAgreement`); a kill at any other moment
resumes from the last complete checkpoint. A non-finite loss or gradient
never reaches the state; ``train.on_nonfinite`` either stops the run
(:class:`TrainingDiverged`, naming the step and the last good checkpoint) or
skips the batch and counts it. A failed checkpoint write stops the run with
:class:`CheckpointWriteError`, naming the checkpoint that is still usable.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from jaxdef import data as data_lib
from jaxdef.build import DataMeta, build
from jaxdef.config import check_combinations, validate
from jaxdef.errors import ConfigError, TrainingDiverged
from jaxdef.progress import bar as progress_bar
from jaxdef.signals import stop_requests
from jaxdef import checkpoint as ckpt
from jaxdef.train.mesh import batch_sharded, data_mesh, replicated
from jaxdef.train.distributed import StopAgreement
from jaxdef.train.free import free_replays, state_sharding, total_batches
from jaxdef.train.metrics import MetricsLog, markdown_table
from jaxdef.train.state import TrainState, graft_variables, init_train_state, make_optimizer
from jaxdef.train.awp import WeightPerturbation
from jaxdef.train.step import (INIT_STREAM, AttackBudget, make_eval_step, make_train_step,
                               stream_key)


def jit_steps(config: ml_collections.ConfigDict, *, model, objective, defense, tx, mesh,
              steps_per_epoch: int, label_smoothing: Optional[np.ndarray] = None
              ) -> tuple[Any, Any]:
  """The run's ``jax.jit``-ed train and evaluation steps over ``mesh``.

  Train: ``(state, images, labels) -> (state, metrics)`` with the state
  replicated and donated and the batch sharded on ``data``. Eval:
  ``(state, images, labels, mask, step, batch) -> counts``, clean + PGD-
  ``train.eval_pgd_steps`` on ``train.eval_pgd_loss``, on the EMA weights
  when ``train.ema_decay`` > 0. Both PGD loops unroll by ``attack.unroll`` (0: by
  backend, :func:`jaxdef.attacks.pgd.loop_unroll`). The loop and the benchmark
  (``benchmarks/bench.py``, outside the package) both call this, so the
  benchmark times the program that training runs. ``label_smoothing``: per
  row of the batch, or one value for every row (``train.label_smoothing``
  composed with the extra data's own: :meth:`jaxdef.data.streamed.TrainData.label_smoothing`;
  None: none).
  """
  att, tc = config.attack, config.train
  rep, shard = replicated(mesh), batch_sharded(mesh)
  # Free-m (attack.free_replays): epochs count updates, m per batch, and the state
  # carries the perturbation, split over the mesh like the batch (jaxdef.train.free).
  replays = free_replays(att)
  steps_per_epoch = steps_per_epoch / replays if replays > 1 else steps_per_epoch
  state_sh = state_sharding(mesh, replays > 1)
  budget = AttackBudget(eps=att.eps, step_size=att.step_size, steps=att.steps, norm=att.norm,
                        bn=att.bn, warmup_steps=int(att.warmup_epochs * steps_per_epoch),
                        unroll=att.unroll or None, init=att.get("init", ""),
                        init_sigma=att.get("init_sigma", AttackBudget.init_sigma),
                        init_scale=att.get("init_scale", 1.0),
                        project_eps=att.get("project", True),
                        step_rule=att.get("step_rule", AttackBudget.step_rule),
                        adam_lr=att.get("adam_lr", AttackBudget.adam_lr),
                        adam_boundaries=tuple(att.get("adam_boundaries",
                                                      AttackBudget.adam_boundaries)),
                        adam_scales=tuple(att.get("adam_scales", AttackBudget.adam_scales)))
  train_step = jax.jit(
      make_train_step(model=model, tx=tx, objective=objective, defense=defense,
                      budget=budget, augment=config.data.augment, ema_decay=tc.ema_decay,
                      seed=config.seed, trainable=tc.get("trainable", ""),
                      label_smoothing=label_smoothing, free_replays=replays,
                      cast_params_once=tc.get("cast_params_once", False),
                      ema_warmup_steps=tc.get("ema_warmup_epochs", 0.0) * steps_per_epoch,
                      awp=awp_settings(tc, steps_per_epoch),
                      cutmix=config.data.get("cutmix", False),
                      bn_update=tc.get("bn_update", "both")),
      in_shardings=(state_sh, shard, shard), out_shardings=(state_sh, rep), donate_argnums=0)
  eval_step = jax.jit(
      make_eval_step(model=model, eps=att.eps, step_size=tc.eval_pgd_step_size,
                     steps=tc.eval_pgd_steps, norm=att.norm, use_ema=tc.ema_decay > 0,
                     seed=config.seed, unroll=att.unroll or None,
                     random_start=tc.get("eval_pgd_random_start", True),
                     cast_params_once=tc.get("cast_params_once", False),
                     joint_loss=defense.joint_attack_loss if tc.get("eval_pgd_joint") else None,
                     loss=tc.get("eval_pgd_loss", "ce")),
      in_shardings=(state_sh, shard, shard, shard, rep, rep), out_shardings=rep)
  return train_step, eval_step


def awp_settings(tc: ml_collections.ConfigDict,
                 steps_per_epoch: int) -> Optional[WeightPerturbation]:
  """``train.awp`` as the step takes it (None when absent or ``gamma`` is 0);
  its warm-up in steps."""
  awp = tc.get("awp", None)
  if awp is None or not awp.get("gamma", 0.0):
    return None
  return WeightPerturbation(gamma=float(awp.gamma), proxy_lr=float(awp.proxy_lr),
                            warmup_steps=int(round(awp.warmup_epochs * steps_per_epoch)))


def check_init_from(init_from: ml_collections.ConfigDict) -> None:
  """One-line :class:`ConfigError` for an empty ``train.init_from`` entry, before
  any work (a config file may leave it to be given on the command line, so
  :func:`jaxdef.config.validate` accepts it empty)."""
  for subtree, source in init_from.items():
    if not source:
      raise ConfigError(f"train.init_from.{subtree} is empty: give the --workdir of a trained "
                        f"run to initialise {subtree!r} from (see the config file's first "
                        f"comment for its flag)")


def init_from_runs(state: TrainState, init_from: ml_collections.ConfigDict,
                   sharding) -> TrainState:
  """``train.init_from`` ({subtree: workdir}): a fresh run's ``subtree`` of
  parameters and BatchNorm statistics taken from the model of a trained run
  (:func:`jaxdef.restored.load_run`: its EMA weights if it kept an EMA).
  Only at the start of a run: a resumed run has its own checkpoint."""
  from jaxdef.restored import load_run
  for subtree, source in init_from.items():
    state = graft_variables(state, subtree, load_run(source).variables)
  return jax.device_put(state, sharding)


def evaluate_state(eval_step, state: TrainState, dataset: Any, *, num_examples: int,
                   batch_size: int, sharding, step: int) -> dict[str, float]:
  """Clean and PGD accuracy (%) on the first ``num_examples`` test images (0: all)."""
  n = len(dataset.y_test) if num_examples <= 0 else min(num_examples, len(dataset.y_test))
  totals = {"clean": 0, "pgd": 0, "count": 0}
  batches = data_lib.eval_batches(dataset.x_test[:n], dataset.y_test[:n], batch_size, sharding)
  for i, (x, y, mask) in enumerate(batches):
    counts = jax.device_get(eval_step(state, x, y, mask, np.int32(step), np.int32(i)))
    for k in totals:
      totals[k] += int(counts[k])
  count = max(totals["count"], 1)
  return {"clean_acc": totals["clean"] / count,
          "pgd_acc": totals["pgd"] / count, "eval_examples": totals["count"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after_steps: Optional[int] = None,
                       progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns the final summary.

  ``stop_after_steps`` abandons the run after that global step without a
  final save, as a crash would (tests use it to check resumption).
  """
  with stop_requests() as stop:
    return _train(config, workdir, stop, stop_after_steps, progress)


@dataclasses.dataclass
class Run:
  """What a training run is built from (:func:`prepare`): data, model, optimizer, mesh."""
  config: ml_collections.ConfigDict
  dataset: data_lib.TrainData  # the batches, in memory or streamed, and the test split
  validation: Any  # held-out training examples as a test split (train.select best_val)
  meta: DataMeta
  model: Any
  objective: Any
  defense: Any
  tx: Any
  mesh: Any
  steps_per_epoch: int
  total_steps: int


def prepare(config: ml_collections.ConfigDict) -> Run:
  """Validates ``config`` and builds the run: one-line errors before any compile."""
  mesh = data_mesh()
  validate(config, jax.device_count())
  check_init_from(config.train.get("init_from", {}))
  tc = config.train
  dataset, validation = data_lib.train_data(config.data, seed=config.seed,
                                            global_batch=tc.batch_size,
                                            eval_examples=tc.eval_examples)
  meta = DataMeta.from_dataset(dataset)
  check_combinations(config, side=meta.image_shape[0])
  model, objective, defense = build(config, meta)
  if dataset.plan.keep_last:
    data_lib.check_last_batch(dataset.plan.num_real, tc.batch_size, jax.device_count())
  steps_per_epoch = dataset.steps_per_epoch
  replays = free_replays(config.attack)  # Free-m: train.epochs counts updates, m per batch
  total_steps = total_batches(tc.epochs, steps_per_epoch, replays)
  tx = make_optimizer(tc.optimizer, total_steps * replays, steps_per_epoch,
                      trainable=tc.get("trainable", ""), global_batch=tc.batch_size)
  return Run(config, dataset, validation, meta, model, objective, defense, tx, mesh,
             steps_per_epoch, total_steps)


class Checkpoints:
  """An Orbax manager of the run: saves a step once, and waits for writes on close."""

  def __init__(self, workdir: str, max_to_keep: int, subdir: str = ckpt.CHECKPOINTS,
               data_position=None):
    self.manager = ckpt.checkpoint_manager(workdir, max_to_keep=max_to_keep, subdir=subdir)
    self.saved_step = 0
    self.data_position = data_position  # step -> JSON saved with the step, or None

  def resume(self, state: TrainState, warn) -> tuple[int, Optional[TrainState]]:
    """(step, state) of the newest usable checkpoint, or (0, None)."""
    step, restored = ckpt.restore_latest(self.manager, state, warn=warn)
    self.saved_step = int(step or 0)
    return self.saved_step, restored

  def save(self, step: int, state: TrainState) -> None:
    if step != self.saved_step:
      ckpt.save(self.manager, step, state, previous_step=self.saved_step,
                data_position=self.data_position and self.data_position(step))
      self.saved_step = step

  def close(self, step_done: int) -> None:
    """Waits for pending writes (raising if one failed), then closes the manager."""
    ckpt.finish(self.manager, step_done, close=True)


class Throughput:
  """Images per second over the steps since the last :meth:`read`; the first
  window (which includes compilation) reports NaN."""

  def __init__(self, batch_size: int):
    self.batch_size, self.steps, self.first = batch_size, 0, True
    self.since, self.value = time.perf_counter(), float("nan")

  def tick(self) -> None:
    self.steps += 1

  def read(self) -> float:
    now = time.perf_counter()
    if not self.first:
      self.value = self.steps * self.batch_size / (now - self.since)
    self.first, self.since, self.steps = False, now, 0
    return self.value


class Selection:
  """``train.select``: keeps the checkpoint of the best PGD accuracy so far in
  ``workdir/selected_checkpoint`` ('best_val': on the held-out training
  examples; 'best_test': on the test split). 'final' keeps nothing extra.
  The score is the per-epoch evaluation's (:func:`jit_steps`: the attack of
  ``train.eval_pgd_*`` on ``train.eval_examples`` test images, 0 = all, or on
  the held-out ones; on the EMA weights when the run keeps an EMA).

  The best score survives a resume: it is read back from the 'select'
  records of ``metrics.jsonl``.
  """

  def __init__(self, select: str, workdir: str, log: MetricsLog):
    self.select, self.log = select, log
    self.checkpoints = None if select == "final" else Checkpoints(workdir, 1, ckpt.SELECTED)
    self.best = max((r["pgd_acc"] for r in log.read() if r.get("split") == "select"),
                    default=float("-inf"))

  def offer(self, step: int, state: TrainState, scores: dict[str, float]) -> None:
    """Keeps ``state`` if its score (``scores['pgd_acc']``) beats the best so far."""
    if self.checkpoints is None or not scores["pgd_acc"] > self.best:
      return
    self.best = scores["pgd_acc"]
    self.checkpoints.save(step, state)
    self.log.write({"step": step, "split": "select", "select": self.select, **scores})

  def close(self) -> dict[str, Any]:
    """Waits for the write; what the summary says of the selection."""
    if self.checkpoints is None:
      return {}
    self.checkpoints.close(self.checkpoints.saved_step)
    return {"select": self.select, "selected_step": self.checkpoints.saved_step,
            "selected_pgd_acc": self.best}


def nonfinite_step(step: int, policy: str, log: MetricsLog, last_good: str) -> None:
  """A step whose update was not applied: raise (``policy`` 'stop') or log it ('skip')."""
  if policy == "stop":
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {step} (update not applied); last good "
        f"checkpoint: {last_good}; set train.on_nonfinite=skip to skip such batches")
  log.write({"step": step, "split": "train", "skipped_nonfinite": True})


def _train(config, workdir, stop, stop_after_steps, progress) -> dict[str, Any]:
  # ---- set-up: data, model, optimizer, compiled steps -------------------------------
  run = prepare(config)
  tc, meta, dataset = config.train, run.meta, run.dataset
  shard = batch_sharded(run.mesh)
  replays = free_replays(config.attack)
  state_sh = state_sharding(run.mesh, replays > 1)
  train_step, eval_step = jit_steps(config, model=run.model, objective=run.objective,
                                    defense=run.defense, tx=run.tx, mesh=run.mesh,
                                    steps_per_epoch=run.steps_per_epoch,
                                    label_smoothing=dataset.label_smoothing(
                                        config.data, tc.get("label_smoothing", 0.0)))
  is_main = jax.process_index() == 0

  # ---- state: fresh (or from train.init_from), or the newest checkpoint --------------
  init = jax.jit(lambda: init_train_state(run.model, run.tx,
                                           stream_key(config.seed, INIT_STREAM),
                                           image_shape=meta.image_shape,
                                           free_batch=tc.batch_size * (replays > 1)),
                 out_shardings=state_sh)
  changed = ckpt.check_same_run(workdir, config, meta.to_dict())
  checkpoints = Checkpoints(workdir, tc.max_to_keep, data_position=dataset.position)
  state = init()
  start_step, restored = checkpoints.resume(
      state, warn=lambda m: print(m, flush=True) if is_main else None)
  if restored is not None:
    state = restored
    dataset.check_position(ckpt.data_position(checkpoints.manager, start_step), workdir)
  elif tc.get("init_from"):
    state = init_from_runs(state, tc.init_from, state_sh)
  if is_main:
    ckpt.write_run_config(workdir, config, meta.to_dict())
  log = MetricsLog(workdir, enabled=is_main)
  if changed and restored is not None:
    log.write({"step": start_step, "split": "resume", "changed": changed})
    if is_main:
      print(f"resuming at step {start_step} with "
            + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items()), flush=True)

  selection = Selection(tc.get("select", "final"), workdir, log)
  if tc.get("select") == "best_test" and is_main:
    print("warning: train.select='best_test' picks the checkpoint by its TEST accuracy (the "
          "CAS authors' rule): the reported robustness is optimistic", flush=True)

  def run_eval(state, step):
    res = evaluate_state(eval_step, state, dataset, num_examples=tc.eval_examples,
                         batch_size=tc.eval_batch_size, sharding=shard, step=step)
    log.write({"step": step, "epoch": step / run.steps_per_epoch, "split": "test", **res})
    if run.validation is not None:
      val = evaluate_state(eval_step, state, run.validation,
                           num_examples=len(run.validation.y_test),
                           batch_size=tc.eval_batch_size, sharding=shard, step=step)
      log.write({"step": step, "epoch": step / run.steps_per_epoch, "split": "val", **val})
      res = {**res, **{f"val_{k}": v for k, v in val.items()}}
    if selection.select != "final":
      prefix = "val_" if selection.select == "best_val" else ""
      selection.offer(step, state, {k: res[prefix + k] for k in ("pgd_acc", "clean_acc")})
    return res

  def shut_down(step_done) -> dict[str, Any]:
    """Closes the bar and the TensorBoard file, waits for pending checkpoint
    writes (raising if one failed); what the summary says of the selection."""
    bar.close()
    batches.close()
    log.close()
    checkpoints.close(step_done)
    return selection.close()

  def check(step, finite) -> int:
    """1 if step ``step`` was skipped for a non-finite update (0 if not)."""
    if bool(finite):
      return 0
    if tc.on_nonfinite == "stop":  # the run ends here: wait for the writes first
      shut_down(step)
    nonfinite_step(step, tc.on_nonfinite, log, f"step {checkpoints.manager.latest_step()} "
                                                f"in {checkpoints.manager.directory}")
    return 1

  # ---- the loop ---------------------------------------------------------------------
  bar = progress_bar(run.total_steps, "train" if replays == 1 else
                     f"train (Free-{replays}: {replays} updates per batch)", "batch"
                     if replays > 1 else "step", initial=start_step,
                     disable=not (progress and is_main))
  speed = Throughput(tc.batch_size)
  agreement = StopAgreement(stop, run.mesh, every=tc.get("stop_check_every_steps", 1))
  last_eval: dict[str, float] = {}
  t_start = time.perf_counter()
  skipped, pending = 0, None  # pending: (step, finite flag) not read yet
  # The batches of steps start_step..: the same as an uninterrupted run's.
  batches = dataset.batches(start_step, run.total_steps, shard)
  for step in range(start_step, run.total_steps):
    x, y = next(batches)
    state, metrics = train_step(state, x, y)
    done = step + 1
    speed.tick()
    # Read the previous step's flag, not this one's: no host sync per step.
    if pending is not None:
      skipped += check(*pending)
    pending = (done, metrics["finite"])
    if done % tc.log_every_steps == 0 or done == run.total_steps:
      record = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
      images_per_s = speed.read()
      log.write({"step": done, "epoch": done / run.steps_per_epoch, "split": "train",
                 "images_per_s": images_per_s, **record})
      shown = dict(loss=f"{record['loss']:.3f}", adv_acc=f"{100 * record['adv_acc']:.1f}%")
      if np.isfinite(images_per_s):
        shown["img_s"] = f"{images_per_s:.0f}"
      bar.set_postfix(**shown)
    bar.update(1)
    if stop_after_steps is not None and done >= stop_after_steps:
      shut_down(done)
      return {"stopped_at": done}
    stopping = agreement.poll(done)  # the same step and signal on every process
    if stopping is not None:
      checkpoints.save(done, state)
      shut_down(done)
      name = signal.Signals(stopping.signum).name
      # Every process says it (each host's log explains its exit status).
      print(f"{name} at step {done}{stopping.where(jax.process_count())}: checkpoint saved "
            f"in {checkpoints.manager.directory}; run the same command again to resume",
            flush=True)
      return {"preempted_at": done, "signal": name}
    epoch, into_epoch = divmod(done, run.steps_per_epoch)
    if into_epoch == 0 and (epoch % tc.eval_every_epochs == 0 or done == run.total_steps):
      last_eval = run_eval(state, done)
      bar.write(f"epoch {epoch}: clean {100 * last_eval['clean_acc']:.2f}%  "
                f"PGD-{tc.eval_pgd_steps} {100 * last_eval['pgd_acc']:.2f}%")
    if done % tc.checkpoint_every_steps == 0 or done == run.total_steps:
      checkpoints.save(done, state)
  if pending is not None:
    skipped += check(*pending)
  if not last_eval:
    last_eval = run_eval(state, run.total_steps)
  selected = shut_down(run.total_steps)

  # ---- summary ----------------------------------------------------------------------
  summary = {
      "steps": run.total_steps, "epochs": tc.epochs, "model": config.model.name,
      "defense": config.defense.name, "objective": config.objective.name,
      "dataset": meta.name, "eps": config.attack.eps,
      "train_seconds": time.perf_counter() - t_start,
      "images_per_s": speed.value, "skipped_nonfinite_steps": skipped, **last_eval,
      **selected,
  }
  if replays > 1:  # Free-m: train.epochs counted updates; the data were read fewer times
    summary.update(free_replays=replays, data_passes=run.total_steps / run.steps_per_epoch)
  if is_main:
    log.write({"split": "summary", **summary})
  return summary


def _shown(key: str, value: Any) -> Any:
  """A summary value as printed: accuracies (fractions, ``*_acc``) in percent."""
  if not isinstance(value, float):
    return value
  return f"{100 * value:.2f}%" if key.endswith("_acc") else round(value, 2)


def summary_table(summary: dict[str, Any]) -> str:
  """The final summary as a two-column Markdown table (accuracies in percent)."""
  rows = [(k, _shown(k, v)) for k, v in summary.items()
          if not (isinstance(v, float) and np.isnan(v))]
  return markdown_table(["metric", "value"], rows)
