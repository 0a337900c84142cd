"""FSR: Feature Separation and Recalibration (Kim et al., CVPR 2023), docs/methods.md section 2.

A :class:`FeatureSeparationRecalibration` module on a feature map ``f``
separates it with a soft element-wise mask into a robust part ``f_r`` and a
non-robust part ``f_nr``, recalibrates the non-robust part into ``f_rec`` and
passes ``f_r + f_rec`` on. A linear head shared by the three parts is trained
to predict the true class from ``f_r`` and ``f_rec`` and the adversarial
prediction's class from ``f_nr`` (:func:`fsr_training_loss`). The training
attack uses the final logits only (``attack_term`` is zero), as the paper
does; :func:`fsr_joint_attack_loss` is the adaptive attack that also ascends
the auxiliary losses.
"""

from __future__ import annotations

import functools

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdef.attacks.losses import LogitsLoss, cross_entropy
from jaxdef.defenses.base import Defense, register
from jaxdef.errors import ConfigError
from jaxdef.models.base import Insert
from jaxdef.models.layers import batch_norm, conv

Array = jax.Array

# Placements (docs/methods.md section 2): the last feature map before pooling.
# ResNet-18: after the last stage (4x4x512). PreAct ResNet-18 and WRN: after
# the final BN-ReLU, which is what pooling reads there. VGG-16: after the 4th
# conv group, before its pooling. small_cnn (not in the paper): the last
# spatial map before flattening (pool2, 5x5x64 on CIFAR), the analogue of
# the ResNet placement and 4x cheaper than conv4.
_POINTS = {
    "resnet18": "stage4",
    "preact_resnet18": "final",
    "wide_resnet": "final",
    "wrn34_10": "final",
    "vgg16": "block4",
    "small_cnn": "pool2",
}
BRANCHES = ("robust", "non_robust", "recalibrated")


def default_point(model_name: str) -> str:
  """Where FSR goes in ``model_name`` (docs/methods.md section 2)."""
  if model_name not in _POINTS:
    raise ConfigError(f"FSR has no default placement for model {model_name!r} (known: "
                      f"{', '.join(sorted(_POINTS))}); set defense.kwargs.points")
  return _POINTS[model_name]


def gumbel_sigmoid_mask(scores: Array, tau: float, key: Optional[Array] = None
                        ) -> tuple[Array, Array]:
  """Soft mask ``m = sigmoid((s + g1 - g2) / tau)`` and its complement ``1 - m``,
  element-wise (FSR sec. 3.2), both float32.

  ``g1, g2`` are independent Gumbel(0, 1) noise drawn from ``key``; without a
  key (evaluation) the mask is the deterministic ``sigmoid(s / tau)``. No
  straight-through estimator: the soft mask is used as it is. The complement
  is computed as ``sigmoid(-z)`` rather than ``1 - m``: at tau 0.1 most of
  ``m`` lies within 2^-8 of 1, where ``1 - m`` in bfloat16 rounds to a few
  levels or to 0 and erases the non-robust part (measured on the H200: AT+FSR
  in bfloat16 trained to 21% clean where float32 reached 34%).
  """
  z = scores.astype(jnp.float32)
  if key is not None:
    g1, g2 = jax.random.gumbel(key, (2, *z.shape), jnp.float32)
    z = z + g1 - g2
  z = z / tau
  return jax.nn.sigmoid(z), jax.nn.sigmoid(-z)


class ConvStack(nn.Module):
  """FSR's sub-network: Conv3x3(C->hidden) - BN - ReLU - Conv3x3(hidden->hidden) -
  BN - ReLU - Conv3x3(hidden->out_channels).

  No convolution has a bias, the last one included, as in the authors' code
  (docs/methods.md section 2; jaxdef gave the last one a bias until issue 15).
  """
  out_channels: int
  hidden: int = 64

  @nn.compact
  def __call__(self, h: Array, train: bool) -> Array:
    dtype = h.dtype
    for _ in range(2):
      h = nn.relu(batch_norm(train, dtype)(conv(self.hidden, 3, dtype=dtype)(h)))
    return conv(self.out_channels, 3, dtype=dtype)(h)


class FeatureSeparationRecalibration(nn.Module):
  """The FSR module on a feature map ``f`` (N, H, W, C).

  ``s = S(f)``; ``m, 1 - m = gumbel_sigmoid_mask(s, tau)`` (noise from the 'gumbel'
  RNG stream in training only); ``f_r = f m``, ``f_nr = f (1 - m)``,
  ``f_rec = f_nr + (1 - m) R(f_nr)``; output ``f_r + f_rec``. Aux: the shared
  head's logits (N, num_classes) on GAP of each part, under the keys
  ``robust``, ``non_robust`` and ``recalibrated``. The parts and the mask are
  also sown into the 'intermediates' collection (for tests and pictures).

  Flattened (N, D) features (e.g. ``penultimate``) are rejected: the
  separation and recalibration nets are convolutional.
  """
  num_classes: int
  tau: float = 0.1
  hidden: int = 64

  @nn.compact
  def __call__(self, f: Array, *, train: bool, labels: Optional[Array] = None
               ) -> tuple[Array, dict[str, Array]]:
    del labels  # FSR does not condition on the label
    if f.ndim != 4:
      raise ValueError(f"FSR needs an (N, H, W, C) feature map, got shape {f.shape}; "
                       f"place it at a convolutional tap point")
    channels = f.shape[-1]
    scores = ConvStack(channels, self.hidden, name="separation")(f, train)
    key = self.make_rng("gumbel") if train else None
    mask, complement = (m.astype(f.dtype) for m in gumbel_sigmoid_mask(scores, self.tau, key))
    robust = f * mask
    non_robust = f * complement
    offset = ConvStack(channels, self.hidden, name="recalibration")(non_robust, train)
    recalibrated = non_robust + complement * offset
    parts = dict(zip(BRANCHES, (robust, non_robust, recalibrated)))
    for name, value in (("mask", mask), *parts.items()):
      self.sow("intermediates", name, value)
    head = nn.Dense(self.num_classes, name="head")
    aux = {name: head(jnp.mean(value.astype(jnp.float32), axis=(1, 2)))
           for name, value in parts.items()}
    return robust + recalibrated, aux


def highest_wrong_class(logits: Array, labels: Array) -> Array:
  """``argmax_{k != y} z_k`` (N,): the adversarial prediction if wrong, else the runner-up."""
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.argmax(jnp.where(onehot, -jnp.inf, logits), axis=-1)


def _mean_over_points(out: dict, per_point) -> Array:
  return jnp.mean(jnp.stack([per_point(aux) for aux in out["aux"].values()]), axis=0)


def fsr_training_loss(out_adv: dict, labels: Array, *, lam_sep: float = 1.0,
                      lam_rec: float = 1.0) -> Array:
  """The FSR terms added to the host objective's loss on x_adv, (N,) (paper eq. 7).

  ``lam_sep [CE(h(f_r), y) + CE(h(f_nr), y')] + lam_rec CE(h(f_rec), y)``,
  with ``y'`` the highest-scoring wrong class of the final logits (selected
  without gradient). Averaged over FSR modules when there are several.
  """
  wrong = highest_wrong_class(jax.lax.stop_gradient(out_adv["logits"]), labels)
  return _mean_over_points(out_adv, lambda aux: (
      lam_sep * (cross_entropy(aux["robust"], labels) + cross_entropy(aux["non_robust"], wrong))
      + lam_rec * cross_entropy(aux["recalibrated"], labels)))


def fsr_joint_attack_loss(out: dict, labels: Array, *, lam_sep: float = 1.0,
                          lam_rec: float = 1.0, loss: LogitsLoss = cross_entropy) -> Array:
  """Adaptive attack loss, to maximise: ``L(f(x), y)`` plus the aux heads' ``L``.

  Adds ``lam_sep L(h(f_r), y) + lam_rec L(h(f_rec), y)``, the branches the
  defender trains towards ``y``; the ``f_nr`` branch (trained towards a wrong
  class) is left out. ``L`` is CE by default (joint PGD / FGSM), the C&W
  margin for joint C&W. ``out`` is the ModelOutput in eval mode.
  """
  return loss(out["logits"], labels) + _mean_over_points(out, lambda aux: (
      lam_sep * loss(aux["robust"], labels) + lam_rec * loss(aux["recalibrated"], labels)))


@register("fsr")
def make_fsr(lam_sep: float = 1.0, lam_rec: float = 1.0, tau: float = 0.1,
             points: Optional[tuple[str, ...]] = None, hidden: int = 64) -> Defense:
  """FSR with the paper's defaults (lam_sep = lam_rec = 1, tau = 0.1, 64 channels).

  Args:
    lam_sep, lam_rec: weights of the separation and recalibration losses.
    tau: temperature of the Gumbel-sigmoid mask.
    points: tap points to insert FSR at (default: :func:`default_point`).
    hidden: channels inside the separation and recalibration nets.
  """
  if not tau > 0:
    raise ConfigError(f"FSR temperature tau must be > 0, got {tau}")

  def insert(model_name: str, num_classes: int) -> Insert:
    chosen = tuple(points) if points else (default_point(model_name),)
    return Insert(points=chosen, make=lambda point: FeatureSeparationRecalibration(
        num_classes, tau, hidden, name=f"fsr_{point.replace('.', '_')}"))

  return Defense(
      name="fsr",
      insert=insert,
      loss_term=lambda out_clean, out_adv, y: fsr_training_loss(
          out_adv, y, lam_sep=lam_sep, lam_rec=lam_rec),
      rng_collections=("gumbel",),
      joint_attack_loss=functools.partial(fsr_joint_attack_loss, lam_sep=lam_sep,
                                          lam_rec=lam_rec),
      hyperparameters=dict(lam_sep=lam_sep, lam_rec=lam_rec, tau=tau, hidden=hidden,
                           points=None if points is None else tuple(points)),
  )
