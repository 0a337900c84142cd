"""Grad-CAM and layer gradients: pure functions of a model (docs/methods.md section 3).

    maps = grad_cam(model, variables, x, labels, layer="stage3")   # (N, H, W)

For a tap point ``A`` (N, H', W', K) of any jaxdef model (see
:mod:`jaxdef.models.base`) and the **true** class logit ``z_y``:

* ``g = d z_y / d A``, obtained by differentiating with respect to a zeros
  ``perturbations`` collection at the tap points, then normalised by its
  root-mean-square over (H', W', K) per example: ``g / (rms(g) + 1e-5)``;
* channel weights ``w_k = mean_{h, w} g[..., k]``; ``cam = sum_k w_k A_k``;
* a softmax over the H'W' cells (the reference uses softmax, not ReLU), so
  the cells of one example sum to 1 (:attr:`AttentionMaps.cells`);
* bilinear resize to the input's H x W (:attr:`AttentionMaps.maps`).

Everything is differentiable with respect to the model's parameters (the
gradient ``g`` is itself differentiated: second order), which AAD's
preservation loss needs. The attention region ``Att = 1[cam > mean(cam)]``
carries no gradient.

``layer='auto'`` picks the deepest 4-D tap point with at least 8 x 8 cells
(the reference's 8 x 8 CIFAR layer): ``stage3`` of ResNet-18 on CIFAR-10,
``conv4`` of the small CNN on MNIST (8 x 8) and CIFAR-10 (10 x 10).

AAD's losses (:mod:`jaxdef.defenses.aad`), NIP's neuron influence
(:mod:`jaxdef.defenses.nip`) and the evaluation's attention report
(:mod:`jaxdef.evaluate.attention`) use these; nothing here restores, loads
or writes anything.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxdef.errors import ConfigError
from jaxdef.models.base import ApplyFn, apply_fn

Array = jax.Array
# What :func:`layer_gradient` differentiates: the class logit or its softmax probability.
SIGNALS = ("logit", "probability")
MIN_AUTO_CELLS = 8


class AttentionMaps(NamedTuple):
  """Grad-CAM of one batch.

  Attributes:
    cells: (N, H', W') softmax over the layer's cells; each example sums to 1.
    maps: (N, H, W) ``cells`` resized bilinearly to the input size.
    logits: (N, classes) of the same forward pass.
  """
  cells: Array
  maps: Array
  logits: Array


def resolve_tap(features: Mapping[str, Array], layer: str, *, what: str,
                spatial: bool) -> str:
  """The tap point ``layer`` names among ``features`` (in the model's order), or a
  one-line :class:`ConfigError` that says what ``what`` may name.

  ``spatial``: only 4-D points qualify, and 'auto' is the deepest 4-D one
  with at least 8 x 8 cells (else the deepest 4-D one); otherwise any point
  qualifies and 'auto' is left to the caller.
  """
  valid = [n for n, a in features.items() if a.ndim == 4] if spatial else list(features)
  kind = "4-D tap point" if spatial else "tap point"
  if not valid:
    raise ConfigError(f"{what} needs a {kind}; this model has none")
  if layer == "auto" and spatial:
    large = [n for n in valid if min(features[n].shape[1:3]) >= MIN_AUTO_CELLS]
    return (large or valid)[-1]
  if layer not in valid:
    raise ConfigError(f"{what} {layer!r} is not a {kind} of this model; valid: 'auto', "
                      f"{', '.join(valid)}")
  return layer


def resolve_layer(features: Mapping[str, Array], layer: str) -> str:
  """Grad-CAM's tap point: :func:`resolve_tap` over the 4-D points ('auto' allowed)."""
  return resolve_tap(features, layer, what="Grad-CAM layer", spatial=True)


def layer_gradient(apply: ApplyFn, x: Array, labels: Array, layer: str,
                   resolve: Callable[[Mapping[str, Array], str], str] = resolve_layer,
                   signal: str = "logit") -> tuple[Array, Array, Array]:
  """``(A, d z_y / d A, logits)`` at tap point ``layer`` for true labels ``labels``.

  ``signal``: 'logit' differentiates the class logit ``z_y``; 'probability'
  its softmax probability ``p_y`` (what a Keras model outputs, as in NIP's
  reference code). The gradient is that of the batch sum of the signal with respect to
  a zeros perturbation at every tap point; an alias of a point (``stage3`` =
  ``stage3.1``) gets its gradient through the point's primary name.
  ``resolve(features, layer)`` names the tap point (default: Grad-CAM's
  :func:`resolve_layer`, 4-D points only; NIP passes one that also takes
  vectors such as ``penultimate``).
  """
  if signal not in SIGNALS:
    raise ConfigError(f"unknown gradient signal {signal!r}: one of {', '.join(SIGNALS)}")
  shapes = jax.eval_shape(lambda z: apply(z)["features"], x)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  names: list[str] = []

  def true_logits(perturbations):
    out = apply(x, perturbations=perturbations)
    features = out["features"]
    chosen = resolve(features, layer)
    # Every name of the chosen point holds the same array: primary name and aliases.
    names[:] = [n for n in features if features[n] is features[chosen]]
    scores = out["logits"]
    if signal == "probability":
      scores = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    chosen_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    return jnp.sum(chosen_scores), (features[chosen], out["logits"])

  grads, (activation, logits) = jax.grad(true_logits, has_aux=True)(zeros)
  return activation, sum(grads[n] for n in names), logits


def grad_cam_cells(activation: Array, gradient: Array) -> Array:
  """Softmax Grad-CAM (N, H', W') from a layer's activation and gradient (N, H', W', K)."""
  a = activation.astype(jnp.float32)
  g = gradient.astype(jnp.float32)
  g = g / (jnp.sqrt(jnp.mean(jnp.square(g), axis=(1, 2, 3), keepdims=True)) + 1e-5)
  cam = jnp.einsum("nhwk,nk->nhw", a, jnp.mean(g, axis=(1, 2)))
  return jax.nn.softmax(cam.reshape(cam.shape[0], -1), axis=-1).reshape(cam.shape)


def attention_maps(apply: ApplyFn, x: Array, labels: Array, layer: str = "auto"
                   ) -> AttentionMaps:
  """Grad-CAM of ``apply`` on ``x`` (N, H, W, C) for the classes ``labels``."""
  activation, gradient, logits = layer_gradient(apply, x, labels, layer)
  cells = grad_cam_cells(activation, gradient)
  maps = jax.image.resize(cells, (x.shape[0], *x.shape[1:3]), "bilinear")
  return AttentionMaps(cells, maps, logits)


def grad_cam(model, variables: Mapping[str, Any], x: Array, labels: Array,
             layer: str = "auto", *, train: bool = False, resize: bool = True) -> Array:
  """Grad-CAM (N, H, W) of ``model`` with ``variables``; (N, H', W') if not ``resize``.

  ``train``: BatchNorm with the batch's statistics (not updated).
  """
  out = attention_maps(apply_fn(model, dict(variables), train=train), x, labels, layer)
  return out.maps if resize else out.cells


def attention_region(maps: Array) -> Array:
  """``Att = 1[cam > mean(cam)]`` per example, float32 of the maps' shape, no gradient."""
  maps = jax.lax.stop_gradient(maps)
  return (maps > jnp.mean(maps, axis=(1, 2), keepdims=True)).astype(jnp.float32)


def attention_iou(maps_a: Array, maps_b: Array) -> Array:
  """Intersection over union of the two attention regions, (N,) (1 where both are empty)."""
  a, b = attention_region(maps_a) > 0, attention_region(maps_b) > 0
  inter = jnp.sum(a & b, axis=(1, 2))
  union = jnp.sum(a | b, axis=(1, 2))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
