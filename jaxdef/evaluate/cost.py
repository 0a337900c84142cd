"""What an evaluation will cost, said before it starts.

    for line in evaluation_cost(eval_config, x_test, y_test, main=target):
      print(line)                                  # what jaxdef eval prints first

or in parts: :func:`plan` (what runs, in model passes per example), a
:class:`Speed` per target (:func:`measure_speed`), :func:`estimate` (seconds
per part on n examples), :func:`fitting_examples` (the largest n within a
budget) and :func:`cost_lines` (the printed lines).

An attack's time on a CPU or a GPU is its model evaluations: PGD-20 is 20
forward + input-gradient passes per example, AutoAttack standard up to
about 2000 (APGD-T and FAB-T: 9 targets x 100 steps) plus 5000 Square
queries. So each column of the evaluation is counted from the eval config
in model evaluations per example (:class:`Work`) and priced with the speed
of the model measured on this machine just before (:func:`measure_speed`:
a compiled forward and a compiled forward + input gradient of the attacked
model, timed at the batch shapes the suite uses; on this CPU a gradient
pass of the small CNN costs about ten forwards where XLA's FLOP count says
two, so the passes are timed, not converted from FLOPs). Compilation is priced per program
at a multiple of the measured compile time of the forward + gradient.

The count is the full budget on every example: fixed-step attacks (FGSM,
PGD, C&W, the masking checks) always spend it; AutoAttack attacks only the
examples still robust, so its lines read "up to" -- and on a robust model
nearly every example stays robust through every stage (BENCHMARKS.md: 177
of 200 digits reach Square), so "up to" is close to what it takes.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdef.attacks.autoattack import VERSIONS, pieces
from jaxdef.attacks.common import keyed
from jaxdef.attacks.losses import cross_entropy
from jaxdef.data.augment import to_float
from jaxdef.evaluate.attacks import (STAGED, autoattack_protocol, iterll_steps, lookup,
                                     split_names, traced_eps)
from jaxdef.evaluate.binarization import CHEAP_EXAMPLES, unit_test_attacks
from jaxdef.evaluate.suite import column, score_draws, suite_runs
from jaxdef.evaluate.target import Target


# The evaluation a first user should not have to wait longer for without being told.
BUDGET_S = 15 * 60
# Compile times of attack programs, in compile times of the model's own
# forward + gradient (measured on small CNNs, 2-core CPU under other jobs'
# load: FGSM, PGD and C&W programs 1.5-4x; an AutoAttack stage with its
# re-prediction and scoring 3.5-7x per program size).
COMPILE_ATTACK = 3.0
COMPILE_STAGE = 5.0
# A Square query in forwards: the proposal, margin and bookkeeping around each
# forward (measured: 0.21 ms per query-example where a forward alone takes
# 0.156 ms, default small CNN on the 2-core CPU; 1.25x under heavy load).
SQUARE_QUERY = 1.4
# Each speed is the median of at least this many calls lasting at least this long
# in all, so that a pause caused by another job does not set it.
TIMED_CALLS, TIMED_SECONDS = 3, 0.5
# The examples the attention report attacks (jaxdef.evaluate.attention's default).
ATTENTION_EXAMPLES = 200
# Points of the unit test's binary readout per example: the image, 15 inner points
# and the boundary point (jaxdef.evaluate.binarization).
UNIT_TEST_POINTS = 17


@dataclasses.dataclass(frozen=True)
class Work:
  """Model evaluations per example at an attack's full budget.

  Attributes:
    grads: forward + input-gradient passes of what the attacks see.
    forwards: forward passes of what the attacks see (queries, targets).
    scores: forward passes of the deployed model (scoring).
  """
  grads: float = 0.0
  forwards: float = 0.0
  scores: float = 0.0

  def __add__(self, other: "Work") -> "Work":
    return Work(self.grads + other.grads, self.forwards + other.forwards,
                self.scores + other.scores)

  def times(self, k: float) -> "Work":
    return Work(self.grads * k, self.forwards * k, self.scores * k)


@dataclasses.dataclass(frozen=True)
class Part:
  """One line of the estimate: a column of the suite, or a check run after it.

  Attributes:
    name: as printed (the results column, 'autoattack: apgd-t', 'masking: ...').
    target: label of the target whose measured speed prices it.
    work: model evaluations per example.
    compiles: its compile time, in compile times of the model's forward +
      gradient (an AutoAttack stage: per program size it runs at).
    cap: it runs on ``min(num_examples, cap)`` examples (None: all of them).
    batches: how its examples are batched: 'fixed' (padded batches of
      ``eval.batch_size``), 'staged' (AutoAttack's bucketed pieces, priced at
      the speed of its chunks), 'exact' (no padding).
    up_to: spends less when examples are fooled early (AutoAttack).
  """
  name: str
  target: str
  work: Work
  compiles: float = COMPILE_ATTACK
  cap: Optional[int] = None
  batches: str = "fixed"
  up_to: bool = False

  def examples(self, n: int) -> int:
    return n if self.cap is None else min(n, self.cap)


@dataclasses.dataclass(frozen=True)
class Speed:
  """Seconds per example (row) of one model evaluation, measured on this machine.

  Attributes:
    grad, forward: a forward + input gradient / a forward of what the attacks
      see, at the suite's batch (``chunk_grad``, ``chunk_forward``: at the rows
      of one AutoAttack chunk).
    score: a forward of the deployed model, at the suite's batch.
    compile_s: seconds to compile the forward + gradient program.
    classes: the model's number of classes.
  """
  grad: float
  forward: float
  score: float
  chunk_grad: float
  chunk_forward: float
  compile_s: float
  classes: int


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A part's estimated seconds: ``compute_s`` (proportional to its padded rows)
  plus ``compile_s``."""
  name: str
  examples: int
  compute_s: float
  compile_s: float
  up_to: bool

  @property
  def seconds(self) -> float:
    return self.compute_s + self.compile_s


# ---------------------------------------------------------------- counting

def scoring(target: Target, cfg: ml_collections.ConfigDict, staged: bool = False) -> Work:
  """The deployed model's forwards that score one example of a column: clean
  and attacked, under each scoring draw (:func:`jaxdef.evaluate.suite.score_draws`;
  AutoAttack's columns are scored once, their stages re-predict)."""
  return Work(scores=2.0 * (1 if staged else score_draws(target, cfg)))


def attack_work(name: str, cfg: ml_collections.ConfigDict, *, randomized: bool = False,
                eot_samples: int = 1, restarts: Optional[int] = None, eps=None) -> Work:
  """Model evaluations per example of a fixed-budget attack ``name`` (not
  AutoAttack: see :func:`autoattack_parts`): its gradient steps (times the
  EOT draws of a randomized target) and its forwards, without scoring."""
  eot = eot_samples if randomized else 1
  _, steps = lookup(name)
  if steps is not None:  # pgdN, joint-pgdN
    runs = int(cfg.pgd_restarts if restarts is None else restarts)
    return Work(grads=steps * runs * eot, forwards=runs - 1 if runs > 1 else 0)
  if name == "clean":
    return Work()
  if name in ("fgsm", "joint-fgsm"):
    return Work(grads=eot)
  if name in ("cw", "joint-cw"):
    return Work(grads=int(cfg.cw_steps) * eot)
  if name in ("stepll", "r+stepll"):
    return Work(grads=eot, forwards=1)
  if name == "iterll":
    return Work(grads=iterll_steps(float(cfg.eps if eps is None else eps)) * eot, forwards=1)
  raise ValueError(f"no cost model for attack {name!r}")


def stage_work(stage: str, cfg: ml_collections.ConfigDict, *, version: str, eot: int,
               classes: int) -> Work:
  """Model evaluations per example of one AutoAttack stage at its full budget,
  re-prediction included: every example attacked for every step or query."""
  plus = version == "plus"
  restarts = 5 if plus else 1
  steps, fab_steps = int(cfg.aa_steps), int(cfg.aa_fab_steps)
  targets = int(cfg.get("aa_n_target_classes", 9))
  recheck = Work(scores=1)
  if stage in ("apgd-ce", "apgd-dlr"):
    return Work(grads=restarts * (steps + 1) * eot) + recheck
  if stage == "apgd-t":
    return Work(grads=targets * (steps + 1) * eot, forwards=1) + recheck
  if stage == "fab-t":  # per step: the boundary's gradient, then a forward at the new point
    return Work(grads=targets * fab_steps, forwards=targets * fab_steps + 1) + recheck
  if stage == "fab":  # per step: the whole Jacobian (a gradient per class)
    return Work(grads=restarts * fab_steps * classes,
                forwards=restarts * fab_steps + 1) + recheck
  if stage == "square":
    return Work(forwards=SQUARE_QUERY * int(cfg.aa_queries) + 1) + recheck
  raise ValueError(f"no cost model for AutoAttack stage {stage!r}")


def autoattack_parts(target: Target, name: str, cfg: ml_collections.ConfigDict, *,
                     classes: int) -> list[Part]:
  """AutoAttack (or one of its parts) on ``target`` as one :class:`Part` per
  stage, worst case: every example reaches every stage. The first stage also
  carries the clean pass and the column's scoring."""
  protocol = autoattack_protocol(name, cfg, target.randomized)
  stages = VERSIONS[protocol["version"]] if name == "autoattack" else (name,)
  col = column(target, name)
  parts = []
  for i, stage in enumerate(stages):
    work = stage_work(stage, cfg, version=protocol["version"], eot=protocol["eot_iter"],
                      classes=classes)
    if i == 0:
      work = work + Work(scores=1) + scoring(target, cfg, staged=True)
    parts.append(Part(f"{col}: {stage}" if name == "autoattack" else col, target.label,
                      work, compiles=COMPILE_STAGE, batches="staged", up_to=True))
  return parts


def column_parts(target: Target, name: str, cfg: ml_collections.ConfigDict, *,
                 classes: int) -> list[Part]:
  """The suite's column ``name`` on ``target`` as parts (AutoAttack: one per stage)."""
  if name in STAGED:
    return autoattack_parts(target, name, cfg, classes=classes)
  work = attack_work(name, cfg, randomized=target.randomized,
                     eot_samples=target.eot_samples) + scoring(target, cfg)
  # A column without gradients (clean) compiles forwards only.
  return [Part(column(target, name), target.label, work,
               compiles=COMPILE_ATTACK if work.grads else 1.0)]


def plan(cfg: ml_collections.ConfigDict, runs: Sequence[tuple[Target, str]], *,
         checked: Target, adaptive: bool, attention: bool, classes: int) -> list[Part]:
  """Everything ``jaxdef eval`` runs, as parts: the suite's columns ``runs``
  (:func:`jaxdef.evaluate.suite.suite_runs`), then the masking checks and
  the attack unit test on ``checked`` (the ``adaptive`` target's when there
  is one) and, with ``attention``, the Grad-CAM report (PGD-20 and two
  attention maps per example, per compared run)."""
  parts = [p for t, name in runs for p in column_parts(t, name, cfg, classes=classes)]
  if cfg.get("masking_checks", True):
    m = int(cfg.masking_num_examples)
    curve = cfg.curve_attack
    k = len(cfg.curve_eps)
    per_eps = [attack_work(curve, cfg, randomized=checked.randomized,
                           eot_samples=checked.eot_samples, eps=e) for e in cfg.curve_eps]
    parts.append(Part(f"masking: eps curve ({curve} at {k} eps)", checked.label,
                      sum(per_eps, Work()) + scoring(checked, cfg).times(k),
                      compiles=COMPILE_ATTACK * (1 if traced_eps(curve) else k), cap=m))
    steps, restarts = int(cfg.masking_pgd_steps), int(cfg.masking_pgd_restarts)
    parts.append(Part(f"masking: pgd{steps} x {restarts} restarts", checked.label,
                      attack_work(f"pgd{steps}", cfg, randomized=checked.randomized,
                                  eot_samples=checked.eot_samples, restarts=restarts)
                      + scoring(checked, cfg), cap=m))
  names = split_names(cfg.get("adaptive_attacks" if adaptive else "attacks", ""))
  tested = unit_test_attacks(names, cfg.get("unit_test", "cheap"))
  if tested:
    each = sum((stage_work(a, cfg, version="standard", eot=1, classes=2) if a in STAGED
                else attack_work(a, cfg, randomized=checked.randomized,
                                 eot_samples=checked.eot_samples) for a in tested), Work())
    cap = (CHEAP_EXAMPLES if cfg.get("unit_test", "cheap") == "cheap"
           else int(cfg.get("unit_test_examples", 200)))
    parts.append(Part(f"attack unit test ({', '.join(tested)})", checked.label,
                      each + Work(forwards=UNIT_TEST_POINTS),
                      compiles=COMPILE_ATTACK * len(tested), cap=cap, batches="exact"))
  if attention:
    compared = 2 if cfg.get("compare_workdir", "") else 1
    parts.append(Part("attention report (pgd20)", runs[0][0].label,
                      Work(grads=22, scores=1).times(compared),
                      compiles=2 * COMPILE_ATTACK * compared,
                      cap=int(cfg.get("attention_examples", ATTENTION_EXAMPLES))))
  return parts


# ---------------------------------------------------------------- pricing

def padded_rows(examples: int, batch_size: int, batches: str, multiple: int = 1) -> int:
  """Rows computed for ``examples``: padded batches of ``min(batch_size,
  examples)`` ('fixed', the suite's last batch is padded), AutoAttack's
  bucketed pieces ('staged', :func:`jaxdef.attacks.autoattack.pieces`), or
  the examples themselves ('exact')."""
  if examples <= 0:
    return 0
  cap = min(int(batch_size), examples)
  if batches == "fixed":
    return -(-examples // cap) * cap
  if batches == "staged":
    return sum(rows for _, rows in pieces(examples, cap, multiple))
  return examples


def chunk_rows(n: int, batch_size: int, chunks: int) -> int:
  """Rows of one AutoAttack chunk when ``n`` examples are attacked in pieces
  of at most ``batch_size`` cut into ``chunks``: the shape its programs run at."""
  cap = max(1, min(int(batch_size), n))
  chunks = max(int(chunks), 1)
  return pieces(n, cap, chunks)[0][1] // chunks


def estimate_part(part: Part, speed: Speed, n: int, *, batch_size: int,
                  chunks: int = 1) -> Estimate:
  """``part``'s seconds on ``n`` examples (of which it runs ``part.examples(n)``)."""
  m = part.examples(n)
  staged = part.batches == "staged"
  grad, forward = ((speed.chunk_grad, speed.chunk_forward) if staged
                   else (speed.grad, speed.forward))
  per_row = part.work.grads * grad + part.work.forwards * forward + part.work.scores * speed.score
  rows = padded_rows(m, batch_size, part.batches, max(int(chunks), 1) if staged else 1)
  programs = 0 if staged and not m else 1  # the staged pieces share one size
  return Estimate(part.name, m, rows * per_row,
                  programs * part.compiles * speed.compile_s, part.up_to)


def estimate(parts: Sequence[Part], speeds: Mapping[str, Speed], n: int, *, batch_size: int,
             chunks: int = 1) -> list[Estimate]:
  """Every part's :class:`Estimate` on ``n`` examples, priced with the speed
  of its target (``speeds[part.target]``)."""
  return [estimate_part(p, speeds[p.target], n, batch_size=batch_size, chunks=chunks)
          for p in parts]


def total_seconds(estimates: Sequence[Estimate]) -> float:
  return float(sum(e.seconds for e in estimates))


def fitting_examples(parts: Sequence[Part], speeds: Mapping[str, Speed], n: int, *,
                     budget_s: float, batch_size: int, chunks: int = 1) -> int:
  """The largest number of examples, at most ``n``, whose estimated total is
  within ``budget_s`` (0 when not even one example fits). Padding makes the
  total jump at batch boundaries, so every count is tried, largest first."""
  for m in range(n, 0, -1):
    if total_seconds(estimate(parts, speeds, m, batch_size=batch_size,
                              chunks=chunks)) <= budget_s:
      return m
  return 0


# ---------------------------------------------------------------- the lines

def duration(seconds: float) -> str:
  """'40 s', '2.5 min', '1.3 h'."""
  if seconds < 60:
    return f"{max(seconds, 0.0):.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.3g} min" if seconds % 60 == 0 else f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _amount(seconds: float, up_to: bool) -> str:
  return f"{'up to ' if up_to else ''}{duration(seconds)}"


def without_autoattack(cfg: ml_collections.ConfigDict, fields: Sequence[str]
                       ) -> dict[str, str]:
  """``{field: names}`` of the ``fields`` that name AutoAttack or a part of it,
  with those left out (the flags of an evaluation without it); {} if none."""
  changed = {}
  for field in fields:
    names = split_names(cfg.get(field, ""))
    kept = [n for n in names if n not in STAGED]
    if len(kept) != len(names):
      changed[field] = ",".join(kept)
  return changed


def format_lines(estimates: Sequence[Estimate]) -> list[str]:
  """One line per part (name, examples, estimated time) and the total."""
  width = max([len(e.name) for e in estimates] + [5])
  lines = [f"  {e.name:<{width}}  {e.examples:>6} examples  {_amount(e.seconds, e.up_to)}"
           for e in estimates]
  up_to = any(e.up_to for e in estimates)
  lines.append(f"  {'total':<{width}}  {'':>15}  {_amount(total_seconds(estimates), up_to)}")
  return lines


def advice_line(*, total_s: float, budget_s: float, n: int, fitting: int,
                fitting_s: float, up_to: bool,
                without: Optional[tuple[dict[str, str], float]] = None) -> Optional[str]:
  """The line naming the flags that shorten an evaluation over ``budget_s``
  (None when it fits): ``--config.eval.num_examples`` with the largest count
  that fits (``fitting``, estimated ``fitting_s``), and the evaluation without
  AutoAttack (``without``: its fields and estimated seconds) when there is one."""
  if total_s <= budget_s:
    return None
  options = []
  if 0 < fitting < n:
    options.append(f"--config.eval.num_examples={fitting} "
                   f"({'up to' if up_to else 'about'} {duration(fitting_s)})")
  if without is not None and without[0]:
    flags = " ".join(f"--config.eval.{k}={v}" for k, v in without[0].items())
    options.append(f"leave AutoAttack out: {flags} (about {duration(without[1])})")
  if not options:
    return (f"over {duration(budget_s)}: no smaller number of examples fits; "
            f"an accelerator would shorten it")
  return f"over {duration(budget_s)}; to shorten it: " + ", or ".join(options)


def cost_lines(parts: Sequence[Part], speeds: Mapping[str, Speed], n: int, *,
               batch_size: int, chunks: int = 1, budget_s: float = BUDGET_S,
               without: Optional[tuple[dict[str, str], Sequence[Part]]] = None) -> list[str]:
  """What ``jaxdef eval`` prints before it attacks: a header, a line per part,
  the total and, when the total is over ``budget_s``, the advice line
  (:func:`advice_line`; ``without``: the flags and parts of the evaluation
  without AutoAttack, when it runs)."""
  def priced(ps: Sequence[Part], m: int) -> list[Estimate]:
    return estimate(ps, speeds, m, batch_size=batch_size, chunks=chunks)

  estimates = priced(parts, n)
  total = total_seconds(estimates)
  up_to = any(e.up_to for e in estimates)
  lines = ["estimated time on this machine (the model's speed measured just now, every attack "
           "at its full budget" + ("; 'up to': AutoAttack skips the examples already fooled"
                                   if up_to else "") + "):"]
  lines += format_lines(estimates)
  fitting, fitting_s = 0, 0.0
  if total > budget_s:
    fitting = fitting_examples(parts, speeds, n, budget_s=budget_s, batch_size=batch_size,
                               chunks=chunks)
    fitting_s = total_seconds(priced(parts, fitting)) if fitting else 0.0
  alternative = None
  if without is not None and without[0]:
    alternative = (without[0], total_seconds(priced(without[1], n)))
  advice = advice_line(total_s=total, budget_s=budget_s, n=n, fitting=fitting,
                       fitting_s=fitting_s, up_to=up_to, without=alternative)
  return lines + ([advice] if advice else [])


# ---------------------------------------------------------------- measuring

def _seconds(fn: Callable, *args) -> tuple[float, float]:
  """(seconds of the first call, median seconds of the later calls: at least
  :data:`TIMED_CALLS` of them, and at least :data:`TIMED_SECONDS` in all)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times: list[float] = []
  while len(times) < TIMED_CALLS or sum(times) < TIMED_SECONDS:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def measure_speed(target: Target, x: np.ndarray, y: np.ndarray, *, rows: int,
                  chunk_rows: Optional[int] = None) -> Speed:
  """:class:`Speed` of ``target`` on this machine: its attack view's forward
  and forward + CE input gradient, and its deployed model's forward, each
  compiled and timed (median of several calls) on ``rows`` examples of
  ``x`` (repeated if fewer), the view's also on ``chunk_rows`` (default
  ``rows``); the compile time is the first gradient call's excess."""
  view = keyed(target.view, target.randomized)
  predict = keyed(target.predict, target.randomized)
  key = jax.random.key(0)

  def batch(r):
    idx = np.resize(np.arange(len(x)), r)
    return jnp.asarray(to_float(x[idx])), jnp.asarray(np.asarray(y)[idx].astype(np.int32))

  forward = jax.jit(lambda z, k: view(z, k))
  grad = jax.jit(jax.grad(lambda z, yb, k: cross_entropy(view(z, k), yb).sum()))

  def timed(r):
    xb, yb = batch(r)
    _, t_fwd = _seconds(forward, xb, key)
    first, t_grad = _seconds(grad, xb, yb, key)
    return t_fwd / r, t_grad / r, max(first - t_grad, 0.0)

  fwd, grd, compile_s = timed(rows)
  chunk_fwd, chunk_grd = (fwd, grd) if chunk_rows in (None, rows) else timed(chunk_rows)[:2]
  score = fwd
  if target.attack_view is not None:
    xb, _ = batch(rows)
    score = _seconds(jax.jit(lambda z, k: predict(z, k)), xb, key)[1] / rows
  classes = int(jax.eval_shape(view, batch(1)[0], key).shape[-1])
  return Speed(grad=grd, forward=fwd, score=score, chunk_grad=chunk_grd,
               chunk_forward=chunk_fwd, compile_s=compile_s, classes=classes)


# ---------------------------------------------------------------- jaxdef eval

def evaluation_cost(cfg: ml_collections.ConfigDict, x: np.ndarray, y: np.ndarray, *,
                    main: Target, adaptive: Optional[Target] = None,
                    surrogate: Optional[Target] = None, attention: bool = False,
                    budget_s: float = BUDGET_S) -> list[str]:
  """The lines ``jaxdef eval`` prints before it attacks (:func:`cost_lines`):
  the suite of ``cfg`` on the targets (:func:`jaxdef.evaluate.suite.suite_runs`),
  the checks after it, each target's speed measured here on ``x``, and the
  same evaluation without AutoAttack for the advice line."""
  n = min(int(cfg.num_examples), len(x))
  batch = max(1, min(int(cfg.batch_size), n))
  chunks = max(int(cfg.get("aa_chunks", 1)), 1)
  checked = adaptive if adaptive is not None else main

  def parts_of(c: ml_collections.ConfigDict, classes: int) -> list[Part]:
    runs = suite_runs(c, main, adaptive=adaptive, surrogate=surrogate)
    return plan(c, runs, checked=checked, adaptive=adaptive is not None,
                attention=attention, classes=classes)

  runs = suite_runs(cfg, main, adaptive=adaptive, surrogate=surrogate)
  targets = {t.label: t for t, _ in runs}
  targets.setdefault(checked.label, checked)
  staged = {t.label for t, name in runs if name in STAGED}
  speeds = {label: measure_speed(t, x, y, rows=batch,
                                 chunk_rows=chunk_rows(n, batch, chunks) if label in staged
                                 else None)
            for label, t in targets.items()}
  classes = speeds[main.label].classes
  fields = ["attacks"] + (["adaptive_attacks"] if adaptive is not None else []) + (
      ["transfer_attacks"] if surrogate is not None else [])
  changed = without_autoattack(cfg, fields)
  without = None
  if changed and split_names(changed.get("attacks", cfg.attacks)):
    lighter = ml_collections.ConfigDict(cfg.to_dict())
    lighter.update(changed)
    without = (changed, parts_of(lighter, classes))
  lines = cost_lines(parts_of(cfg, classes), speeds, n, batch_size=batch, chunks=chunks,
                     budget_s=budget_s, without=without)
  return lines[:1] + [speed_line(label, speeds[label], batch) for label in speeds] + lines[1:]


def speed_line(label: str, speed: Speed, rows: int) -> str:
  """What was measured: the model's passes per example and its compile time."""
  return (f"  (measured{f' on {label}' if label else ''}: forward + input gradient "
          f"{1e3 * speed.grad:.2f} ms, forward {1e3 * speed.forward:.2f} ms per example at "
          f"batch {rows}; compiling them {speed.compile_s:.1f} s)")
