"""The interface every adversarial-training objective shares, and its registry.

An objective says two things (docs/methods.md section 0):

* the inner maximisation: which per-example loss PGD ascends and from which
  start point (``inner_loss``, ``attack_init``);
* the outer minimisation: the per-example training loss from the model
  outputs on clean and adversarial inputs (``outer_loss``).

Model outputs are :class:`jaxdef.models.base.ModelOutput` dicts, so defenses
can add their own terms beside these (see :mod:`jaxdef.defenses`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from jaxdef.errors import ConfigError
from jaxdef.registry import Registry

Array = jax.Array
# inner_loss(logits_adv, logits_clean, labels) -> (N,) loss PGD maximises.
InnerLoss = Callable[[Array, Array, Array], Array]
# outer_loss(out_clean, out_adv, labels, smoothing=None) -> (N,) training loss;
# ``smoothing`` (N,) smooths each example's label in the loss's CE term.
OuterLoss = Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """An adversarial-training objective.

  Attributes:
    name: registry name ('at', 'trades', 'mart').
    inner_loss: ``(logits_adv, logits_clean, y) -> (N,)`` maximised by PGD.
    outer_loss: ``(out_clean, out_adv, y, smoothing=None) -> (N,)`` minimised in
      training; ``smoothing`` (None, or (N,) floats) is the label smoothing of
      each example in the objective's cross-entropy term (e.g. the extra
      data's own, ``data.extra_label_smoothing``).
    attack_init: PGD start point, 'uniform' (Madry) or 'normal' (TRADES).
    needs_clean_pass: whether ``outer_loss`` reads ``out_clean`` (if not, the
      trainer skips the clean forward pass in the update).
    soft_labels: whether both losses also take target distributions (N, K)
      for ``y`` (CutMix's mixed labels, ``data.cutmix``); ``smoothing`` is then
      already part of the targets and not given.
  """
  name: str
  inner_loss: InnerLoss
  outer_loss: OuterLoss
  attack_init: str = "uniform"
  needs_clean_pass: bool = False
  soft_labels: bool = False


def on_logits(loss: Callable[..., Array]) -> OuterLoss:
  """The outer loss of ``loss(logits_clean, logits_adv, y, smoothing=...) -> (N,)``:
  the same loss read from the model outputs' ``logits``."""
  return lambda out_clean, out_adv, y, smoothing=None: loss(
      out_clean["logits"], out_adv["logits"], y, smoothing=smoothing)


def check_soft_labels(objective: Objective, defense_name: str, what: str) -> None:
  """One-line :class:`ConfigError` unless ``objective`` and the defense named
  ``defense_name`` take target distributions for labels (``what`` makes them:
  e.g. CutMix). Defenses' terms read class indices, so only 'none' does."""
  if not objective.soft_labels:
    raise ConfigError(f"{what} turns labels into target distributions, and objective "
                      f"{objective.name!r} needs class indices (objectives that take them: "
                      f"at, trades)")
  if defense_name != "none":
    raise ConfigError(f"{what} turns labels into target distributions, and defense "
                      f"{defense_name!r} reads class indices (use defense.name='none')")


_OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective", [
    f"jaxdef.objectives.{m}" for m in ("at", "mart", "trades")])
# ``@register('trades')`` on ``make(**hyperparameters) -> Objective``.
register = _OBJECTIVES.register
objective_names = _OBJECTIVES.names


def create_objective(name: str, **hyperparameters) -> Objective:
  """The objective ``name`` with its hyperparameters (e.g. ``beta=6.0``)."""
  return _OBJECTIVES.create(name, **hyperparameters)
