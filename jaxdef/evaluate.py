"""The evaluation suite of METHODS.md section 6: robust accuracy, masking checks, plots.

  results = evaluate_and_report(logits_fn, x_test, y_test, eval_config=config.eval,
                                workdir=workdir, key=jax.random.key(0))

runs the attacks named in ``eval_config.attacks`` (default: clean, FGSM,
PGD-20, PGD-100, C&W-inf, AutoAttack) on the first ``num_examples`` test
images, counts an example as robust to an attack when it is classified
correctly both clean and under that attack, reports the worst case over all
attacks ("ensemble"), runs the gradient-masking checks, prints a Markdown
table and writes ``workdir/eval/results.json``, ``results.md`` and
``eps_curve.png``.

Every attack is one jitted function (compiled once, reused for every batch;
the last batch is padded to the same size). Batches may be placed with a
``NamedSharding`` over the mesh ``data`` axis; jit partitions the attack.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxdef import attacks
from jaxdef.attacks.autoattack import ATTACKS as AUTOATTACK_PARTS
from jaxdef.attacks.common import keyed
from jaxdef.attacks.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from jaxdef.data.augment import to_float
from jaxdef.errors import ConfigError, unknown_name

Array = jax.Array
LogitsFn = Callable[[Array], Array]
# An attack as the suite runs it: (target, x, y, key, eps) -> (x_adv, {name: (N,) bool}).
SuiteAttack = Callable[..., tuple[Array, dict]]


def default_eval_config(eps: Optional[float] = None,
                        norm: Optional[str] = None) -> ml_collections.ConfigDict:
  """``config.eval``: the suite of METHODS.md sec. 6 for threat model (eps, norm).

  Left unset (None), ``eps``, ``norm``, ``pgd_step_size`` (eps / 4) and
  ``curve_eps`` (eps x 1/4 ... 8) follow the run's training attack: see
  :func:`resolve_eval_config`. Every base config carries this section, so
  ``--config.eval.FIELD=value`` works on any config file.
  """
  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.num_examples = 1000          # first test examples evaluated (stated in the table)
  c.batch_size = 250             # a multiple of the number of devices
  c.attacks = "clean,fgsm,pgd20,pgd100,cw,autoattack"
  c.eps = placeholder(float) if eps is None else float(eps)
  c.norm = placeholder(str) if norm is None else norm
  c.pgd_step_size = placeholder(float)
  c.curve_eps = placeholder(tuple)
  if eps is not None:
    resolve_eval_config(c, eps=eps, norm=norm or "linf", in_place=True)
  c.pgd_restarts = 1
  c.pgd_random_start = True      # the CAS/FSR papers' protocol: False (and step 0.8/255)
  # Run in addition when the model has auxiliary heads (CAS, FSR): PGD on the
  # final plus the heads' losses (METHODS.md sec. 6, adaptive protocol).
  c.joint_attacks = "joint-pgd20,joint-pgd100"
  # Input-transformation defenses (NIP, PSSR): 'none' or a registered
  # transform. ``attacks`` then attack the bare classifier (the papers'
  # non-adaptive protocol) and ``adaptive_attacks`` the whole pipeline.
  c.transform = "none"
  c.adaptive_attacks = "pgd20,pgd100,autoattack"
  c.adaptive_backward = "bpda"   # 'bpda' (identity backward) or 'exact'
  c.eot_samples = 10             # gradient draws per step on randomized pipelines
  c.cw_steps = 30
  c.cw_kappa = 50.0
  c.aa_version = "standard"
  c.aa_steps = 100               # APGD iterations inside AutoAttack
  c.aa_fab_steps = 100
  c.aa_queries = 5000            # Square queries
  c.aa_chunks = 5                # compute skipped for chunks with no robust example left
  c.curve_attack = "pgd20"
  c.masking_checks = True
  c.masking_num_examples = 200   # examples for the eps curve and the stronger-PGD check
  c.masking_pgd_steps = 100
  c.masking_pgd_restarts = 5
  c.masking_tolerance = 0.03     # accuracy points (as a fraction) a check may be off by
  c.seed = 0
  return c


def resolve_eval_config(eval_config: ml_collections.ConfigDict, *, eps: float, norm: str,
                        in_place: bool = False) -> ml_collections.ConfigDict:
  """Fills the unset threat-model fields of ``eval_config`` from (eps, norm).

  ``pgd_step_size`` defaults to eps / 4 (2/255 at 8/255) and ``curve_eps`` to
  eps x (1/4, 1/2, 1, 2, 4, 8), capped at 1 for L-inf.
  """
  c = eval_config if in_place else ml_collections.ConfigDict(eval_config.to_dict())
  if c.eps is None:
    c.eps = float(eps)
  if c.norm is None:
    c.norm = norm
  if c.pgd_step_size is None:
    c.pgd_step_size = c.eps / 4
  if c.curve_eps is None:
    c.curve_eps = tuple(min(c.eps * m, 1.0) if c.norm == "linf" else c.eps * m
                        for m in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0))
  return c


# ----------------------------------------------------------------------------
# What is attacked.

@dataclasses.dataclass(frozen=True)
class Target:
  """What the suite scores, and what its attacks see (METHODS.md sec. 6).

  An example counts as robust to an attack when ``predict`` classifies it
  correctly both clean and attacked. The attacks compute their gradients (and
  queries) on ``attack_view``:

  * a plain model: ``attack_view`` is ``predict`` (the default);
  * an input-transformation defense ``classifier(t(x))``: the bare
    classifier for the papers' non-adaptive protocol, or
    :func:`jaxdef.attacks.defended_logits_fn` (BPDA) for the adaptive one;
  * a model with auxiliary heads (CAS, FSR): ``outputs`` and ``joint_loss``
    give the 'joint-pgdN' attacks, which maximise the final loss plus the
    heads' losses.

  Attributes:
    predict: the deployed model, ``x -> logits`` (``(x, key) -> logits``
      when ``randomized``).
    attack_view: what the attacks run on (default ``predict``), same calling
      convention.
    randomized: both take a key; every gradient is then averaged over
      ``eot_samples`` draws (EOT) and AutoAttack should be the 'rand' version.
    eot_samples: gradient draws per attack step when ``randomized``.
    outputs: ``x -> ModelOutput`` of the deployed model (joint attacks).
    joint_loss: ``(ModelOutput, y) -> (N,)`` to maximise (joint attacks).
    reference: the bare classifier ``x -> logits``; when given, each attack
      also reports the defense success rate: of the attacked examples that
      fool the reference, the share ``predict`` classifies correctly.
    label: names this target's columns in the results ('' for the main one).

  Targets are equal when their fields are the same objects: the suite's
  compiled attacks are cached per target.
  """
  predict: Callable[..., Array]
  attack_view: Optional[Callable[..., Array]] = None
  randomized: bool = False
  eot_samples: int = 1
  outputs: Optional[Callable[[Array], dict]] = None
  joint_loss: Optional[Callable[[dict, Array], Array]] = None
  reference: Optional[LogitsFn] = None
  label: str = ""

  @property
  def view(self) -> Callable[..., Array]:
    return self.predict if self.attack_view is None else self.attack_view


def as_target(model: "Target | LogitsFn") -> Target:
  """A deterministic ``x -> logits`` function as a :class:`Target`."""
  return model if isinstance(model, Target) else Target(predict=model)


# ----------------------------------------------------------------------------
# Attacks by name.

# Attacks whose budget may be traced: one compilation serves every eps of a curve.
_TRACEABLE = re.compile(r"fgsm|cw|stepll|r\+stepll|(joint-)?pgd\d+")


JOINT_NEEDS_HEADS = "joint attacks need a model with auxiliary heads (defense cas or fsr)"


def _joint_loss(target: Target, y: Array) -> Callable[[Array, Array], Array]:
  if target.outputs is None or target.joint_loss is None:
    raise ConfigError(JOINT_NEEDS_HEADS)
  return lambda z, key: target.joint_loss(target.outputs(z), y)


def suite_attack(name: str, cfg: ml_collections.ConfigDict) -> SuiteAttack:
  """The attack called ``name`` in ``cfg.attacks`` as
  ``(target, x, y, key, eps) -> (x_adv, extras)``.

  Names: clean, fgsm, pgdN (N steps, e.g. pgd20), joint-pgdN (PGD on the
  final plus auxiliary-head losses), cw, stepll, r+stepll, iterll (the AAD
  paper's least-likely-class attacks), autoattack, apgd-ce, apgd-dlr,
  apgd-t, fab, fab-t, square. PGD's step is ``pgd_step_size`` scaled with
  eps; ``pgd_random_start`` applies to pgdN and joint-pgdN.
  """
  norm = cfg.norm
  step = lambda eps: cfg.pgd_step_size * eps / cfg.eps
  adaptive = lambda t: dict(randomized=t.randomized, eot_samples=t.eot_samples)
  if name == "clean":
    return lambda t, x, y, key, eps: (x, {})
  if name == "fgsm":
    return lambda t, x, y, key, eps: (attacks.fgsm(t.view, x, y, key=key, eps=eps, norm=norm,
                                                   **adaptive(t)), {})
  match = re.fullmatch(r"(joint-)?pgd(\d+)", name)
  if match:
    def run_pgd(t, x, y, key, eps):
      loss_fn = _joint_loss(t, y) if match.group(1) else None
      return attacks.pgd(t.view, x, y, key=key, eps=eps, step_size=step(eps),
                         steps=int(match.group(2)), norm=norm, restarts=cfg.pgd_restarts,
                         random_start=cfg.get("pgd_random_start", True), loss_fn=loss_fn,
                         **adaptive(t)), {}
    return run_pgd
  if name in LEAST_LIKELY:
    return functools.partial(_least_likely, kind=name, norm=norm)
  if name == "cw":
    return lambda t, x, y, key, eps: (attacks.pgd(
        t.view, x, y, key=key, eps=eps, step_size=step(eps), steps=cfg.cw_steps, norm=norm,
        loss="cw", kappa=cfg.cw_kappa, **adaptive(t)), {})
  aa = dict(norm=norm, steps=cfg.aa_steps, fab_steps=cfg.aa_fab_steps,
            queries=cfg.aa_queries, chunks=cfg.aa_chunks)
  if name == "autoattack":
    return functools.partial(_autoattack_with_stages, version=cfg.aa_version, **aa)
  if name in AUTOATTACK_PARTS:
    return functools.partial(_autoattack_with_stages, attacks=(name,), **aa)
  raise unknown_name("eval attack", name, ["clean", "fgsm", "pgdN", "joint-pgdN", "cw",
                                           *LEAST_LIKELY, "autoattack", *AUTOATTACK_PARTS])


# The attacks of the AAD paper's evaluation (Kurakin et al. 2017; Tramer et al. 2018).
LEAST_LIKELY = ("stepll", "r+stepll", "iterll")


def iterll_steps(eps: float) -> int:
  """Iterations of the iterative least-likely attack at step 1/255: Kurakin et
  al.'s ``min(255 eps + 4, 1.25 * 255 eps)`` (80 at eps 0.3, 10 at 8/255)."""
  return max(1, int(round(min(255 * eps + 4, 1.25 * 255 * eps))))


def _least_likely(t, x, y, key, eps, *, kind: str, norm: str):
  """StepLL, R+StepLL or iterative LL: targeted steps towards the class the
  attacked model finds least likely on the clean input.

  StepLL: one step of size eps; R+StepLL: a random step of eps/2
  (``half_sign``), then one of eps/2; iterative LL: ``iterll_steps(eps)``
  steps of 1/255 (needs a concrete eps).
  """
  target = jnp.argmin(keyed(t.view, t.randomized)(x, key), axis=-1)
  if kind == "stepll":
    budget = dict(steps=1, step_size=eps, init="none")
  elif kind == "r+stepll":
    budget = dict(steps=1, step_size=eps / 2, init="half_sign")
  else:  # only here is eps needed as a number (StepLL's eps may be traced)
    budget = dict(steps=iterll_steps(eps), step_size=1 / 255, init="none")
  x_adv = attacks.pgd(t.view, x, target, key=key, eps=eps, norm=norm, targeted=True,
                      randomized=t.randomized, eot_samples=t.eot_samples, **budget)
  return x_adv, {}


def _autoattack_with_stages(t, x, y, key, eps, **kwargs):
  x_adv, stages = attacks.autoattack(t.view, x, y, key=key, eps=eps, return_stages=True,
                                     randomized=t.randomized,
                                     eot_iter=t.eot_samples if t.randomized else None, **kwargs)
  return x_adv, {f"after {k}": v for k, v in stages.items() if k != "clean"}


def _stage_order(cfg) -> list[str]:
  return [f"after {k}" for k in AUTOATTACK_VERSIONS.get(cfg.aa_version, ())]


def split_names(names: str) -> list[str]:
  return [n.strip() for n in str(names).split(",") if n.strip()]


def attack_names(cfg: ml_collections.ConfigDict, field: str = "attacks") -> list[str]:
  names = split_names(cfg.get(field, ""))
  if not names and field == "attacks":
    raise ConfigError("eval.attacks names no attack")
  for n in names:
    suite_attack(n, cfg)  # one-line error for an unknown name, before any work
  return names


# ----------------------------------------------------------------------------
# Running attacks over a test set.

def _batches(n: int, batch_size: int):
  """(start, stop) of each batch; the last one is padded to ``batch_size`` by the caller."""
  return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


_COMPILED: dict = {}


def _compiled(target: Target, name: str, cfg: ml_collections.ConfigDict, eps: float):
  """One jit per (target, attack, config): reused across batches and calls.

  PGD-type attacks take eps as a traced argument (one compilation for the
  whole eps curve); the others are compiled per eps.
  """
  traced = bool(_TRACEABLE.fullmatch(name))
  key = (target, name, None if traced else float(eps), repr(sorted(cfg.items())))
  if key not in _COMPILED:
    attack = suite_attack(name, cfg)
    predict = keyed(target.predict, target.randomized)

    def run(xb, yb, k, eps):
      x_adv, extra = attack(target, xb, yb, k, eps)
      k_pred = jax.random.fold_in(k, 1 << 20)  # the deployed model's own draws
      clean = jnp.argmax(predict(xb, k_pred), -1) == yb
      restored = jnp.argmax(predict(x_adv, k_pred), -1) == yb
      if target.reference is not None:
        extra = {**extra, "restored": restored,
                 "reference_fooled": jnp.argmax(target.reference(x_adv), -1) != yb}
      return clean & restored, extra

    if traced:
      run = jax.jit(run)
    else:
      run = jax.jit(functools.partial(run, eps=float(eps)))
    if len(_COMPILED) >= 64:
      _COMPILED.pop(next(iter(_COMPILED)))
    _COMPILED[key] = (run, traced)
  return _COMPILED[key]


def robust_flags(target: "Target | LogitsFn", name: str, cfg: ml_collections.ConfigDict,
                 x: np.ndarray, y: np.ndarray, *, key: Array, batch_size: int,
                 eps: Optional[float] = None, sharding=None, progress: Optional[tqdm] = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Per example: correct on the clean AND the attacked input; plus the attack's extras.

  Attack ``name`` of ``cfg`` (at ``eps`` if given, else ``cfg.eps``) is
  jitted once for all batches: the last batch is padded with copies of the
  first example and the padding is dropped from the result.
  """
  target = as_target(target)
  eps = float(cfg.eps if eps is None else eps)
  attacks.check_budget(eps=eps, step_size=cfg.pgd_step_size * eps / cfg.eps, steps=1,
                       norm=cfg.norm)
  run, traced = _compiled(target, name, cfg, eps)
  flags, extras = [], []
  for b, (start, stop) in enumerate(_batches(len(x), batch_size)):
    pad = batch_size - (stop - start)
    xb, yb = x[start:stop], y[start:stop]
    if pad:
      xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
      yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)])
    xb, yb = jnp.asarray(to_float(xb)), jnp.asarray(yb.astype(np.int32))
    if sharding is not None:
      xb, yb = jax.device_put(xb, sharding), jax.device_put(yb, sharding)
    k = jax.random.fold_in(key, b)
    ok, extra = run(xb, yb, k, jnp.float32(eps)) if traced else run(xb, yb, k)
    flags.append(np.asarray(ok)[:stop - start])
    extras.append({k: np.asarray(v)[:stop - start] for k, v in extra.items()})
    if progress is not None:
      progress.update(stop - start)
  merged = {k: np.concatenate([e[k] for e in extras]) for k in (extras[0] if extras else {})}
  return np.concatenate(flags), merged


def column(target: Target, name: str) -> str:
  """The results column of attack ``name`` run on ``target``."""
  return f"{target.label} {name}" if target.label else name


def run_suite(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
              suite_config: ml_collections.ConfigDict, key: Array,
              batch_size: Optional[int] = None, sharding=None, progress: bool = True,
              adaptive: Optional[Target] = None) -> dict[str, Any]:
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
    progress: show a tqdm bar per attack.
    adaptive: a second target with the same ``predict`` whose attacks see
      the whole defended pipeline (e.g. BPDA + EOT); its columns are named
      ``f"{adaptive.label} {attack}"``.

  Returns:
    ``{'num_examples', 'eps', 'norm', 'clean', 'attacks': {column: acc},
    'ensemble', 'seconds': {column: s}, 'autoattack_stages': {stage: acc},
    'defense_success': {column: rate}}`` (accuracies as fractions;
    ``defense_success`` only with a ``reference``) and ``'per_example':
    {column: (n,) bool}``, which :func:`write_results` leaves out of the JSON.
  """
  cfg = suite_config
  target = as_target(model)
  runs = [(target, n) for n in attack_names(cfg)]
  if target.joint_loss is not None:
    runs += [(target, n) for n in attack_names(cfg, "joint_attacks")]
  if adaptive is not None:
    runs += [(adaptive, n) for n in attack_names(cfg, "adaptive_attacks")]
  if any(n.startswith("joint-") and (t.outputs is None or t.joint_loss is None)
         for t, n in runs):
    raise ConfigError(JOINT_NEEDS_HEADS)
  n = min(int(cfg.num_examples), len(x))
  if n < 1:
    raise ConfigError(f"eval.num_examples must be >= 1, got {cfg.num_examples}")
  x, y = x[:n], np.asarray(y[:n])
  batch_size = min(int(batch_size or cfg.batch_size), n)
  per_example, seconds, stages, success = {}, {}, {}, {}
  for i, (t, name) in enumerate(runs):
    col = column(t, name)
    bar = tqdm(total=n, desc=f"{col:>10}", unit="ex", disable=not progress, leave=True)
    t0 = time.time()
    ok, extra = robust_flags(t, name, cfg, x, y, key=jax.random.fold_in(key, i),
                             batch_size=batch_size, sharding=sharding, progress=bar)
    bar.close()
    seconds[col] = round(time.time() - t0, 2)
    per_example[col] = ok
    # The stages of the attack the masking checks judge: the adaptive one if any.
    if name == "autoattack" and t is (adaptive or target):
      stages = {stage: float(np.mean(~extra[stage])) for stage in _stage_order(cfg)}
    if "reference_fooled" in extra and name != "clean":
      fooled = extra["reference_fooled"]
      success[col] = float((extra["restored"] & fooled).sum() / max(fooled.sum(), 1))
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
  if success:
    results["defense_success"] = success
  return results


# ----------------------------------------------------------------------------
# Gradient-masking checks (METHODS.md sec. 6).

def eps_curve(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
              suite_config: ml_collections.ConfigDict, key: Array, batch_size: int,
              sharding=None, attack: Optional[str] = None,
              eps_list: Optional[Sequence[float]] = None) -> list[float]:
  """Robust accuracy under ``attack`` (default ``curve_attack``) at each eps."""
  cfg = suite_config
  attack = attack or cfg.curve_attack
  eps_list = cfg.curve_eps if eps_list is None else eps_list
  accs = []
  for j, eps in enumerate(eps_list):
    ok, _ = robust_flags(model, attack, cfg, x, y, key=jax.random.fold_in(key, j),
                         batch_size=batch_size, eps=eps, sharding=sharding)
    accs.append(float(ok.mean()))
  return accs


def masking_checks(model: "Target | LogitsFn", x: np.ndarray, y: np.ndarray, *,
                   results: dict, suite_config: ml_collections.ConfigDict, key: Array,
                   batch_size: Optional[int] = None, sharding=None
                   ) -> tuple[list[str], dict[str, Any]]:
  """The gradient-masking checks of METHODS.md sec. 6, on the first
  ``masking_num_examples`` examples.

  1. Robust accuracy under ``curve_attack`` does not rise with eps.
  2. It is about 0 (<= tolerance) at the largest eps of ``curve_eps``.
  3. Square (black-box) did not lower AutoAttack's accuracy after the
     white-box attacks by more than the tolerance (the reference's check).
  4. More PGD steps and restarts (``masking_pgd_steps`` x
     ``masking_pgd_restarts``) do not lower accuracy below the reported worst
     case by more than the tolerance; nor does PGD-100 below PGD-20.

  Returns:
    (failed checks, each a sentence with its evidence; the evidence of all
    checks: ``{'curve_eps', 'curve_acc', ...}``).
  """
  cfg = suite_config
  tol = float(cfg.masking_tolerance)
  n = min(int(cfg.masking_num_examples), int(results["num_examples"]), len(x))
  x, y = x[:n], np.asarray(y[:n])
  batch_size = min(int(batch_size or cfg.batch_size), n)
  failed = []
  curve = eps_curve(model, x, y, suite_config=cfg, key=jax.random.fold_in(key, 0),
                    batch_size=batch_size, sharding=sharding)
  evidence: dict[str, Any] = {"curve_attack": cfg.curve_attack,
                              "curve_eps": [float(e) for e in cfg.curve_eps],
                              "curve_acc": curve, "num_examples": n}
  pct = lambda a: f"{100 * a:.1f}%"
  for (e0, a0), (e1, a1) in zip(zip(cfg.curve_eps, curve), zip(cfg.curve_eps[1:], curve[1:])):
    if a1 > a0 + tol:
      failed.append(f"robust accuracy rises with eps under {cfg.curve_attack}: {pct(a0)} at "
                    f"eps={e0:.4g} but {pct(a1)} at eps={e1:.4g}")
  if curve and curve[-1] > tol:
    failed.append(f"robust accuracy does not reach ~0 at a large eps: {pct(curve[-1])} under "
                  f"{cfg.curve_attack} at eps={cfg.curve_eps[-1]:.4g}")

  stages = results.get("autoattack_stages") or {}
  if "after square" in stages:
    before = [v for k, v in stages.items() if k != "after square"]
    if before and stages["after square"] < min(before) - tol:
      failed.append(f"the black-box Square attack is stronger than the white-box attacks: "
                    f"AutoAttack accuracy {pct(min(before))} before Square, "
                    f"{pct(stages['after square'])} after")
  acc = results["attacks"]
  p20, p100 = (column(as_target(model), f"pgd{k}") for k in (20, 100))
  if p20 in acc and p100 in acc and acc[p100] < acc[p20] - tol:
    failed.append(f"more PGD steps keep lowering accuracy: PGD-20 {pct(acc[p20])}, "
                  f"PGD-100 {pct(acc[p100])}")

  steps, restarts = int(cfg.masking_pgd_steps), int(cfg.masking_pgd_restarts)
  strong_cfg = ml_collections.ConfigDict(cfg.to_dict())
  strong_cfg.pgd_restarts = restarts
  strong, _ = robust_flags(model, f"pgd{steps}", strong_cfg, x, y,
                           key=jax.random.fold_in(key, 1), batch_size=batch_size,
                           sharding=sharding)
  reported = results["per_example"]["ensemble"][:n]
  evidence.update(strong_pgd=f"PGD-{steps} x {restarts} restarts",
                  strong_pgd_acc=float(strong.mean()), reported_acc=float(reported.mean()))
  if strong.mean() < reported.mean() - tol:
    failed.append(f"a stronger PGD (PGD-{steps}, {restarts} restarts) finds more: "
                  f"{pct(strong.mean())} vs the reported worst case {pct(reported.mean())} "
                  f"on the first {n} examples")
  return failed, evidence


# ----------------------------------------------------------------------------
# Reports.

def results_table(results: dict) -> str:
  """Markdown table of clean, per-attack and worst-case robust accuracy.

  With a defended pipeline (``defense_success`` in the results) a column
  gives, per attack, the share of the examples that fooled the bare
  classifier which the pipeline classifies correctly.
  """
  pct = lambda a: f"{100 * a:.2f}%"
  success = results.get("defense_success")
  extra = lambda name: (f" {pct(success[name])} |" if name in success else " |") if success else ""
  head = "| attack | accuracy | seconds |" + (" defense success |" if success else "")
  lines = [f"{results['num_examples']} test examples, {results['norm']} eps = "
           f"{results['eps']:.5g}", "", head, "|---|---|---|" + ("---|" if success else ""),
           f"| clean | {pct(results['clean'])} | {results['seconds'].get('clean', '')} |"
           + extra("clean")]
  for name, acc in results["attacks"].items():
    lines.append(f"| {name} | {pct(acc)} | {results['seconds'].get(name, '')} |" + extra(name))
  lines.append(f"| worst case over attacks | {pct(results['ensemble'])} | |" + extra(""))
  for stage, acc in (results.get("autoattack_stages") or {}).items():
    lines.append(f"| autoattack {stage} | {pct(acc)} | |" + extra(""))
  checks = results.get("masking_checks")
  if checks is not None:
    lines.append("")
    lines.append("Gradient-masking checks: " + ("all passed" if not checks["failed"] else
                                                 f"{len(checks['failed'])} FAILED"))
    lines += [f"- WARNING: {f}" for f in checks["failed"]]
  return "\n".join(lines)


def eps_curve_png(path: str, eps_list: Sequence[float], accs: Sequence[float], *,
                  title: str = "robust accuracy vs eps") -> None:
  """Saves the robust-accuracy-vs-eps curve as a PNG (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(list(eps_list), [100 * a for a in accs], marker="o")
  ax.set_xlabel("eps")
  ax.set_ylabel("robust accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(workdir: str, results: dict) -> str:
  """Writes ``workdir/eval/results.json`` and ``results.md``; returns the folder."""
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  public = {k: v for k, v in results.items() if k != "per_example"}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(public, f, indent=2, sort_keys=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(results_table(results) + "\n")
  return out


def evaluate_and_report(model: "Target | LogitsFn", x_test: np.ndarray, y_test: np.ndarray, *,
                        eval_config: ml_collections.ConfigDict, workdir: str, key: Array,
                        sharding=None, adaptive: Optional[Target] = None) -> dict:
  """Suite + masking checks + printed table + results files + eps-curve PNG.

  With an ``adaptive`` target (a defended pipeline attacked end to end) the
  masking checks run on it: it is the attack whose strength matters.
  """
  results = run_suite(model, x_test, y_test, suite_config=eval_config, key=key,
                      sharding=sharding, adaptive=adaptive)
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  if eval_config.masking_checks:
    checked = adaptive if adaptive is not None else as_target(model)
    failed, evidence = masking_checks(checked, x_test, y_test, results=results,
                                      suite_config=eval_config, key=jax.random.fold_in(key, 99),
                                      sharding=sharding)
    results["masking_checks"] = {"failed": failed, "evidence": evidence}
    eps_curve_png(os.path.join(out, "eps_curve.png"), evidence["curve_eps"],
                  evidence["curve_acc"],
                  title=f"{evidence['curve_attack']}, {evidence['num_examples']} examples")
    for f in failed:
      print(f"WARNING (gradient masking?): {f}")
  write_results(workdir, results)
  print(results_table(results))
  return results


def run_targets(workdir: str, config: ml_collections.ConfigDict,
                eval_config: ml_collections.ConfigDict, data) -> tuple[Target, Optional[Target]]:
  """The targets ``--mode eval`` attacks for the run in ``workdir``: (main, adaptive).

  * No transform: the restored model; with its defense's auxiliary heads
    (``outputs``, ``joint_loss``) when it has a joint attack loss.
  * ``eval.transform`` set: main = the pipeline scored, the bare classifier
    attacked (non-adaptive); adaptive = the pipeline attacked end to end
    (``eval.adaptive_backward``: BPDA or exact gradients; EOT over
    ``eval.eot_samples`` draws when the transform is randomized).
  """
  from jaxdef.api import check_images, restore_model
  from jaxdef.build import build
  from jaxdef.defenses import create_transform
  run_config, model, variables, meta = restore_model(workdir)
  _, _, defense = build(run_config, meta)

  def outputs(x):
    check_images(x, meta.image_shape)
    return model.apply(variables, x, train=False)

  logits = lambda x: outputs(x)["logits"]
  name = eval_config.get("transform", "none")
  if name == "none":
    if defense.joint_attack_loss is None:
      return Target(predict=logits), None
    return Target(predict=logits, outputs=outputs, joint_loss=defense.joint_attack_loss), None
  tt = create_transform(name, workdir=workdir, config=config, model=model,
                        variables=variables, meta=meta, data=data)
  pipeline = attacks.defended_logits_fn(tt.classifier, tt.transform, backward="exact",
                                        randomized=tt.randomized)
  # The bare classifier takes (and ignores) the key when the pipeline does.
  bare = keyed(tt.classifier, False) if tt.randomized else tt.classifier
  backward = eval_config.get("adaptive_backward", "bpda")
  eot = int(eval_config.get("eot_samples", 1))
  main = Target(predict=pipeline, attack_view=bare, randomized=tt.randomized,
                eot_samples=eot, reference=tt.classifier)
  adaptive = Target(predict=pipeline, randomized=tt.randomized, eot_samples=eot,
                    attack_view=attacks.defended_logits_fn(
                        tt.classifier, tt.transform, randomized=tt.randomized,
                        backward=backward),
                    reference=tt.classifier,
                    label=("bpda" if backward == "bpda" else "adaptive")
                    + ("+eot" if tt.randomized else ""))
  return main, adaptive


def evaluate_workdir(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """``launch.py --mode eval``: restores the run in ``workdir`` and evaluates it
  on its test split with ``config.eval`` (or :func:`default_eval_config`)."""
  from jaxdef.data import load_dataset
  from jaxdef.train.checkpoint import read_run_config
  from jaxdef.train.metrics import unfinished_run_warning
  config = config or read_run_config(workdir)[0]
  eval_config = resolve_eval_config(config.get("eval", default_eval_config()),
                                    eps=config.attack.eps, norm=config.attack.norm)
  data = load_dataset(config.data)
  unfinished = unfinished_run_warning(workdir)
  if unfinished:
    print(unfinished, flush=True)
  main, adaptive = run_targets(workdir, config, eval_config, data)
  results = evaluate_and_report(main, data.x_test, data.y_test, eval_config=eval_config,
                                workdir=workdir, key=jax.random.key(int(eval_config.seed)),
                                adaptive=adaptive)
  # ---- attention maps (AAD, METHODS.md sec. 3): jaxdef/attention.py ----
  # Grad-CAM is of a classifier's tap point; a pipeline with a test-time
  # transform (PSSR's model nests its classifier) has no map of its own.
  if eval_config.get("attention", True) and eval_config.get("transform", "none") == "none":
    from jaxdef.attention import attention_report
    results["attention"] = attention_report(workdir, eval_config, data.x_test, data.y_test)
  return results
