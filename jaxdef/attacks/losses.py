"""Per-example attack losses, written to be *maximised* by the attacker.

Every function maps logits (N, K) and labels (N,) to a loss (N,);
:func:`cross_entropy` also takes target distributions (N, K). They are
the building blocks of PGD (Madry et al. 2018), the C&W margin attack
(Carlini & Wagner 2017, L-inf PGD form used by the CAS and FSR papers), APGD's
DLR loss (Croce & Hein 2020, eq. 5) and the TRADES KL inner loss (Zhang et al.
2019).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxdef.errors import unknown_name

Array = jax.Array
# ``(logits (N, K), labels (N,)) -> (N,)``, a loss to maximise.
LogitsLoss = Callable[[Array, Array], Array]


def cross_entropy(logits: Array, labels: Array, smoothing=None) -> Array:
  """Softmax cross-entropy CE(f(x), y), (N,).

  ``labels`` are class indices (N,) or target distributions (N, K) (CutMix's
  mixed labels, :func:`label_targets`): then ``-sum_k y_k log p_k``, whose
  gradient is that of KL(y || p). With ``smoothing`` s (a float, or (N,)
  floats, one per example), the CE against the label-smoothed target
  ``(1 - s) y + s / K`` (Szegedy et al. 2016), i.e. ``(1 - s) CE(f(x), y) +
  s mean_k(-log p_k)``: for class indices the CE against
  ``label_targets(y, K, s)``.
  """
  logits = logits.astype(jnp.float32)
  if labels.ndim == logits.ndim:
    ce = optax.softmax_cross_entropy(logits, labels.astype(jnp.float32))
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if smoothing is None:
    return ce
  uniform = -jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return (1.0 - smoothing) * ce + smoothing * uniform


def label_targets(labels: Array, num_classes: int, smoothing=None) -> Array:
  """Class indices (N,) as target distributions (N, K): one-hot, or with
  ``smoothing`` s (a float or (N,) floats) ``(1 - s) onehot(y) + s / K``.
  Target distributions (N, K) are returned as they are."""
  if labels.ndim == 2:
    return labels
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if smoothing is None:
    return onehot
  s = jnp.asarray(smoothing, jnp.float32)
  s = s[:, None] if s.ndim == 1 else s
  return (1.0 - s) * onehot + s / num_classes


def dominant_label(labels: Array) -> Array:
  """The class of each row: ``labels`` (N,) themselves, or the most probable
  class of target distributions (N, K) (CutMix's larger share)."""
  return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


def _true_and_best_other(logits: Array, labels: Array) -> tuple[Array, Array]:
  """(z_y, max_{k != y} z_k), each (N,)."""
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return true, other


def margin(logits: Array, labels: Array) -> Array:
  """max_{k != y} z_k - z_y: positive exactly when the example is misclassified."""
  true, other = _true_and_best_other(logits, labels)
  return other - true


def cw_loss(logits: Array, labels: Array, kappa: float = 50.0) -> Array:
  """C&W margin loss min(max_{k!=y} z_k - z_y, kappa).

  The cap at ``kappa`` stops the attacker from pushing an already-fooled
  example further (kappa = 50 in the CAS/FSR evaluation). Equals the usual
  ``-relu(z_y - z_other + kappa)`` up to the constant ``kappa``.
  """
  return jnp.minimum(margin(logits, labels), kappa)


def dlr_loss(logits: Array, labels: Array) -> Array:
  """Difference of logits ratio, Croce & Hein 2020 eq. (5), to maximise.

  DLR = -(z_y - max_{k!=y} z_k) / (z_pi1 - z_pi3 + 1e-12), pi = descending
  order. Invariant to shifting and scaling the logits.
  """
  logits = logits.astype(jnp.float32)
  top3 = jax.lax.top_k(logits, 3)[0]
  return margin(logits, labels) / (top3[:, 0] - top3[:, 2] + 1e-12)


def dlr_targeted_loss(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR of APGD-T, Croce & Hein 2020 sec. 3.3, to maximise.

  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12): rises as the target
  logit z_t overtakes the true one. Needs at least four classes.
  """
  logits = logits.astype(jnp.float32)
  top4 = jax.lax.top_k(logits, 4)[0]
  pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=-1)[:, 0]
  scale = top4[:, 0] - 0.5 * (top4[:, 2] + top4[:, 3]) + 1e-12
  return (pick(targets) - pick(labels)) / scale


def kl_divergence(logits_ref: Array, logits: Array) -> Array:
  """KL(softmax(logits_ref) || softmax(logits)) per example (TRADES' inner loss)."""
  p_log = jax.nn.log_softmax(logits_ref.astype(jnp.float32), axis=-1)
  q_log = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1)


def named_loss(name: str, *, kappa: float = 50.0) -> LogitsLoss:
  """Loss ``name`` as ``fn(logits, labels) -> (N,)``: 'ce', 'cw', 'dlr'.

  'kl' needs reference logits rather than labels and is built by
  :func:`jaxdef.attacks.pgd.pgd` itself.
  """
  losses = {
      "ce": cross_entropy,
      "cw": lambda z, y: cw_loss(z, y, kappa),
      "dlr": dlr_loss,
  }
  if name not in losses:
    raise unknown_name("attack loss", name, list(losses) + ["kl"])
  return losses[name]
