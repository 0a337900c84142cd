"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between
Robustness and Accuracy"), docs/methods.md section 0.

Inner: PGD ascends ``KL(f(x) || f(x_adv))`` from ``x + 0.001 N(0, 1)``.
Outer: ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (paper eq. 5), beta = 6.
The clean logits in the attack are fixed (the trainer stops their gradient);
in the outer loss the gradient flows through both sides of the KL, as in the
reference implementation.
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


@register("trades")
def make_trades(beta: float = 6.0) -> Objective:
  """TRADES with robustness weight ``beta`` (1/lambda in the paper; 6 by default)."""
  outer = on_logits(functools.partial(trades_loss, beta=beta))
  inner = lambda logits_adv, logits_clean, y: kl_divergence(logits_clean, logits_adv)
  return Objective("trades", inner, outer, attack_init="normal", needs_clean_pass=True)
