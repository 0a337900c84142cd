"""The evaluation suite of docs/methods.md section 6: robust accuracy per attack and
the worst case over attacks.

  results = run_suite(target, x_test, y_test, suite_config=config.eval, key=key)

runs the attacks named in ``suite_config.attacks`` (:mod:`.attacks`) on the
first ``num_examples`` test images and counts an example as robust to an
attack when it is classified correctly both clean and under that attack; the
worst case over all attacks is the "ensemble" column. A randomized target is
scored as the reference library scores its ``rand`` version: the clean image
under one draw of the randomness and the attacked one under a fresh draw
(AutoAttack: a fresh draw after each of its attacks, every one of which
must leave the example classified correctly).

Every attack is one jitted function (compiled once per call, reused for every
batch; the last batch is padded to the same size). Batches may be placed with
a ``NamedSharding`` over the mesh ``data`` axis; jit partitions the attack.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdef import attacks, signals
from jaxdef.attacks.common import keyed
from jaxdef.data.augment import to_float
from jaxdef.errors import ConfigError
from jaxdef.progress import bar as progress_bar
from jaxdef.evaluate.attacks import (INDICATOR, JOINT_NEEDS_HEADS, STAGED, autoattack_protocol,
                                     autoattack_version, stage_order, attack_names,
                                     staged_robust, suite_attack, traced_eps)
from jaxdef.evaluate.target import LogitsFn, Target, as_target

Array = jax.Array


def padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, sharding=None):
  """Yields ``(start, end, xb, yb)`` over ``x`` (uint8 or float images) and
  ``y``: float32 images in [0, 1] and int32 labels, each batch ``batch_size``
  long (the last one padded with copies of its first example; rows from
  ``end - start`` on are padding), placed with ``sharding`` if given."""
  n = len(x)
  for start in range(0, n, batch_size):
    end = min(start + batch_size, n)
    pad = batch_size - (end - start)
    xb, yb = x[start:end], np.asarray(y[start:end])
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
      yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)])
    xb, yb = jnp.asarray(to_float(xb)), jnp.asarray(yb.astype(np.int32))
    if sharding is not None:
      xb, yb = jax.device_put(xb, sharding), jax.device_put(yb, sharding)
    yield start, end, xb, yb


def oracle_flags(target: Target, x: Array, x_adv: Array) -> dict[str, Array]:
  """Per example, for :attr:`Target.oracle`: whether the attack moved the
  reference's prediction off the clean one ('oracle_fooled'), and whether the
  oracle's restoration brings it back ('oracle_restored')."""
  clean_pred = jnp.argmax(target.reference(x), -1)
  return {"oracle_fooled": jnp.argmax(target.reference(x_adv), -1) != clean_pred,
          "oracle_restored": jnp.argmax(target.reference(target.oracle(x, x_adv)), -1)
          == clean_pred}


def rate(hits: np.ndarray, among: np.ndarray) -> float:
  """The share of ``among`` where ``hits`` holds (0 when ``among`` is empty)."""
  return float((hits & among).sum() / max(among.sum(), 1))


# Extras ``draw 1``, ``draw 2``, ...: robust flags of a randomized target under
# further draws of its randomness (``eval.score_draws``).
DRAW = "draw "


def draw_spread(ok: np.ndarray, extra: dict[str, np.ndarray]) -> Optional[dict[str, Any]]:
  """Mean and standard deviation of the accuracy over the scoring draws (the
  first is ``ok`` itself), or None when the target was scored once."""
  draws = [ok] + [extra[k] for k in sorted(extra) if k.startswith(DRAW)]
  if len(draws) < 2:
    return None
  accs = np.array([d.mean() for d in draws])
  return {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)), "draws": len(draws)}


def score_attacked(target: Target, cfg: ml_collections.ConfigDict, xb: Array, yb: Array,
                   x_adv: Array, k: Array, *, draws: int = 1, fresh: bool = True
                   ) -> tuple[Array, dict[str, Array]]:
  """Robust flags of attacked images ``x_adv`` (correct clean AND attacked)
  and the scoring extras: the reference's and the oracle's flags, and for a
  randomized target ``draws - 1`` further scorings (:data:`DRAW`).

  A randomized target is scored as the reference scores it: the clean
  images under one draw of its randomness and the attacked ones under a
  fresh draw (``fresh``; off for the clean column, whose attacked images are
  the clean ones); each further scoring draws both anew.
  """
  predict = keyed(target.predict, target.randomized)
  k_pred = jax.random.fold_in(k, 1 << 20)  # the deployed model's own draws

  def scored(k_d):
    k_adv = jax.random.fold_in(k_d, 1) if fresh else k_d
    clean = jnp.argmax(predict(xb, k_d), -1) == yb
    return clean, jnp.argmax(predict(x_adv, k_adv), -1) == yb

  clean, restored = scored(k_pred)
  extra = {}
  if target.reference is not None:
    extra = {"restored": restored,
             "reference_fooled": jnp.argmax(target.reference(x_adv), -1) != yb}
    if target.oracle is not None:
      extra = {**extra, **oracle_flags(target, xb, x_adv)}
  if target.randomized:
    for d in range(1, draws):
      extra[f"{DRAW}{d}"] = jnp.logical_and(*scored(jax.random.fold_in(k_pred, d)))
  return clean & restored, extra


def score_draws(target: Target, cfg: ml_collections.ConfigDict) -> int:
  """How often a column of ``target`` is scored: ``eval.score_draws`` for a
  randomized target, else once."""
  return int(cfg.get("score_draws", 1)) if target.randomized else 1


def staged_flags(target: Target, name: str, cfg: ml_collections.ConfigDict, x: np.ndarray,
                 y: np.ndarray, *, key: Array, eps: float, batch_size: int, sharding=None,
                 progress=None, stop: Optional[signals.StopFlag] = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """:func:`robust_flags` of AutoAttack (or one of its parts) over all of ``x``.

  AutoAttack runs eagerly (:func:`jaxdef.attacks.autoattack` with concrete
  arrays): one compiled program per stage, each on the examples still
  robust, gathered into a few bucketed batch sizes, as the reference does.
  Each stage's lines (examples left, robust accuracy so far, time) go to
  ``progress``; a stop request is honoured between batches.

  An example is robust when the stages' re-predictions on ``target.predict``
  say so (:func:`jaxdef.evaluate.attacks.staged_robust`): classified
  correctly clean and on the point each attack returned, each time under a
  fresh draw of a randomized target's randomness, as the reference scores
  its ``rand`` version. The attacked images are then scored batch by batch
  for the other extras (:func:`score_attacked`, once).
  """
  def log(line):
    signals.check(stop)
    if progress is not None:
      progress.write(f"  {line}")

  y = np.asarray(y).astype(np.int32)
  x_adv, extra = suite_attack(name, cfg)(target, jnp.asarray(to_float(x)), jnp.asarray(y),
                                         key, eps, batch_size=batch_size, log=log,
                                         sharding=sharding)
  extra = {k: np.asarray(v) for k, v in extra.items()}
  score = jax.jit(functools.partial(score_attacked, target, cfg))
  # The attacked images in the same padded batches as the clean ones, in order.
  attacked = padded_batches(np.asarray(x_adv), y, batch_size, sharding)
  _, scored = over_batches(lambda xb, yb, k: score(xb, yb, next(attacked)[2], k), x, y,
                           key=key, batch_size=batch_size, sharding=sharding,
                           progress=progress, stop=stop)
  return np.asarray(staged_robust(extra)), {**extra, **scored}


def compile_attack(target: Target, name: str, cfg: ml_collections.ConfigDict,
                   eps: float) -> Callable[..., tuple[Array, dict]]:
  """Attack ``name`` of ``cfg`` on ``target``, jitted: ``run(x, y, key, eps) ->
  (robust flags, extras)``, one compilation per batch shape.

  PGD-type attacks take ``eps`` as a traced argument, so one compiled
  function serves a whole eps curve (:func:`eps_curve` builds it once); the
  others are compiled for ``eps`` and ignore the argument. Nothing is cached
  between calls: whoever reuses an attack keeps the function.
  """
  attack = suite_attack(name, cfg)
  staged = name in STAGED
  draws = 1 if staged else score_draws(target, cfg)

  def run(xb, yb, k, eps):
    x_adv, extra = attack(target, xb, yb, k, eps)
    ok, scored = score_attacked(target, cfg, xb, yb, x_adv, k, draws=draws,
                                fresh=name != "clean")
    # AutoAttack (traced here) is scored by its own re-predicting stages, as in staged_flags.
    return (staged_robust(extra) if staged else ok), {**extra, **scored}

  if traced_eps(name):
    return jax.jit(run)
  fixed = jax.jit(functools.partial(run, eps=float(eps)))
  return lambda xb, yb, k, eps: fixed(xb, yb, k)


def robust_flags(target: "Target | LogitsFn", name: str, cfg: ml_collections.ConfigDict,
                 x: np.ndarray, y: np.ndarray, *, key: Array, batch_size: int,
                 eps: Optional[float] = None, sharding=None, progress=None,
                 run: Optional[Callable[..., tuple[Array, dict]]] = None,
                 stop: Optional[signals.StopFlag] = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Per example: correct on the clean AND the attacked input; plus the attack's extras.

  AutoAttack and its parts (:data:`STAGED`) run eagerly, stage by stage, on
  the examples still robust (:func:`staged_flags`). Any other attack
  ``name`` of ``cfg`` (at ``eps`` if given, else ``cfg.eps``) is
  jitted once for all batches (or ``run``, a :func:`compile_attack` of it
  the caller keeps): the last batch is padded with copies of the first
  example and the padding is dropped from the result. A stop request in
  ``stop`` (:func:`jaxdef.signals.stop_requests`) raises
  :class:`jaxdef.signals.StopRequested` before the next batch.
  """
  target = as_target(target)
  eps = float(cfg.eps if eps is None else eps)
  attacks.check_budget(eps=eps, step_size=cfg.pgd_step_size * eps / cfg.eps, steps=1,
                       norm=cfg.norm)
  if run is None and name in STAGED:
    return staged_flags(target, name, cfg, x, y, key=key, eps=eps, batch_size=batch_size,
                        sharding=sharding, progress=progress, stop=stop)
  run = compile_attack(target, name, cfg, eps) if run is None else run
  return over_batches(lambda xb, yb, k: run(xb, yb, k, jnp.float32(eps)), x, y, key=key,
                      batch_size=batch_size, sharding=sharding, progress=progress, stop=stop)


def over_batches(step: Callable[[Array, Array, Array], tuple[Array, dict]], x: np.ndarray,
                 y: np.ndarray, *, key: Array, batch_size: int, sharding=None, progress=None,
                 stop: Optional[signals.StopFlag] = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``step(xb, yb, key_b) -> (flags, extras)`` over the padded batches of
  (``x``, ``y``), the padding dropped and the batches joined; a stop request
  raises :class:`jaxdef.signals.StopRequested` before the next batch."""
  flags, extras = [], []
  for b, (start, end, xb, yb) in enumerate(padded_batches(x, y, batch_size, sharding)):
    signals.check(stop)
    ok, extra = step(xb, yb, jax.random.fold_in(key, b))
    flags.append(np.asarray(ok)[:end - start])
    extras.append({k: np.asarray(v)[:end - start] for k, v in extra.items()})
    if progress is not None:
      progress.update(end - start)
  merged = {k: np.concatenate([e[k] for e in extras]) for k in (extras[0] if extras else {})}
  return np.concatenate(flags), merged


def transfer_failures(per_example: dict[str, np.ndarray], *, white_box: list[str],
                      transfer: list[str]) -> Optional[int]:
  """Examples every white-box attack left robust but a transferred one fooled.

  The transfer-failure indicator of Pintor et al. (2022): adversarial
  examples made on a surrogate (another model, or the bare classifier of a
  transform defense, whose attacks the non-adaptive protocol runs) succeed
  where the attacks that see the defended model itself fail, so those
  attacks' gradients mislead them. Counted on the columns that finished;
  None when either side has none.
  """
  white = [per_example[c] for c in white_box if c in per_example]
  moved = [per_example[c] for c in transfer if c in per_example]
  if not white or not moved:
    return None
  return int((np.logical_and.reduce(white) & ~np.logical_and.reduce(moved)).sum())


def column(target: Target, name: str) -> str:
  """The results column of attack ``name`` run on ``target``."""
  return f"{target.label} {name}" if target.label else name


def suite_runs(cfg: ml_collections.ConfigDict, target: Target, *,
               adaptive: Optional[Target] = None, surrogate: Optional[Target] = None
               ) -> list[tuple[Target, str]]:
  """The (target, attack) pairs :func:`run_suite` runs, in order (see its
  arguments); one-line ConfigErrors for what it would refuse (joint attacks
  without heads, a deterministic AutoAttack on a randomized target)."""
  runs = [(target, n) for n in attack_names(cfg)]
  if target.joint_loss is not None:
    runs += [(target, n) for n in attack_names(cfg, "joint_attacks")]
  if adaptive is not None:
    runs += [(adaptive, n) for n in attack_names(cfg, "adaptive_attacks")]
  if surrogate is not None:
    runs += [(surrogate, n) for n in attack_names(cfg, "transfer_attacks")]
  if any(n.startswith("joint-") and (t.outputs is None or t.joint_loss is None)
         for t, n in runs):
    raise ConfigError(JOINT_NEEDS_HEADS)
  for t, name in runs:  # a deterministic AutoAttack on a randomized target: refused now
    if name == "autoattack":
      autoattack_version(cfg, t.randomized)
  return runs


def run_suite(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
              suite_config: ml_collections.ConfigDict, key: Array,
              batch_size: Optional[int] = None, sharding=None, progress: bool = True,
              adaptive: Optional[Target] = None, surrogate: Optional[Target] = None,
              stop: Optional[signals.StopFlag] = None) -> dict[str, Any]:
  """Clean and per-attack robust accuracy and the worst case over attacks.

  Args:
    model: the :class:`Target` (or a deterministic ``x -> logits``).
    x: test images, uint8 or float in [0, 1], NHWC; y: labels.
    suite_config: see :func:`default_eval_config`; ``attacks`` run on
      ``model`` (and ``joint_attacks`` when it has a ``joint_loss``),
      ``adaptive_attacks`` on ``adaptive``.
    key: randomness of all attacks.
    batch_size: overrides ``suite_config.batch_size``.
    sharding: optional ``NamedSharding`` for the batches (batch axis first).
    progress: show progress per attack (:func:`jaxdef.progress.bar`).
    adaptive: a second target with the same ``predict`` whose attacks see
      the whole defended pipeline (e.g. BPDA + EOT); its columns are named
      ``f"{adaptive.label} {attack}"``.
    surrogate: a target with the same ``predict`` whose attacks see a
      surrogate model (another run, e.g. the same architecture undefended):
      ``transfer_attacks`` run on it, and their examples count in the worst
      case like any attack's (columns ``f"{surrogate.label} {attack}"``).
    stop: a stop flag (:func:`jaxdef.signals.stop_requests`): when it is set
      the running attack is abandoned at its next batch and the results
      hold the attacks finished so far, marked ``partial``.

  Returns:
    ``{'num_examples', 'eps', 'norm', 'clean', 'attacks': {column: acc},
    'ensemble', 'seconds': {column: s}, 'autoattack_stages': {stage: acc},
    'defense_success': {column: rate}}`` (accuracies as fractions;
    ``autoattack_stages`` of the column ``autoattack_stages_of``, each
    stage re-predicted on the deployed model; ``'autoattack_protocols':
    {column: {'version', 'eot_iter', 'label'}}`` for AutoAttack and its parts,
    :func:`jaxdef.evaluate.attacks.autoattack_protocol`;
    ``defense_success`` only with a ``reference``; ``oracle_success`` and
    ``oracle_attacked`` (the examples it is a share of) only with an
    ``oracle``, see :attr:`Target.oracle`), ``'indicators': {column:
    {indicator: examples}}`` for the PGD-family attacks (examples the worst
    case still counts robust, where the attack failed for the reason the
    indicator of attack failure names, :mod:`jaxdef.attacks.indicators`),
    ``'transfer failure'`` under the pseudo-column ``'<label> white-box
    attacks'`` (:func:`transfer_failures`), ``'draws': {column: {'mean', 'std',
    'draws'}}`` for a randomized target scored under ``eval.score_draws`` > 1
    draws (the worst case uses the first; AutoAttack's columns are scored by
    the reference's protocol instead, a fresh draw after each stage, and
    have none), ``'partial'`` when a stop request
    ended it early, and ``'per_example': {column: (n,) bool}``, which
    :func:`write_results` leaves out of the JSON.
  """
  cfg = suite_config
  target = as_target(model)
  runs = suite_runs(cfg, target, adaptive=adaptive, surrogate=surrogate)
  n = min(int(cfg.num_examples), len(x))
  if n < 1:
    raise ConfigError(f"eval.num_examples must be >= 1, got {cfg.num_examples}")
  x, y = x[:n], np.asarray(y[:n])
  batch_size = min(int(batch_size or cfg.batch_size), n)
  per_example, seconds, stages, success = {}, {}, {}, {}
  oracle, oracle_counts, spreads, indicators, protocols = {}, {}, {}, {}, {}
  stopped_by = None
  for i, (t, name) in enumerate(runs):
    col = column(t, name)
    bar = progress_bar(n, f"{col:>10}", "ex", disable=not progress)
    t0 = time.time()
    try:
      ok, extra = robust_flags(t, name, cfg, x, y, key=jax.random.fold_in(key, i),
                               batch_size=batch_size, sharding=sharding, progress=bar,
                               stop=stop)
    except signals.StopRequested as e:
      bar.close()
      stopped_by = str(e)
      break
    bar.close()
    seconds[col] = round(time.time() - t0, 2)
    per_example[col] = ok
    protocol = autoattack_protocol(name, cfg, t.randomized)
    if protocol is not None:
      protocols[col] = {**protocol, "label": column(t, protocol["label"])}
    # The stages of the attack the masking checks judge: the adaptive one if any.
    if name == "autoattack" and t is (adaptive or target):
      stages = {stage: float(np.mean(~extra[stage]))
                for stage in stage_order(cfg, t.randomized)}
      stages_of = col
    if "reference_fooled" in extra and name != "clean":
      success[col] = rate(extra["restored"], extra["reference_fooled"])
    fired = {k[len(INDICATOR):]: v for k, v in extra.items() if k.startswith(INDICATOR)}
    if fired:
      indicators[col] = fired
    spread = draw_spread(ok, extra)
    if spread is not None:
      spreads[col] = spread
    if "oracle_fooled" in extra and name != "clean":
      oracle[col] = rate(extra["oracle_restored"], extra["oracle_fooled"])
      oracle_counts[col] = int(extra["oracle_fooled"].sum())
  clean_ok = per_example.get("clean")
  if clean_ok is None:
    clean_ok, _ = robust_flags(target, "clean", cfg, x, y, key=key,
                               batch_size=batch_size, sharding=sharding)
  worst = np.logical_and.reduce([clean_ok] + list(per_example.values()))
  results = {
      "num_examples": n,
      "eps": float(cfg.eps),
      "norm": cfg.norm,
      "clean": float(clean_ok.mean()),
      "attacks": {k: float(v.mean()) for k, v in per_example.items() if k != "clean"},
      "ensemble": float(worst.mean()),
      "seconds": seconds,
      "autoattack_stages": stages,
      "per_example": {**per_example, "ensemble": worst},
  }
  if protocols:
    results["autoattack_protocols"] = protocols
  if stages:
    results["autoattack_stages_of"] = stages_of
  if success:
    results["defense_success"] = success
  if oracle:
    results["oracle_success"] = oracle
    results["oracle_attacked"] = oracle_counts
  if spreads:
    results["draws"] = spreads
  if indicators:
    # Only where the worst case still counts the example robust: a failure that
    # another attack made up for does not weaken the headline.
    results["indicators"] = {col: {name: int((flags & worst).sum())
                                   for name, flags in fired.items()}
                             for col, fired in indicators.items()}
  judged = adaptive or target
  transferred = transfer_failures(
      per_example, white_box=[column(t, a) for t, a in runs if t is judged and a != "clean"],
      transfer=[column(t, a) for t, a in runs
                if t is surrogate or (adaptive is not None and t is target and a != "clean"
                                      and t.attack_view is not None)])
  if transferred is not None:
    results.setdefault("indicators", {})[column(judged, "white-box attacks")] = {
        "transfer failure": transferred}
  if stopped_by:
    done = set(per_example)
    results["partial"] = {"stopped_by": stopped_by, "during": "attacks",
                          "not_run": [column(t, a) for t, a in runs if column(t, a) not in done]}
  return results
