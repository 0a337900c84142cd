"""CAS: Channel-wise Activation Suppressing (Bai et al., ICLR 2021), docs/methods.md section 1.

A :class:`ChannelSuppression` module after a block reweights the block's
channels by a column of its own auxiliary linear head: the column of the true
class in training, of the head's predicted class at test time. The auxiliary
heads are trained with the terms the authors' code gives each host objective
(:func:`cas_training_loss`, weight ``beta`` = 2), and the training attack
ascends the heads' loss with the objective's own (:func:`cas_attack_term`).

The trainer's ``loss_term`` does not see the objective, yet the CAS recipe
gives the auxiliary heads objective-specific terms. ``make_cas`` therefore
takes the host objective's name and beta as hyperparameters
(``objective``, ``objective_beta``); the configs in ``configs/`` tie them to
``config.objective`` with ``FieldReference`` so an override of one changes
both, and config validation refuses a hand-set pair that disagrees with the
objective that trains (``jaxdef.config._check_defense_host``).
"""

from __future__ import annotations

import functools

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdef.attacks.losses import LogitsLoss, cross_entropy, kl_divergence
from jaxdef.defenses.base import Defense, register
from jaxdef.errors import ConfigError, unknown_name
from jaxdef.models.base import Insert
from jaxdef.objectives.mart import mart_bce

Array = jax.Array
OBJECTIVES = ("at", "trades", "mart")

# Placements (docs/methods.md section 1): after each block of ResNet-18's last stage;
# after each conv of VGG-16's last group. small_cnn (not in the paper): after
# its last convolution (the ReLU output before the second max-pool).
_POINTS = {
    "resnet18": ("stage4.0", "stage4.1"),
    "preact_resnet18": ("stage4.0", "stage4.1"),
    "vgg16": ("block5.conv0", "block5.conv1", "block5.conv2"),
    "small_cnn": ("conv4",),
}
_WIDE_RESNETS = {"wide_resnet": None, "wrn34_10": 34}

# PyTorch's nn.Linear initialisation U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the
# kernel is also the channel mask, so its scale is the reference's.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def default_points(model_name: str, depth: int = 34) -> tuple[str, ...]:
  """Where CAS goes in ``model_name`` (docs/methods.md section 1).

  WRN-``depth``: on the input of the last block of the last stage (the output
  of the block before it, ``stage3.{n-2}`` with ``n = (depth - 4) / 6``) and
  on the final BN-ReLU features before pooling. ``depth`` only matters for
  ``wide_resnet`` (``wrn34_10`` is always 34).
  """
  if model_name in _WIDE_RESNETS:
    n = ((_WIDE_RESNETS[model_name] or depth) - 4) // 6
    return (f"stage3.{n - 2}" if n >= 2 else "stage2", "final")
  if model_name not in _POINTS:
    raise ConfigError(f"CAS has no default placement for model {model_name!r} (known: "
                      f"{', '.join(sorted([*_POINTS, *_WIDE_RESNETS]))}); set "
                      f"defense.kwargs.points")
  return _POINTS[model_name]


class ChannelSuppression(nn.Module):
  """The CAS module on a block output ``a`` (N, H, W, C).

  ``s = GAP(a) W + b`` is the auxiliary head (N, num_classes); the output is
  ``a * W[:, k]`` per example with ``k`` the true label when ``train`` and
  ``labels`` are given, else ``argmax s``. The mask is the raw weight column
  (no normalisation, no sign constraint), so the head's weights are trained
  both through its CE loss and through the masked features. Returns
  ``(masked a, s)``; ``s`` is float32.
  """
  num_classes: int

  @nn.compact
  def __call__(self, a: Array, *, train: bool, labels: Optional[Array] = None
               ) -> tuple[Array, Array]:
    if a.ndim != 4:
      raise ValueError(f"CAS needs an (N, H, W, C) feature map, got shape {a.shape}")
    channels = a.shape[-1]
    kernel = self.param("kernel", _torch_linear_init, (channels, self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    logits = jnp.mean(a.astype(jnp.float32), axis=(1, 2)) @ kernel + bias
    chosen = labels if (train and labels is not None) else jnp.argmax(logits, axis=-1)
    mask = kernel.T[chosen]  # (N, C)
    return a * mask[:, None, None, :].astype(a.dtype), logits


def _head_logits(out: dict) -> list[Array]:
  """The CAS heads' logits in ``out['aux']``, in a fixed order."""
  return [out["aux"][point] for point in sorted(out["aux"])]


def _mean(per_head: Sequence[Array]) -> Array:
  return jnp.mean(jnp.stack(per_head), axis=0)


def cas_aux_ce(out: dict, labels: Array) -> Array:
  """``mean_s CE(s_s(x), y)`` over the CAS heads of one model output, (N,)."""
  return _mean([cross_entropy(s, labels) for s in _head_logits(out)])


def cas_joint_attack_loss(out: dict, labels: Array, *, beta: float = 2.0,
                          loss: LogitsLoss = cross_entropy) -> Array:
  """The joint (adaptive) attack loss ``L(f(x), y) + beta * mean_s L(s_s(x), y)``.

  With ``L`` = CE (the default) it is the CAS paper's attack for training and
  its white-box evaluation (docs/methods.md section 1), to maximise; ``out`` is the
  ModelOutput in eval mode. The joint C&W of the authors' evaluation takes ``L``
  = the C&W margin (kappa 0) on the final logits and on every head alike, as
  their ``pgd_attack_cifar10_cas.py`` does (docs/methods.md section 1).
  """
  heads = _mean([loss(s, labels) for s in _head_logits(out)])
  return loss(out["logits"], labels) + beta * heads


def cas_attack_term(out_clean: Optional[dict], out_adv: dict, labels: Array, *,
                    beta: float = 2.0, objective: str = "at") -> Array:
  """What the CAS heads add to the training attack's loss, (N,) (the authors' code).

  * AT and MART: ``beta * mean_s CE(s_s(x_adv), y)`` (PGD on the joint CE).
  * TRADES: ``beta * mean_s KL(s_s(x) || s_s(x_adv))``, beside TRADES' own
    ``KL(f(x) || f(x_adv))`` on the final logits.
  """
  if objective == "trades":
    pairs = zip(_head_logits(out_clean), _head_logits(out_adv))
    return beta * _mean([kl_divergence(c, s) for c, s in pairs])
  return beta * cas_aux_ce(out_adv, labels)


def cas_training_loss(out_clean: Optional[dict], out_adv: dict, labels: Array, *,
                      beta: float = 2.0, objective: str = "at",
                      objective_beta: float = 6.0) -> Array:
  """The CAS terms added to the host objective's loss, (N,), as the authors'
  code trains them (docs/methods.md section 1; ``beta`` is beta_cas, 2):

  * AT: ``beta * mean_s CE(s_s(x_adv), y)``.
  * TRADES: ``beta * mean_s CE(s_s(x), y)`` (the heads' CE on the **clean**
    input) ``+ objective_beta * beta * mean_s KL(s_s(x) || s_s(x_adv))``.
  * MART: ``beta * mean_s BCE(s_s(x_adv), y)`` (MART's boosted CE) ``+
    objective_beta * beta * mean_s KL(s_s(x) || s_s(x_adv)) * (1 - p_y(x))``,
    with ``p_y`` from the final logits' clean softmax (differentiated, as
    MART's own weight is).
  """
  heads_adv = _head_logits(out_adv)
  if objective == "at":
    return beta * _mean([cross_entropy(s, labels) for s in heads_adv])
  heads_clean = _head_logits(out_clean)
  kl = _mean([kl_divergence(c, s) for c, s in zip(heads_clean, heads_adv)])
  if objective == "trades":
    ce_clean = _mean([cross_entropy(c, labels) for c in heads_clean])
    return beta * ce_clean + objective_beta * beta * kl
  probs = jax.nn.softmax(out_clean["logits"].astype(jnp.float32), axis=-1)
  p_true = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  bce = _mean([mart_bce(s, labels) for s in heads_adv])
  return beta * bce + objective_beta * beta * kl * (1.0 - p_true)


@register("cas")
def make_cas(beta: float = 2.0, objective: str = "at", objective_beta: float = 6.0,
             points: Optional[Sequence[str]] = None, depth: int = 34) -> Defense:
  """CAS with auxiliary-loss weight ``beta`` (2 in the paper).

  Args:
    beta: weight of the auxiliary heads' loss, in training and in the attack.
    objective: the host objective ('at', 'trades' or 'mart'), which decides
      the auxiliary heads' terms (see :func:`cas_training_loss`).
    objective_beta: the host objective's beta (TRADES, MART: with ``beta``
      the weight of the heads' KL term; unused with AT).
    points: tap points to insert CAS at (default: :func:`default_points`).
    depth: WRN depth for the default ``wide_resnet`` placement.
  """
  if objective not in OBJECTIVES:
    raise unknown_name("CAS host objective (defense.kwargs.objective)", objective, OBJECTIVES)

  def insert(model_name: str, num_classes: int) -> Insert:
    chosen = tuple(points) if points else default_points(model_name, depth)
    return Insert(points=chosen, make=lambda point: ChannelSuppression(
        num_classes, name=f"cas_{point.replace('.', '_')}"))

  return Defense(
      name="cas",
      insert=insert,
      attack_term=functools.partial(cas_attack_term, beta=beta, objective=objective),
      loss_term=lambda out_clean, out_adv, y: cas_training_loss(
          out_clean, out_adv, y, beta=beta, objective=objective,
          objective_beta=objective_beta),
      needs_clean_pass=objective != "at",
      joint_attack_loss=functools.partial(cas_joint_attack_loss, beta=beta),
      hyperparameters=dict(beta=beta, objective=objective, objective_beta=objective_beta,
                           points=None if points is None else tuple(points), depth=depth),
  )
