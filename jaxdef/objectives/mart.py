"""MART (Wang et al. 2020, "Improving Adversarial Robustness Requires
Revisiting Misclassified Examples"), docs/methods.md section 0.

Inner: PGD on CE from a uniform start, as PGD-AT. Outer (paper eq. 11):

    BCE(f(x_adv), y) + beta * KL(f(x) || f(x_adv)) * (1 - p_y(x)),
    BCE(f(x_adv), y) = CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv)),

beta = 6 (the official default; the CAS recipe uses 5).

Numerics, following the reference code: the margin term is
``-log(1.0001 - p + 1e-12)``, so that it stays finite (about 9.2 at most)
when the best wrong class takes all the probability. The KL term here is
computed from log-softmax, which needs no epsilon (the reference adds 1e-12
inside the log of its probabilities and weights by ``1.0000001 - p_y``; both
only guard its float arithmetic and are left out). The weight ``1 - p_y(x)``
is differentiated, as in the reference.
"""

import functools

import jax
import jax.numpy as jnp

from jaxdef.attacks.losses import cross_entropy, kl_divergence
from jaxdef.objectives.base import Array, Objective, on_logits, register

# Keep log(1 - p) finite at p = 1 (the reference code's constants).
_MARGIN_SHIFT = 1.0001
_LOG_EPS = 1e-12


def mart_bce(logits_adv: Array, labels: Array, smoothing=None) -> Array:
  """MART's boosted CE: ``CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))``, (N,);
  the CE against labels smoothed by ``smoothing`` when given."""
  probs = jax.nn.softmax(logits_adv.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=bool)
  best_wrong = jnp.max(jnp.where(onehot, 0.0, probs), axis=-1)
  return (cross_entropy(logits_adv, labels, smoothing)
          - jnp.log(_MARGIN_SHIFT - best_wrong + _LOG_EPS))


def mart_regulariser(logits_clean: Array, logits_adv: Array, labels: Array) -> Array:
  """``KL(f(x) || f(x_adv)) * (1 - p_y(x))``: weighted towards misclassified x, (N,)."""
  probs = jax.nn.softmax(logits_clean.astype(jnp.float32), axis=-1)
  p_true = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  return kl_divergence(logits_clean, logits_adv) * (1.0 - p_true)


def mart_loss(logits_clean: Array, logits_adv: Array, labels: Array, beta: float,
              smoothing=None) -> Array:
  """The MART training loss per example, (N,) (``smoothing``: of the CE term)."""
  return (mart_bce(logits_adv, labels, smoothing)
          + beta * mart_regulariser(logits_clean, logits_adv, labels))


@register("mart")
def make_mart(beta: float = 6.0) -> Objective:
  """MART with regularisation weight ``beta`` (6 by default)."""
  outer = on_logits(functools.partial(mart_loss, beta=beta))
  inner = lambda logits_adv, logits_clean, y: cross_entropy(logits_adv, y)
  return Objective("mart", inner, outer, attack_init="uniform", needs_clean_pass=True)
