"""AutoAttack (Croce & Hein, ICML 2020, sec. 4): a fixed ensemble run in sequence.

Each attack only attacks the examples that every earlier one failed on, and
the result keeps, per example, the first adversarial point found (the worst
case over the ensemble). Versions and budgets are those of the reference
implementation:

* ``standard``: APGD-CE (100 steps, 1 restart), APGD-T (9 target classes,
  100 steps, 1 restart each), FAB-T (9 target classes, 100 steps), Square
  (5000 queries, p_init 0.8).
* ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square,
  APGD-T, FAB-T.
* ``rand`` (randomized defenses): APGD-CE and APGD-DLR, 1 restart each, with
  the gradient averaged over 20 draws (EOT).

After every attack the examples are re-predicted, as the reference does: an
example counts as fooled when the deployed model's argmax on the point the
attack returned is not its label (an exact logit tie that argmax resolves to
the label is not fooled, whatever the attack's own flag said), and only the
examples still classified correctly go on to the next attack. For a
randomized model each re-prediction is a fresh draw of its randomness, and
the clean pass another: an example stays robust only if it is classified
correctly under every one of them (pyautoattack's ``rand`` protocol).

Traced (inside the caller's ``jax.jit``, as the evaluation suite runs it) it
is one pure function: the batch never leaves the device between attacks, and
each attack skips the examples already fooled with ``lax.cond`` (``chunks``).
Called with concrete arrays it runs as the reference does (:func:`staged`):
between attacks the still-robust examples are gathered on the host into a
few bucketed batch sizes (:func:`bucket`), each attack is its own compiled
program (smaller programs compile faster, and a second call reuses them),
and a line per attack reports the examples left and the robust accuracy so
far (``log``). Both paths keep, per example, the first adversarial point
found; since every attack draws its randomness per example
(:func:`jaxdef.attacks.common.per_example`), an example is attacked the same
way in both.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.attacks.apgd import apgd_t_update, apgd_update
from jaxdef.attacks.common import Best, KeyedLogitsFn, attacked_model, keyed, start_from_clean
from jaxdef.attacks.eager import call_compiled, compiles_itself, tracing
from jaxdef.attacks.fab import fab_update
from jaxdef.attacks.indicators import NAMES, no_flags
from jaxdef.attacks.square import square_update
from jaxdef.errors import unknown_name

Array = jax.Array

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def eot_draws(version: str, eot_iter: Optional[int]) -> int:
  """Gradient draws per APGD step (EOT): ``eot_iter`` if given, else the
  version's own (20 for 'rand', 1 otherwise)."""
  return int(eot_iter or (20 if version == "rand" else 1))


def _stage(name: str, *, version: str, norm: str, eps: float, steps: int,
           n_target_classes: int, fab_steps: int, queries: int, p_init: float,
           restarts: Optional[int], eot_iter: Optional[int], chunks: int, record: bool = False):
  """``update(best, model, x, y, key) -> Best`` for one attack of the ensemble
  (``record``: the APGD attacks record their indicators of attack failure in
  ``Best.flags``; FAB and Square have no loss curve to read and record none)."""
  plus = version == "plus"
  untargeted_restarts = restarts or (5 if plus else 1)
  eot = eot_draws(version, eot_iter)
  common = dict(eps=eps, norm=norm, chunks=chunks)
  if name in ("apgd-ce", "apgd-dlr"):
    return functools.partial(apgd_update, loss=name[5:], steps=steps,
                             restarts=untargeted_restarts, eot_iter=eot, record=record, **common)
  if name == "apgd-t":
    return functools.partial(apgd_t_update, steps=steps, n_target_classes=n_target_classes,
                             restarts=1, eot_iter=eot, record=record, **common)
  if name in ("fab", "fab-t"):
    return functools.partial(fab_update, steps=fab_steps, targeted=name == "fab-t",
                             n_target_classes=n_target_classes,
                             restarts=1 if name == "fab-t" else untargeted_restarts, **common)
  if name == "square":
    return functools.partial(square_update, queries=queries, p_init=p_init, restarts=1,
                             **common)
  raise unknown_name("AutoAttack attack", name, ATTACKS)


def _plan(*, version: str, attacks: Optional[Sequence[str]], **budget
          ) -> tuple[tuple[str, ...], dict]:
  """The attacks to run, in order, and the keyword arguments of :func:`_stage`
  (built once here for its one-line errors: an unknown version or attack)."""
  if version not in VERSIONS:
    raise unknown_name("AutoAttack version", version, VERSIONS)
  names = tuple(attacks) if attacks is not None else VERSIONS[version]
  stage = dict(version=version, **budget)
  for name in names:
    _stage(name, **stage)
  return names, stage


def _clean_fooled(predict_fn: Callable[..., Array], x: Array, y: Array, key: Array, *,
                  randomized: bool) -> Array:
  """(N,) bool: misclassified before any attack (one draw of a randomized model)."""
  return start_from_clean(keyed(predict_fn, randomized), x, y, key).fooled


def recheck(predict: KeyedLogitsFn, best: Best, before: Array, y: Array, key: Array) -> Best:
  """``best`` after one attack, its ``fooled`` re-predicted as the reference
  does: fooled before the attack (``before``), or misclassified by
  ``predict`` at the returned point under the draw ``key`` (a fresh one for
  a randomized model). ``argmax != y`` decides, so an exact tie that argmax
  resolves to the label is not fooled even where the attack's own flag
  (Square's ``margin <= 0``) said so."""
  wrong = jnp.argmax(predict(best.x_adv, key), axis=-1) != y
  return best._replace(fooled=before | wrong)


def _stage_on_batch(logits_fn: Callable[..., Array], predict_fn: Callable[..., Array],
                    x: Array, y: Array, x_adv: Array, done: Array, ids: Array, key: Array,
                    k_check: Array, *, name: str, randomized: bool, **stage) -> Best:
  """One attack of the ensemble on a compacted batch, re-checked
  (:func:`recheck` under ``k_check``): ``x_adv`` is the worst case so far,
  ``done`` marks padding rows (left alone), ``ids`` the examples' indices in
  the caller's batch (their randomness)."""
  best = Best(x_adv, done, jnp.full(y.shape, -jnp.inf, jnp.float32))
  best = _stage(name, **stage)(best, attacked_model(logits_fn, randomized), x, y, key=key,
                               ids=ids)
  return recheck(keyed(predict_fn, randomized), best, done, y, k_check)


# Smallest compacted batch: fewer distinct program sizes for the last few examples.
MIN_BUCKET = 8
# Most examples one compiled attack takes at a time on CPU by default: XLA:CPU
# computes convolution gradients faster per example on small batches (cache),
# e.g. the CAS small CNN 0.49 ms per example at 40 rows against 0.73 at 128.
CPU_BATCH = 40


def default_batch_size(batch_size: Optional[int], n: int) -> int:
  """The most examples one compiled attack of the eager path takes:
  ``batch_size`` if given, else :data:`CPU_BATCH` on CPU and all ``n``
  on other backends."""
  if batch_size is None:
    batch_size = CPU_BATCH if jax.default_backend() == "cpu" else n
  return max(1, min(int(batch_size), n))


def bucket(count: int, cap: int, multiple: int = 1) -> int:
  """Rows a compacted batch of ``count`` examples is padded to.

  Four sizes per doubling (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... in
  units of ``multiple``, which the chunks and the devices must divide), at
  most ``cap`` rounded up to ``multiple``: at most a quarter of the batch is
  padding, and a later call whose counts differ a little mostly finds its
  sizes compiled. (Powers of two padded 39 robust examples to 64, 40% of
  APGD-T's time on the benchmark CNN.)
  """
  units = max(-(-count // multiple), -(-MIN_BUCKET // multiple))
  step = 1 << max(units.bit_length() - 3, 0)
  return min(-(-units // step) * step * multiple, -(-cap // multiple) * multiple)


def pieces(count: int, cap: int, multiple: int = 1) -> list[tuple[int, int]]:
  """``(examples, rows)`` of each piece ``count`` examples are attacked in.

  At most ``cap`` examples a piece, every piece padded to the same
  :func:`bucket` size (one compiled program per attack: a second size
  would cost a compilation, more than the few rows it saves), in the number
  of near-equal pieces, from the fewest possible up to twice that, that
  computes the fewest rows (ties: fewer pieces). 130 examples in pieces of
  at most 40 are 5 of 26 padded to 28 (140 rows), not 40 + 40 + 40 + 10
  (two programs) or 4 of 33 padded to 40 (160 rows).
  """
  if count <= 0:
    return []
  fewest = -(-count // cap)
  equal = lambda k: [(count // k + (i < count % k), bucket(-(-count // k), cap, multiple))
                     for i in range(k)]
  return min((equal(k) for k in range(fewest, 2 * fewest + 1)),
             key=lambda layout: sum(rows for _, rows in layout))


def compacted(rows: np.ndarray, cap: int, multiple: int = 1):
  """Yields ``(padded rows, count)``: ``rows`` in the :func:`pieces` of at
  most ``cap``, each padded by repeating its first row."""
  start = 0
  for count, size in pieces(len(rows), cap, multiple):
    piece = rows[start:start + count]
    start += count
    yield np.concatenate([piece, np.repeat(piece[:1], size - count)]).astype(np.int32), count


def staged(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array,
           randomized: bool, predict_fn: Optional[Callable[..., Array]], return_stages: bool,
           return_indicators: bool, batch_size: Optional[int],
           log: Optional[Callable[[str], None]], sharding, **plan):
  """AutoAttack called with concrete arrays (see the module docstring).

  The arguments are :func:`autoattack`'s. Before each attack the examples
  not yet fooled are gathered in :func:`pieces` of at most ``batch_size``
  (:func:`default_batch_size` if None), padded to one :func:`bucket` size and placed with
  ``sharding`` if given; the attack's compiled program runs on each piece
  and its worst case is written back, with each example's fooled flag
  re-predicted (:func:`recheck`). The reference's lines go to ``log``.
  """
  names, stage = _plan(record=return_indicators, **plan)
  predict_fn = predict_fn or logits_fn
  say = log or (lambda line: None)
  n = x.shape[0]
  cap = default_batch_size(batch_size, n)
  devices = 1 if sharding is None else len(sharding.device_set)
  multiple = math.lcm(max(int(stage["chunks"]), 1), devices)
  place = (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
  x_host, y_host = np.asarray(x), np.asarray(y)
  k_clean, k_attacks = jax.random.split(key)
  t0 = time.perf_counter()
  fooled = np.zeros(n, bool)
  for rows, count in compacted(np.arange(n), cap, multiple):
    f = call_compiled(_clean_fooled, predict_fn, place(x_host[rows]), place(y_host[rows]),
                      k_clean, randomized=randomized)
    if tracing(f):  # constants inside the caller's jit: stay one traced program
      return autoattack.traced(logits_fn, x, y, key=key, randomized=randomized,
                               predict_fn=predict_fn, return_stages=return_stages,
                               return_indicators=return_indicators, **plan)
    fooled[rows[:count]] = np.asarray(f)[:count]
  fooled_after = {"clean": fooled.copy()}
  say(f"initial accuracy: {100 * (1 - fooled.mean()):.2f}%")
  x_adv = x_host.copy()
  flags = {name: np.zeros(n, bool) for name in NAMES}
  for i, name in enumerate(names):
    left = np.flatnonzero(~fooled)
    pieces = list(compacted(left, cap, multiple))
    say(f"running {name}: {len(left)} examples left to attack (robust accuracy "
        f"{100 * (1 - fooled.mean()):.2f}%), batches of "
        f"{'+'.join(str(len(r)) for r, _ in pieces) or '0'}")
    for j, (rows, count) in enumerate(pieces):
      best = call_compiled(_stage_on_batch, logits_fn, predict_fn, *map(place, (
          x_host[rows], y_host[rows], x_adv[rows], np.arange(len(rows)) >= count, rows)),
          jax.random.fold_in(k_attacks, i),
          jax.random.fold_in(jax.random.fold_in(k_clean, i + 1), j), name=name,
          randomized=randomized, **stage)
      real = rows[:count]
      x_adv[real] = np.asarray(best.x_adv)[:count]
      newly = np.asarray(best.fooled)[:count]
      fooled[real] = newly
      for k, v in (best.flags or {}).items():
        flags[k][real] |= np.asarray(v)[:count]
      say(f"{name} - {j + 1}/{len(pieces)} - {int(newly.sum())} out of {count} "
          f"successfully perturbed")
    fooled_after[name] = fooled.copy()
    say(f"robust accuracy after {name.upper()}: {100 * (1 - fooled.mean()):.2f}% "
        f"(total time {time.perf_counter() - t0:.1f} s)")
  return _outputs(jnp.asarray(x_adv), {k: jnp.asarray(v) for k, v in fooled_after.items()},
                  {k: jnp.asarray(v) for k, v in flags.items()}, jnp.asarray(fooled),
                  return_stages=return_stages, return_indicators=return_indicators)


def _outputs(x_adv: Array, stages: dict[str, Array], flags: dict[str, Array], fooled: Array,
             *, return_stages: bool, return_indicators: bool):
  """:func:`autoattack`'s result: ``x_adv``, then the stages and the
  indicators (set only where every attack failed) if asked for."""
  out = (x_adv,)
  if return_stages:
    out += (stages,)
  if return_indicators:
    out += ({k: v & ~fooled for k, v in flags.items()},)
  return out if len(out) > 1 else x_adv


@compiles_itself(eager=staged)
def autoattack(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array,
               eps: float, norm: str = "linf", version: str = "standard",
               attacks: Optional[Sequence[str]] = None, steps: int = 100,
               n_target_classes: int = 9, fab_steps: int = 100, queries: int = 5000,
               p_init: float = 0.8, restarts: Optional[int] = None,
               eot_iter: Optional[int] = None, randomized: bool = False,
               predict_fn: Optional[Callable[..., Array]] = None, chunks: int = 1,
               return_stages: bool = False, return_indicators: bool = False,
               batch_size: Optional[int] = None,
               log: Optional[Callable[[str], None]] = None, sharding=None):
  """AutoAttack: the worst case per example over an ensemble run in sequence.

  Args:
    logits_fn: ``x -> logits``, or ``(x, key) -> logits`` if ``randomized``.
    x: (N, H, W, C) images in [0, 1]; y: (N,) labels.
    key: all randomness; the result is a deterministic function of it.
    eps, norm: the threat model ('linf' or 'l2').
    version: 'standard' | 'plus' | 'rand' (see the module docstring).
    attacks: a custom sequence from ``ATTACKS`` instead of the version's.
    steps: APGD / APGD-T iterations; fab_steps: FAB iterations; queries:
      Square queries. Smaller values make quick tests, not evaluations.
    n_target_classes: targets of APGD-T and FAB-T.
    restarts: restarts of APGD-CE, APGD-DLR and FAB (default: the version's).
    eot_iter: EOT draws per APGD gradient (default: 20 for 'rand', else 1).
    randomized: ``logits_fn`` takes a key: its randomness is drawn afresh for
      every gradient, query and re-prediction.
    predict_fn: the deployed model that re-predicts after each attack and on
      the clean images, deciding which examples are fooled (default
      ``logits_fn``; same calling convention): e.g. a defended pipeline whose
      bare classifier is what the attacks see.
    chunks: see :func:`jaxdef.attacks.common.run_on_robust`.
    return_stages: also return ``{attack: fooled after it (N,) bool}``, the
      cumulative per-example success after each attack as re-predicted by
      ``predict_fn`` (for a randomized model: misclassified under the clean
      draw or under a fresh draw after any attack so far), and 'clean' (jit
      returns dicts with sorted keys: the order is the version's).
    return_indicators: also return ``{indicator: (N,) bool}``, the
      indicators of attack failure (:mod:`jaxdef.attacks.indicators`) the
      APGD attacks recorded inside their loops, set only on the examples
      that every attack failed on (after ``stages`` when both are asked).
    batch_size, log, sharding: called with concrete arrays only (ignored
      when traced): the most examples one compiled attack takes at a time
      (None: 40 on CPU, where small batches run faster per example, all
      still robust on other backends), where the reference's progress lines go
      (e.g. ``print``; None: nowhere), and a ``NamedSharding`` to place the
      compacted batches with (batch axis first).

  Returns:
    ``x_adv`` (N, H, W, C) within the eps-ball and [0, 1]; a tuple ``(x_adv,
    stages, indicators)`` of those asked for.
  """
  names, stage = _plan(version=version, attacks=attacks, norm=norm, eps=eps, steps=steps,
                       n_target_classes=n_target_classes, fab_steps=fab_steps,
                       queries=queries, p_init=p_init, restarts=restarts,
                       eot_iter=eot_iter, chunks=chunks, record=return_indicators)
  updates = [_stage(name, **stage) for name in names]
  model = attacked_model(logits_fn, randomized)
  predict = keyed(predict_fn or logits_fn, randomized)
  k_clean, key = jax.random.split(key)
  best = start_from_clean(predict, x, y, k_clean)
  fooled_after = {"clean": best.fooled}
  for i, (name, update) in enumerate(zip(names, updates)):
    # Losses of different attacks are not comparable: each stage starts afresh.
    before = best.fooled
    best = best._replace(loss=jnp.full_like(best.loss, -jnp.inf))
    best = update(best, model, x, y, key=jax.random.fold_in(key, i))
    best = recheck(predict, best, before, y, jax.random.fold_in(k_clean, i + 1))
    fooled_after[name] = best.fooled
  flags = {**no_flags(x.shape[0]), **(best.flags or {})}
  return _outputs(best.x_adv, fooled_after, flags, best.fooled, return_stages=return_stages,
                  return_indicators=return_indicators)
