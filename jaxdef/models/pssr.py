"""The ``pssr`` model: pixel surgery and semantic regeneration around a classifier
(docs/methods.md section 5; the defense's losses and hooks: :mod:`jaxdef.defenses.pssr`).

The model removes the ``rho`` fraction of pixels the classifier's own-prediction
gradient marks as most salient and restores them with a conditional U-Net; the
classifier then reads the restoration.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdef.attacks.losses import cross_entropy
from jaxdef.errors import ConfigError, unknown_name
from jaxdef.models.base import ModelOutput
from jaxdef.models.registry import create_model, register as register_model
from jaxdef.models.unet import ConditionalUNet

Array = jax.Array
CONDITIONS = ("soft", "features")
# Restorations per input in training mode (the two R-drop samples).
TRAIN_RESTORATIONS = 2


# ---- pixel surgery (5.1) ------------------------------------------------------------

def own_prediction_loss(logits: Array) -> Array:
  """``sum_n CE(f(x'_n), argmax f(x'_n))``, a scalar: the classifier's loss at its
  own prediction (no label); the prediction is held fixed (``stop_gradient``)."""
  predicted = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  return jnp.sum(cross_entropy(logits, predicted))


def channel_saliency(grad: Array) -> Array:
  """``sum_c |g|``: (N, H, W, C) input gradient -> (N, H, W) per-pixel score."""
  return jnp.sum(jnp.abs(grad), axis=-1)


def surgery_score(logits_fn: Callable[[Array], Array], x: Array) -> Array:
  """``s = sum_c |d CE(f(x'), argmax f(x')) / d x'|``, (N, H, W), for a classifier
  given as ``logits_fn`` (N, H, W, C) -> (N, K)."""
  grad = jax.grad(lambda z: own_prediction_loss(logits_fn(z)))(x)
  return channel_saliency(grad)


def removed_pixel_count(rho: float, height: int, width: int) -> int:
  """``k = round(rho * H * W)``, rounding halves up (Python's ``round`` would round
  them to even): e.g. 157 of 784 pixels at rho 0.2, 307 of 1024 at 0.3."""
  return int(math.floor(rho * height * width + 0.5))


def top_rho_mask(score: Array, rho: float) -> Array:
  """Boolean (N, H, W) mask, True on exactly :func:`removed_pixel_count` pixels of
  each image: those of highest ``score`` (N, H, W). Ties are broken
  deterministically in favour of the lower row-major index."""
  n, height, width = score.shape
  k = removed_pixel_count(rho, height, width)
  flat = jax.lax.stop_gradient(score).reshape(n, height * width)
  mask = jnp.zeros(flat.shape, bool)
  if k > 0:
    _, idx = jax.lax.top_k(flat, k)
    mask = mask.at[jnp.arange(n)[:, None], idx].set(True)
  return mask.reshape(n, height, width)


def remove_pixels(x: Array, mask: Array) -> Array:
  """``x_s = x' * (1 - M)``: (N, H, W, C), (N, H, W) -> (N, H, W, C); unmasked
  pixels are returned bit-identical."""
  return jnp.where(mask[..., None], jnp.zeros((), x.dtype), x)


def restore_pixels(x: Array, mask: Array, generated: Array) -> Array:
  """``x_r = M * G + (1 - M) * x'``: (N, H, W, C); bit-identical to ``x'`` outside ``M``."""
  return jnp.where(mask[..., None], generated.astype(x.dtype), x)


# ---- the model: classifier + regenerator ----------------------------------------------

class PSSR(nn.Module):
  """The remove-then-restore pipeline around a classifier (module docstring).

  ``apply(variables, x, train=False)`` returns a :class:`ModelOutput` whose
  ``logits`` (N, K) and ``features`` are the classifier's on the (first)
  restoration ``x_r``, and ``aux['pssr']`` holds, for the input ``x'``:

  * ``input`` (N, H, W, C): ``x'``; ``mask`` (N, H, W) bool: ``M``;
  * ``raw_logits`` (N, K), ``raw_features`` (N, D): ``f(x')``, ``phi(x')``;
  * ``restored`` (R, N, H, W, C), ``logits_r`` (R, N, K), ``features_r``
    (R, N, D): the R restorations (R = 2 in training mode, with different
    dropout draws; R = 1 in evaluation mode) and the classifier's outputs.

  Attributes:
    classifier: any jaxdef model (its parameters live under ``classifier/``).
    regenerator: the conditional U-Net (``regenerator/``).
    rho: fraction of pixels removed.
    condition: 'soft' or 'features', the regenerator's condition.
    classifier_train: run the classifier in training mode when the pipeline
      is (joint fine-tuning); False keeps it in evaluation mode (frozen).
  """
  classifier: nn.Module
  regenerator: nn.Module
  rho: float = 0.2
  condition: str = "soft"
  classifier_train: bool = False

  def classify(self, x: Array, train: bool = False) -> ModelOutput:
    """The bare classifier ``f`` on ``x`` (N, H, W, C)."""
    return self.classifier(x, train=train and self.classifier_train)

  def surgery_mask(self, x: Array) -> Array:
    """``M`` (N, H, W) of :func:`top_rho_mask` on :func:`surgery_score` of ``x``,
    with the classifier in evaluation mode; no gradient flows through it."""
    loss = lambda clf, z: own_prediction_loss(clf(z, train=False)["logits"])
    (grad,) = nn.grad(loss, self.classifier, jax.lax.stop_gradient(x))
    return top_rho_mask(channel_saliency(grad), self.rho)

  def _condition(self, out: ModelOutput) -> Array:
    if self.condition == "soft":
      return jax.nn.softmax(out["logits"], axis=-1)
    return out["features"]["penultimate"]

  def _restorations(self, x: Array, train: bool) -> tuple[Array, list[Array]]:
    mask = self.surgery_mask(x)
    x_s = remove_pixels(x, mask)
    cond = self._condition(self.classify(x_s, train))
    count = TRAIN_RESTORATIONS if train else 1
    return mask, [restore_pixels(x, mask, self.regenerator(x_s, mask, cond, train=train))
                  for _ in range(count)]

  def transform(self, x: Array, train: bool = False) -> Array:
    """``x' -> x_r`` (N, H, W, C): surgery then regeneration (one restoration)."""
    return self._restorations(x, train)[1][0]

  def __call__(self, x: Array, train: bool = False,
               labels: Optional[Array] = None) -> ModelOutput:
    raw = self.classify(x, train)  # first, so that init creates the classifier here
    mask, restored = self._restorations(x, train)
    outs = [self.classify(x_r, train) for x_r in restored]
    stack = lambda get: jnp.stack([get(o) for o in outs])
    aux = dict(outs[0]["aux"])
    aux["pssr"] = {
        "input": x, "mask": mask, "raw_logits": raw["logits"],
        "raw_features": raw["features"]["penultimate"], "restored": jnp.stack(restored),
        "logits_r": stack(lambda o: o["logits"]),
        "features_r": stack(lambda o: o["features"]["penultimate"]),
    }
    return ModelOutput(logits=outs[0]["logits"], features=outs[0]["features"], aux=aux)


def _positive_int(name: str, value: Any) -> int:
  if int(value) != value or value < 1:
    raise ConfigError(f"PSSR: model.kwargs.{name} must be a positive integer, got {value}")
  return int(value)


@register_model("pssr")
def make_pssr_model(*, num_classes: int, mean, std, dtype: Any = jnp.float32, insert=None,
                    classifier: str = "small_cnn", classifier_kwargs: Optional[dict] = None,
                    rho: float = 0.2, condition: str = "soft", classifier_train: bool = False,
                    width: int = 16, levels: int = 2, dropout: float = 0.1) -> PSSR:
  """The ``pssr`` model: classifier ``classifier`` (built with ``classifier_kwargs``
  and the defense ``insert``, if any) plus a :class:`ConditionalUNet` of
  ``width``, ``levels`` and ``dropout``; ``rho`` (docs/methods.md: 0.1-0.2 CIFAR,
  0.2-0.3 MNIST), ``condition`` and ``classifier_train`` as in :class:`PSSR`.
  """
  if classifier == "pssr":
    raise ConfigError("PSSR: model.kwargs.classifier must be a classifier, not 'pssr'")
  if not 0 < rho < 1:
    raise ConfigError(f"PSSR: model.kwargs.rho must be in (0, 1), got {rho}")
  if condition not in CONDITIONS:
    raise unknown_name("PSSR condition (model.kwargs.condition)", condition, CONDITIONS)
  if not 0 <= dropout < 1:
    raise ConfigError(f"PSSR: model.kwargs.dropout must be in [0, 1), got {dropout}")
  clf = create_model(classifier, num_classes=num_classes, mean=mean, std=std, dtype=dtype,
                     insert=insert, **(classifier_kwargs or {}))
  unet = ConditionalUNet(width=_positive_int("width", width),
                         levels=_positive_int("levels", levels), dropout=float(dropout),
                         dtype=dtype)
  return PSSR(classifier=clf, regenerator=unet, rho=float(rho), condition=condition,
              classifier_train=bool(classifier_train))


def pssr_parts(model: nn.Module, variables: dict
               ) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
  """``(classifier_logits_fn, transform_fn)`` of a trained ``pssr`` model, in
  evaluation mode (deterministic: no dropout), both pure and differentiable.

  ``classifier_logits_fn(x)`` (N, H, W, C) -> (N, K) is the bare classifier;
  ``transform_fn(x')`` -> ``x_r`` (N, H, W, C) is surgery + regeneration, so
  the pipeline's logits are ``classifier_logits_fn(transform_fn(x))``. BPDA
  replaces ``transform_fn``'s backward pass by the identity; its own gradient
  treats the mask as a constant (the score sits under ``stop_gradient``).
  """
  if not isinstance(model, PSSR):
    raise ValueError(f"pssr_parts needs a 'pssr' model, got {type(model).__name__}")
  classify = lambda x: model.apply(variables, x, method=PSSR.classify)["logits"]
  transform = lambda x: model.apply(variables, x, method=PSSR.transform)
  return classify, transform
