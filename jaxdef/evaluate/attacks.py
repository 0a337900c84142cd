"""The evaluation's attacks by name: a registry, ``name -> suite attack``.

A suite attack is ``(target, x, y, key, eps) -> (x_adv, extras)`` where
``extras`` are per-example arrays (AutoAttack's stages; the indicators of
attack failure that PGD, FGSM, C&W and AutoAttack's APGD stages record in
their loops). Names:

* fixed: ``clean``, ``fgsm`` (from a random start with ``fgsm_random_start``),
  ``cw`` (C&W-inf, :func:`jaxdef.attacks.cw_linf`, ``cw_steps`` steps with
  ``cw_kappa``, from a random start unless ``pgd_random_start`` is off, as PGD),
  ``stepll``, ``r+stepll``, ``iterll`` (:func:`jaxdef.attacks.least_likely`),
  ``autoattack`` and its parts (``apgd-ce``, ``apgd-dlr``, ``apgd-t``,
  ``fab``, ``fab-t``, ``square``);
* with a step count N: ``pgdN`` and ``joint-pgdN`` (PGD on the final loss
  plus a model's auxiliary-head losses, :attr:`Target.joint_loss`);
* joint forms of FGSM and C&W, ``joint-fgsm`` and ``joint-cw`` (the CAS
  paper's protocol): the same attack on the final logits' loss plus the
  heads' losses of the same kind (CE, or the C&W margin).

Each entry says whether its eps may be traced (one compilation for a whole
eps curve) or must be a number.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxdef import attacks
from jaxdef.attacks.autoattack import ATTACKS as AUTOATTACK_PARTS
from jaxdef.attacks.autoattack import VERSIONS as AUTOATTACK_VERSIONS
from jaxdef.attacks.autoattack import eot_draws
from jaxdef.attacks.least_likely import KINDS as LEAST_LIKELY  # noqa: F401  (re-exported)
from jaxdef.attacks.least_likely import iterll_steps  # noqa: F401  (re-exported)
from jaxdef.attacks.indicators import failure_indicators
from jaxdef.attacks.losses import LogitsLoss, cross_entropy, cw_loss
from jaxdef.errors import ConfigError, unknown_name
from jaxdef.evaluate.target import Target

Array = jax.Array
# An attack as the suite runs it: (target, x, y, key, eps) -> (x_adv, {name: (N,) bool}).
SuiteAttack = Callable[..., tuple[Array, dict]]
JOINT_NEEDS_HEADS = "joint attacks need a model with auxiliary heads (defense cas or fsr)"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered name: ``build(cfg, steps) -> SuiteAttack`` (``steps`` is N of
  the ``pgdN`` families, None for fixed names); ``traced_eps``: eps may be a
  traced argument."""
  build: Callable[[ml_collections.ConfigDict, Optional[int]], SuiteAttack]
  traced_eps: bool


def _adaptive(t: Target) -> dict:
  """What every gradient attack needs to know of a randomized target (EOT)."""
  return dict(randomized=t.randomized, eot_samples=t.eot_samples)


def _pgd_step(cfg: ml_collections.ConfigDict, eps) -> float:
  """PGD's step: ``pgd_step_size`` scaled with eps (2/255 at 8/255 by default)."""
  return cfg.pgd_step_size * eps / cfg.eps


def _joint_loss(target: Target, y: Array, loss: LogitsLoss = cross_entropy
                ) -> Callable[[Array, Array], Array]:
  """``(x_adv, key) -> (N,)``: ``loss`` on the final logits plus the heads'."""
  if target.outputs is None or target.joint_loss is None:
    raise ConfigError(JOINT_NEEDS_HEADS)
  return lambda z, key: target.joint_loss(target.outputs(z), y, loss=loss)


def _maybe_joint(joint: bool, t: Target, y: Array, loss: LogitsLoss = cross_entropy) -> dict:
  return dict(loss_fn=_joint_loss(t, y, loss)) if joint else {}


# Extras ``indicator <name>``: per-example indicators of attack failure.
INDICATOR = "indicator "


def _traced(cfg: ml_collections.ConfigDict, call: Callable[..., Array],
            restarts: int = 1) -> tuple[Array, dict]:
  """``(x_adv, extras)`` of a PGD-family attack ``call(**kw)``; with
  ``eval.indicators`` (and one run) the extras hold the indicators of attack
  failure from the attack's own loop (:mod:`jaxdef.attacks.indicators`)."""
  if not cfg.get("indicators", True) or restarts != 1:
    return call(), {}
  x_adv, trace = call(return_trace=True)
  return x_adv, {INDICATOR + k: v for k, v in failure_indicators(trace).items()}


def _clean(cfg, steps) -> SuiteAttack:
  return lambda t, x, y, key, eps: (x, {})


def _fgsm(joint: bool) -> Callable[..., SuiteAttack]:
  def build(cfg, steps) -> SuiteAttack:
    return lambda t, x, y, key, eps: _traced(cfg, lambda **kw: attacks.fgsm(
        t.view, x, y, key=key, eps=eps, norm=cfg.norm,
        random_start=cfg.get("fgsm_random_start", False), **_maybe_joint(joint, t, y),
        **_adaptive(t), **kw))
  return build


def _pgd(joint: bool) -> Callable[..., SuiteAttack]:
  def build(cfg, steps) -> SuiteAttack:
    def run(t, x, y, key, eps):
      return _traced(cfg, lambda **kw: attacks.pgd(
          t.view, x, y, key=key, eps=eps, step_size=_pgd_step(cfg, eps), steps=steps,
          norm=cfg.norm, restarts=cfg.pgd_restarts,
          random_start=cfg.get("pgd_random_start", True), **_maybe_joint(joint, t, y),
          **_adaptive(t), **kw), restarts=int(cfg.pgd_restarts))
    return run
  return build


def _cw(joint: bool) -> Callable[..., SuiteAttack]:
  def build(cfg, steps) -> SuiteAttack:
    margin = functools.partial(cw_loss, kappa=cfg.cw_kappa)
    return lambda t, x, y, key, eps: _traced(cfg, lambda **kw: attacks.cw_linf(
        t.view, x, y, key=key, eps=eps, step_size=_pgd_step(cfg, eps), steps=cfg.cw_steps,
        kappa=cfg.cw_kappa, norm=cfg.norm, random_start=cfg.get("pgd_random_start", True),
        **_maybe_joint(joint, t, y, margin), **_adaptive(t), **kw))
  return build


def _least_likely(kind: str) -> Callable[..., SuiteAttack]:
  def build(cfg, steps) -> SuiteAttack:
    return lambda t, x, y, key, eps: (attacks.least_likely(
        t.view, x, key=key, eps=eps, kind=kind, norm=cfg.norm, **_adaptive(t)), {})
  return build


def autoattack_version(cfg: ml_collections.ConfigDict, randomized: bool) -> str:
  """The AutoAttack version the suite runs on a target: ``eval.aa_version``, with
  'auto' meaning 'rand' for a randomized target and 'standard' otherwise.

  A deterministic version ('standard', 'plus') on a randomized target is a
  one-line ConfigError: its attacks would follow one draw of the randomness
  (the reference library's advice is the 'rand' version, with EOT).
  """
  version = cfg.get("aa_version", "auto")
  if version == "auto":
    return "rand" if randomized else "standard"
  if version not in AUTOATTACK_VERSIONS:
    raise unknown_name("eval.aa_version", version, ["auto", *AUTOATTACK_VERSIONS])
  if randomized and version != "rand":
    raise ConfigError(f"eval.aa_version={version!r} on a randomized target: its gradients "
                      f"follow a single draw; use 'rand' (or 'auto') for EOT over "
                      f"eval.aa_eot_iter draws")
  return version


def _autoattack_plan(cfg: ml_collections.ConfigDict, randomized: bool,
                     parts: Optional[tuple[str, ...]]) -> dict:
  """What the suite's AutoAttack (``parts`` None) or one of its parts runs on a
  (``randomized``) target: ``version`` (:func:`autoattack_version`; a part
  takes the budgets of 'rand' on a randomized target, of 'standard'
  otherwise), ``attacks`` for a part, and ``eot_iter`` (``eval.aa_eot_iter``
  on a randomized target; None: the version's own, 20 for 'rand')."""
  if parts is None:
    plan = dict(version=autoattack_version(cfg, randomized))
  else:
    plan = dict(version="rand" if randomized else "standard", attacks=parts)
  eot = int(cfg.get("aa_eot_iter", 0)) or None
  return {**plan, "eot_iter": eot if randomized else None}


def autoattack_protocol(name: str, cfg: ml_collections.ConfigDict, randomized: bool
                        ) -> Optional[dict]:
  """What an AutoAttack column ran, for the results: ``{'version', 'eot_iter',
  'label'}`` with a label such as 'autoattack (standard)' or 'autoattack
  (rand, EOT 20)' ('apgd-ce (EOT 20)' for a part on a randomized target,
  the bare name for a part on a deterministic one); None for other attacks."""
  if name not in STAGED:
    return None
  plan = _autoattack_plan(cfg, randomized, None if name == "autoattack" else (name,))
  version, eot = plan["version"], eot_draws(plan["version"], plan["eot_iter"])
  shown = [version] if name == "autoattack" else []
  if version == "rand":
    shown.append(f"EOT {eot}")
  return {"version": version, "eot_iter": eot,
          "label": f"{name} ({', '.join(shown)})" if shown else name}


# Extras ``after <attack>``: AutoAttack's per-example fooled flags after each attack.
STAGE = "after "


def staged_robust(extras: dict[str, Array]) -> Array:
  """Robust flags of an AutoAttack column: classified correctly clean and
  after every attack, as the stages re-predicted them (the flags only grow,
  so this is the last stage's)."""
  fooled = [v for k, v in extras.items() if k.startswith(STAGE)]
  return ~functools.reduce(jnp.logical_or, fooled)


def _autoattack_with_stages(t, x, y, key, eps, *, cfg, parts, **kwargs):
  # The APGD stages record the indicators of attack failure in their loops, as PGD does (_traced).
  record = bool(cfg.get("indicators", True))
  out = attacks.autoattack(
      t.view, x, y, key=key, eps=eps, return_stages=True, return_indicators=record,
      randomized=t.randomized, predict_fn=t.predict,
      n_target_classes=int(cfg.get("aa_n_target_classes", 9)),
      **_autoattack_plan(cfg, t.randomized, parts), **kwargs)
  x_adv, stages, fired = out if record else (*out, {})
  return x_adv, {**{STAGE + k: v for k, v in stages.items() if k != "clean"},
                 **{INDICATOR + k: v for k, v in fired.items()}}


def _autoattack(parts: Optional[tuple[str, ...]]) -> Callable[..., SuiteAttack]:
  def build(cfg, steps) -> SuiteAttack:
    return functools.partial(_autoattack_with_stages, cfg=cfg, parts=parts, norm=cfg.norm,
                             steps=cfg.aa_steps, fab_steps=cfg.aa_fab_steps,
                             queries=cfg.aa_queries, chunks=cfg.aa_chunks)
  return build


# AutoAttack and its parts: run eagerly by the suite, stage by stage, on the
# examples still robust (jaxdef.evaluate.suite.staged_flags).
STAGED = ("autoattack", *AUTOATTACK_PARTS)

# Fixed names, and families that take a step count (``pgd20``).
FIXED = {
    "clean": Entry(_clean, traced_eps=True),
    "fgsm": Entry(_fgsm(joint=False), traced_eps=True),
    "cw": Entry(_cw(joint=False), traced_eps=True),
    "joint-fgsm": Entry(_fgsm(joint=True), traced_eps=True),
    "joint-cw": Entry(_cw(joint=True), traced_eps=True),
    "stepll": Entry(_least_likely("stepll"), traced_eps=True),
    "r+stepll": Entry(_least_likely("r+stepll"), traced_eps=True),
    "iterll": Entry(_least_likely("iterll"), traced_eps=False),  # steps depend on eps
    "autoattack": Entry(_autoattack(None), traced_eps=False),
    **{part: Entry(_autoattack((part,)), traced_eps=False) for part in AUTOATTACK_PARTS},
}
WITH_STEPS = {
    "pgd": Entry(_pgd(joint=False), traced_eps=True),
    "joint-pgd": Entry(_pgd(joint=True), traced_eps=True),
}


def step_family(name: str) -> tuple[str, Optional[int]]:
  """``('pgd', 20)`` for ``pgd20``: a family of :data:`WITH_STEPS` and its step
  count; ``(name, None)`` for any other name."""
  family, steps = re.fullmatch(r"(.*?)(\d*)", name).groups()
  if family in WITH_STEPS and steps and int(steps) > 0:
    return family, int(steps)
  return name, None


def lookup(name: str) -> tuple[Entry, Optional[int]]:
  """(entry, step count) of an attack name; a one-line ConfigError for an unknown one."""
  if name in FIXED:
    return FIXED[name], None
  family, steps = step_family(name)
  if steps is not None:
    return WITH_STEPS[family], steps
  raise unknown_name("eval attack", name, [*FIXED, *(f"{f}N" for f in WITH_STEPS)])


def suite_attack(name: str, cfg: ml_collections.ConfigDict) -> SuiteAttack:
  """The attack called ``name`` in ``cfg.attacks`` as
  ``(target, x, y, key, eps) -> (x_adv, extras)`` (see the module docstring).
  PGD's step is ``pgd_step_size`` scaled with eps; ``pgd_random_start``
  applies to pgdN, joint-pgdN and cw."""
  entry, steps = lookup(name)
  return entry.build(cfg, steps)


def traced_eps(name: str) -> bool:
  """Whether attack ``name`` takes eps as a traced argument."""
  return lookup(name)[0].traced_eps


def stage_order(cfg, randomized: bool = False) -> list[str]:
  """AutoAttack's stage columns ('after apgd-ce', ...) of the version the suite
  runs on a (``randomized``) target (:func:`autoattack_version`)."""
  return [STAGE + k for k in AUTOATTACK_VERSIONS[autoattack_version(cfg, randomized)]]


def split_names(names: str) -> list[str]:
  return [n.strip() for n in str(names).split(",") if n.strip()]


def attack_names(cfg: ml_collections.ConfigDict, field: str = "attacks") -> list[str]:
  names = split_names(cfg.get(field, ""))
  if not names and field == "attacks":
    raise ConfigError("eval.attacks names no attack")
  for n in names:
    suite_attack(n, cfg)  # one-line error for an unknown name, before any work
  return names


