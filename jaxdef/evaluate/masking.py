"""Gradient-masking checks (docs/methods.md sec. 6): the eps curve, the black-box
check and a stronger PGD, each against the suite's results."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jaxdef.attacks.indicators import MITIGATIONS
from jaxdef.evaluate.attacks import AUTOATTACK_PARTS, step_family, traced_eps
from jaxdef.evaluate.suite import column, compile_attack, robust_flags
from jaxdef.evaluate.target import LogitsFn, Target, as_target
from jaxdef.signals import StopFlag

Array = jax.Array
# Check kinds of the indicators of attack failure: 'indicator:<name>'.
INDICATOR_KIND = "indicator:"
# The kind of a failed attack unit test (jaxdef.evaluate.binarization).
UNIT_TEST_KIND = "unit_test"


def eps_curve(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
              suite_config: ml_collections.ConfigDict, key: Array, batch_size: int,
              sharding=None, attack: Optional[str] = None,
              eps_list: Optional[Sequence[float]] = None,
              stop: Optional[StopFlag] = None) -> list[float]:
  """Robust accuracy under ``attack`` (default ``curve_attack``) at each eps."""
  cfg = suite_config
  attack = attack or cfg.curve_attack
  eps_list = cfg.curve_eps if eps_list is None else eps_list
  target = as_target(model)
  # PGD-type attacks trace eps: one compilation for the whole curve.
  shared = (compile_attack(target, attack, cfg, cfg.eps)
            if traced_eps(attack) else None)
  accs = []
  for j, eps in enumerate(eps_list):
    ok, _ = robust_flags(target, attack, cfg, x, y, key=jax.random.fold_in(key, j),
                         batch_size=batch_size, eps=eps, sharding=sharding, run=shared,
                         stop=stop)
    accs.append(float(ok.mean()))
  return accs


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval of a proportion ``k / n`` (95% for z = 1.96), clipped to [0, 1]."""
  if n <= 0:
    return 0.0, 1.0
  p = min(max(k / n, 0.0), 1.0)
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def judge(name: str, excess: float, n: int, tolerance: float, kind: str = "") -> dict[str, Any]:
  """One check: ``excess`` is the share (of ``n`` examples) by which the evaluation
  looks too strong (e.g. accuracy left at a large eps, or what a stronger attack
  finds beyond the reported one). It fails only when the excess is above
  ``tolerance`` AND the lower end of its 95% Wilson interval is too, so that
  one example out of 32 (3.1 points) is not a masking alarm."""
  low, high = wilson_interval(max(excess, 0.0) * n, n)
  return {"check": name, "kind": kind, "excess": float(excess), "interval": [low, high],
          "examples": int(n),
          "tolerance": float(tolerance), "failed": bool(excess > tolerance and low > tolerance)}


def masking_checks(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
                   results: dict, suite_config: ml_collections.ConfigDict, key: Array,
                   batch_size: Optional[int] = None, sharding=None,
                   stop: Optional[StopFlag] = None) -> tuple[list[str], dict[str, Any]]:
  """The gradient-masking checks of docs/methods.md sec. 6, on the first
  ``masking_num_examples`` examples.

  1. Robust accuracy under ``curve_attack`` does not rise with eps.
  2. It is about 0 at the largest eps of ``curve_eps``.
  3. Square (black-box) did not lower AutoAttack's accuracy after the
     white-box attacks (the reference's check). AutoAttack's stage
     accuracies are re-predicted on the deployed model after each stage
     (for a randomized one under a fresh draw), as its headline is, not the
     attacks' own success flags.
  3b. APGD-CE (AutoAttack's first stage) is not far below the suite's
     fixed-step PGD (the one with the fewest steps): a weak PGD, which
     restarting that same PGD (check 4) cannot reveal.
  4. More PGD steps and restarts (``masking_pgd_steps`` x
     ``masking_pgd_restarts``) do not lower accuracy below the reported worst
     case; nor does PGD-100 below PGD-20.

  5. The indicators of attack failure the suite's PGD-family attacks recorded
     (:func:`indicator_checks`).

  Each compares a share of examples with ``masking_tolerance`` and its 95%
  interval at the number of examples (:func:`judge`). A stop request in
  ``stop`` raises :class:`jaxdef.signals.StopRequested` between batches.

  Returns:
    (failed checks, each a sentence with its evidence; the evidence of all
    checks: ``{'curve_eps', 'curve_acc', ..., 'checks': [judge(...), ...]}``).
  """
  cfg = suite_config
  tol = float(cfg.masking_tolerance)
  n = min(int(cfg.masking_num_examples), int(results["num_examples"]), len(x))
  x, y = x[:n], np.asarray(y[:n])
  batch_size = min(int(batch_size or cfg.batch_size), n)
  checks: list[tuple[dict, str]] = []
  curve = eps_curve(model, x, y, suite_config=cfg, key=jax.random.fold_in(key, 0),
                    batch_size=batch_size, sharding=sharding, stop=stop)
  evidence: dict[str, Any] = {"curve_attack": cfg.curve_attack,
                              "curve_eps": [float(e) for e in cfg.curve_eps],
                              "curve_acc": curve, "num_examples": n}
  pct = lambda a: f"{100 * a:.1f}%"
  for (e0, a0), (e1, a1) in zip(zip(cfg.curve_eps, curve), zip(cfg.curve_eps[1:], curve[1:])):
    checks.append((judge(f"accuracy rises from eps {e0:.4g} to {e1:.4g}", a1 - a0, n, tol,
                         "eps_curve"),
                   f"robust accuracy rises with eps under {cfg.curve_attack}: {pct(a0)} at "
                   f"eps={e0:.4g} but {pct(a1)} at eps={e1:.4g}"))
  if curve:
    checks.append((judge(f"accuracy left at eps {cfg.curve_eps[-1]:.4g}", curve[-1], n, tol,
                         "eps_curve"),
                   f"robust accuracy does not reach ~0 at a large eps (unconstrained attack "
                   f"failure, Pintor et al.): {pct(curve[-1])} under "
                   f"{cfg.curve_attack} at eps={cfg.curve_eps[-1]:.4g}"))

  stages = results.get("autoattack_stages") or {}
  total = int(results["num_examples"])
  if "after square" in stages:
    before = [v for k, v in stages.items() if k != "after square"]
    if before:
      checks.append((judge("Square beyond the white-box attacks",
                           min(before) - stages["after square"], total, tol, "black_box"),
                     f"the black-box Square attack is stronger than the white-box attacks: "
                     f"AutoAttack accuracy {pct(min(before))} before Square, "
                     f"{pct(stages['after square'])} after"))
  acc = results["attacks"]
  pgd_columns = sorted((int(k[len(prefix):]), k) for k in acc
                       for prefix in [column(as_target(model), "pgd")]
                       if k.startswith(prefix) and k[len(prefix):].isdigit())
  if "after apgd-ce" in stages and pgd_columns:
    steps_used, weakest = pgd_columns[0]
    checks.append((judge(f"APGD-CE beyond PGD-{steps_used}",
                         acc[weakest] - stages["after apgd-ce"], total, tol, "weak_attack"),
                   f"APGD-CE (AutoAttack's first stage) finds more than the suite's "
                   f"PGD-{steps_used}: {pct(stages['after apgd-ce'])} vs {pct(acc[weakest])}; "
                   f"fixed-step PGD is weak for this model"))
  p20, p100 = (column(as_target(model), f"pgd{k}") for k in (20, 100))
  if p20 in acc and p100 in acc:
    checks.append((judge("PGD-100 beyond PGD-20", acc[p20] - acc[p100], total, tol,
                         "more_steps"),
                   f"more PGD steps keep lowering accuracy: PGD-20 {pct(acc[p20])}, "
                   f"PGD-100 {pct(acc[p100])}"))

  steps, restarts = int(cfg.masking_pgd_steps), int(cfg.masking_pgd_restarts)
  strong_cfg = ml_collections.ConfigDict(cfg.to_dict())
  strong_cfg.pgd_restarts = restarts
  strong, _ = robust_flags(model, f"pgd{steps}", strong_cfg, x, y,
                           key=jax.random.fold_in(key, 1), batch_size=batch_size,
                           sharding=sharding, stop=stop)
  reported = results["per_example"]["ensemble"][:n]
  evidence.update(strong_pgd=f"PGD-{steps} x {restarts} restarts",
                  strong_pgd_acc=float(strong.mean()), reported_acc=float(reported.mean()))
  checks.append((judge(f"PGD-{steps} x {restarts} beyond the reported worst case",
                       reported.mean() - strong.mean(), n, tol, "more_steps"),
                 f"a stronger PGD (PGD-{steps}, {restarts} restarts) finds more: "
                 f"{pct(strong.mean())} vs the reported worst case {pct(reported.mean())} "
                 f"on the first {n} examples"))
  checks += indicator_checks(results, tol, as_target(model).label, cfg)
  evidence["checks"] = [c for c, _ in checks]
  failed = [f"{sentence} (95% interval of the excess {interval_text(c)}, tolerance "
            f"{100 * tol:.1f} points)" for c, sentence in checks if c["failed"]]
  return failed, evidence


def interval_text(check: dict[str, Any]) -> str:
  """``'0.6-16.2 points over 32 examples'`` for a :func:`judge` record."""
  low, high = check["interval"]
  return f"{100 * low:.1f}-{100 * high:.1f} points over {check['examples']} examples"


def next_evaluations(kinds: Sequence[str], *, transform: bool, heads: bool,
                     randomized: bool) -> list[str]:
  """What to run next when checks of these ``kinds`` failed, most specific first:
  the adaptive evaluations of docs/methods.md section 6 that fit the model."""
  steps: list[str] = []
  if {"eps_curve", "black_box"} & set(kinds):
    if transform:
      steps.append("BPDA through the input transformation (eval.adaptive_attacks with "
                    "eval.adaptive_backward='bpda'), or exact gradients if it is differentiable")
    if heads:
      steps.append("the joint attacks on the final and auxiliary-head losses "
                   "(eval.joint_attacks=joint-pgd100)")
    if randomized:
      steps.append("EOT over more draws (eval.eot_samples, eval.aa_eot_iter)")
    steps.append("an attack with another loss or no gradient (apgd-dlr, square) and a "
                 "check that the input gradients are neither zero nor non-finite")
  if "weak_attack" in kinds:
    steps.append("quote AutoAttack (or APGD-CE), not the fixed-step PGD; tune PGD's step "
                 "size or steps before using it alone")
  for kind in kinds:
    if kind.startswith(INDICATOR_KIND) and kind[len(INDICATOR_KIND):] in MITIGATIONS:
      name = kind[len(INDICATOR_KIND):]
      steps.append(f"{name} (indicator of attack failure): {MITIGATIONS[name]}")
  if UNIT_TEST_KIND in kinds:
    steps.append("a stronger or different attack, since the suite's missed adversarial "
                 "examples that exist (attack unit test): more steps and restarts, "
                 "APGD-CE / AutoAttack, another loss (eval.unit_test='full' tests each)")
  if "more_steps" in kinds:
    steps.append("more steps and restarts (pgd100 with eval.pgd_restarts=5, or "
                 "eval.aa_version='plus')")
  return steps


def headline(results: dict[str, Any], failed_kinds: Sequence[str], reasons: Sequence[str], *,
             transform: bool, heads: bool, randomized: bool) -> dict[str, Any]:
  """The number to quote, the worst case over every attack run (the adaptive and
  joint ones included), marked unreliable with the failed checks' reasons and
  the evaluations to run next."""
  return {"robust_accuracy": float(results["ensemble"]), "reliable": not reasons,
          "reasons": list(reasons),
          "next": next_evaluations(failed_kinds, transform=transform, heads=heads,
                                   randomized=randomized) if reasons else []}



def attack_steps(attack: str, cfg: ml_collections.ConfigDict) -> tuple[str, int]:
  """(family, iterations) of a suite attack name: ``pgd20`` -> ('pgd', 20),
  ``joint-pgd100`` -> ('joint-pgd', 100), AutoAttack and its APGD parts ->
  ('apgd', ``aa_steps``), ``cw`` -> ('cw', ``cw_steps``), FGSM one step;
  other attacks ('other', 0)."""
  family, steps = step_family(attack)
  if steps is not None:
    return family, steps
  if attack == "autoattack" or (attack in AUTOATTACK_PARTS and attack.startswith("apgd")):
    return "apgd", int(cfg.get("aa_steps", 100))
  if attack in ("cw", "joint-cw"):
    return attack, int(cfg.get("cw_steps", 30))
  if attack in ("fgsm", "joint-fgsm"):
    return attack, 1
  return "other", 0


def answered_by(indicator: str, attack: str, others: Sequence[str],
                cfg: ml_collections.ConfigDict) -> Optional[str]:
  """The first of ``others`` (attacks the suite ran on the same target) that is
  ``indicator``'s mitigation for ``attack``, or None.

  The suite counts an indicator only on examples still robust in the worst
  case, i.e. under every other attack too. Where one of them is the
  indicator's remedy, the remedy was applied and did not break those
  examples, so the flag says how ``attack`` failed, not that the headline is
  too high: "incomplete optimisation" is answered by the same attack with
  more iterations (or APGD, PGD with more steps and a schedule, for PGD and
  FGSM); "non-converging attack" by APGD (its step-size schedule) for PGD and
  C&W. Silent success (an adversarial point was seen: the example is not
  robust) and unavailable gradients (every gradient attack shares them) have
  no answer among the suite's columns.
  """
  family, steps = attack_steps(attack, cfg)
  for other in others:
    if other == attack:
      continue
    o_family, o_steps = attack_steps(other, cfg)
    if indicator == "incomplete optimisation" and o_steps > steps and (
        o_family == family or (family in ("pgd", "fgsm") and o_family == "apgd")):
      return other
    if indicator == "non-converging attack" and family in ("pgd", "cw") and o_family == "apgd":
      return other
  return None


def indicator_checks(results: dict[str, Any], tolerance: float, label: str = "",
                     suite_config: Optional[ml_collections.ConfigDict] = None
                     ) -> list[tuple[dict, str]]:
  """A :func:`judge` record and a sentence per (attack, indicator of attack
  failure) of ``results['indicators']``: it fails when the share of examples
  where it holds is above the tolerance, interval included, unless another
  attack of the same target is its remedy (:func:`answered_by`, named in the
  check). With a target ``label`` (the adaptive target the checks judge)
  only its columns count: the non-adaptive ones are reported but do not make
  the headline."""
  n = int(results["num_examples"])
  cfg = suite_config or ml_collections.ConfigDict()
  prefix = label + " " if label else ""
  ran = [c[len(prefix):] for c in results.get("attacks", {}) if c.startswith(prefix)]
  out = []
  for col, fired in (results.get("indicators") or {}).items():
    if label and not col.startswith(prefix):
      continue
    for name, count in fired.items():
      remedy = answered_by(name, col[len(prefix):], ran, cfg) if col.startswith(prefix) else None
      suffix = (f" (its remedy, {prefix}{remedy}, ran and left them robust)"
                if remedy and count else "")
      check = judge(f"{name} under {col}{suffix}", count / max(n, 1), n, tolerance,
                    INDICATOR_KIND + name)
      check["failed"] = check["failed"] and remedy is None
      out.append((check, f"{name} under {col} on {count} of {n} examples: "
                         f"{MITIGATIONS[name]}"))
  return out
