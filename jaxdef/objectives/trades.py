"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between
Robustness and Accuracy"), docs/methods.md section 0.

Inner: PGD ascends ``KL(f(x) || f(x_adv))`` from ``x + 0.001 N(0, 1)``.
Outer: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (paper eq. 5), beta = 6.
The clean logits in the attack are fixed (the trainer stops their gradient);
in the outer loss the gradient flows through both sides of the KL, as in the
reference implementation.

With CutMix's mixed labels (target distributions y, ``data.cutmix``) the
attack is aimed at the mixed labels instead of the clean prediction: PGD
ascends KL(y || f(x_adv)), as in both CutMix codes (Rebuffi et al. 2021,
deepmind-research adversarial_robustness/jax/experiment.py; Wang et al. 2023,
DM-Improves-AT gowal21uncovering/utils/trades.py); the outer loss is
unchanged, its CE term taken against y.
"""

import functools

from jaxdef.attacks.losses import cross_entropy, kl_divergence
from jaxdef.objectives.base import Array, Objective, on_logits, register


def trades_loss(logits_clean: Array, logits_adv: Array, labels: Array, beta: float,
                smoothing=None) -> Array:
  """``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` per example, (N,); the CE
  against labels smoothed by ``smoothing`` when given."""
  return (cross_entropy(logits_clean, labels, smoothing)
          + beta * kl_divergence(logits_clean, logits_adv))


def trades_inner_loss(logits_adv: Array, logits_clean: Array, labels: Array) -> Array:
  """What TRADES' attack ascends, (N,): ``KL(f(x) || f(x_adv))``; for target
  distributions ``labels`` (N, K), the CE against them, i.e. ``KL(y ||
  f(x_adv))`` up to the entropy of y, which has no gradient."""
  if labels.ndim == 2:
    return cross_entropy(logits_adv, labels)
  return kl_divergence(logits_clean, logits_adv)


@register("trades")
def make_trades(beta: float = 6.0) -> Objective:
  """TRADES with robustness weight ``beta`` (1/lambda in the paper; 6 by default)."""
  outer = on_logits(functools.partial(trades_loss, beta=beta))
  return Objective("trades", trades_inner_loss, outer, attack_init="normal",
                   needs_clean_pass=True, soft_labels=True)
