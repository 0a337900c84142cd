"""AAD: attention rectification and preservation (docs/methods.md section 3).

"Attention, Please! Adversarial Defense via Activation Rectification and
Preservation", Wu et al., ACM TOMM 2023 (arXiv 1811.09831). Grad-CAM maps
(:mod:`jaxdef.saliency`) of the true class enter the training loss:

    ce_weight * [CE(f(x), y) + CE(f(x_adv), y)] + rect_weight * L_rect + pres_weight * L_pres

(8, 4, 1 in the paper) with

* ``L_rect = -mean((p(x) - p(x_m))^2) - mean((p(x_adv) - p(x_adv_m))^2)``,
  ``x_m = x * (1 - Att(x))``: the prediction must change when the attended
  region is removed, i.e. depend on it (:func:`rectification_loss`);
* ``L_pres = sum (cam(x) - cam(x_adv))^2`` over the resized maps: the
  adversarial image keeps the clean image's attention (:func:`preservation_loss`).

How it meets the trainer (:class:`jaxdef.defenses.base.Defense`): the host
objective's outer loss (``at``: ``CE(f(x_adv), y)``) is scaled by
``objective_weight = ce_weight``, ``loss_term`` adds ``ce_weight * CE(f(x), y)``
on the trainer's clean pass, and ``model_loss`` adds the two attention terms
with extra model calls (Grad-CAM of x and x_adv, then the masked images).
With ``objective.name = 'at'`` this is the paper's objective; another
objective replaces the adversarial CE term by its own loss.

Adversarial examples (``generator``):

* 'stepll' (the paper): one FGSM step of size eps towards the least-likely
  class (lowest logit), CE with label smoothing 0.1 (:func:`step_ll`), eps
  0.075 by default (about 19/255; ``eps=None`` uses ``attack.eps``), ramped
  with ``attack.warmup_epochs`` like PGD.
* 'pgd': the trainer's PGD generator (``attack.*``).

``iterated`` (the paper's "iteratively attacked samples"): two updates per
batch, on StepLL(x) and then, with the updated weights, on StepLL(StepLL(x))
(``updates_per_batch = 2``; the least-likely class is recomputed at the
second start). jaxdef's choice for the second sample's ball, ``ball``:

* 'chained' (default): the literal composition; each StepLL is an eps step
  from its own input (clipped to [0, 1]), so the second sample can be 2 eps
  from x (and a strong sample up to (2 + iou_extra) eps).
* 'clean': every sample is projected back into the eps-ball around the clean
  x (the threat model of evaluation). An eps step from a point of the ball's
  surface can then only return pixels whose gradient sign flipped to x, so
  the second sample is weaker.

With 'pgd', ``iterated`` makes two updates on two fresh PGD samples.

``iou_select`` (strong-sample selection): while the IoU between the clean and
the adversarial attention regions stays above ``iou_threshold`` (0.595),
StepLL is applied again to that example (ball as above), at most
``iou_extra`` (4) more times; a ``fori_loop`` with per-example masks.

Choices where the paper leaves a detail open: the Grad-CAM RMS is per
example; ``mean`` in ``L_rect`` is over classes and the batch; ``sum`` in
``L_pres`` is over the pixels of one example, averaged over the batch; the
attention maps inside the loss are computed in training mode (BatchNorm with
the batch's statistics, running statistics not updated by these passes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdef import attacks
from jaxdef.attacks.losses import cross_entropy
from jaxdef.attacks.pgd import loop_unroll
from jaxdef.saliency import attention_iou, attention_maps, attention_region
from jaxdef.defenses.base import ApplyFn, Defense, register
from jaxdef.errors import ConfigError, unknown_name

Array = jax.Array
GENERATORS = ("stepll", "pgd")
BALLS = ("chained", "clean")


def step_ll(forward: ApplyFn, x: Array, *, eps: float, key: Array, norm: str = "linf",
            smoothing: float = 0.1) -> Array:
  """StepLL (Kurakin et al. 2017): one targeted step of size ``eps`` from ``x``
  towards its least-likely class, lowering the label-smoothed CE of that class
  (:func:`jaxdef.attacks.least_likely`), so the result is in the ``eps``-ball
  around ``x`` and in [0, 1].
  """
  return attacks.least_likely(lambda z: forward(z)["logits"], x, key=key, eps=eps,
                              kind="stepll", norm=norm, smoothing=smoothing, unroll=1)


def rectification_loss(apply: ApplyFn, x: Array, attention) -> Array:
  """``-mean_k (p_k(x) - p_k(x_m))^2`` with ``x_m = x * (1 - Att(x))``, (N,).

  ``attention``: :class:`jaxdef.saliency.AttentionMaps` of ``x`` (its logits
  give ``p(x)``).
  """
  x_masked = x * (1.0 - attention_region(attention.maps))[..., None].astype(x.dtype)
  p = jax.nn.softmax(attention.logits, axis=-1)
  p_masked = jax.nn.softmax(apply(x_masked)["logits"], axis=-1)
  return -jnp.mean(jnp.square(p - p_masked), axis=-1)


def preservation_loss(maps_clean: Array, maps_adv: Array) -> Array:
  """``sum_{h, w} (cam(x) - cam(x_adv))^2`` per example, (N,)."""
  return jnp.sum(jnp.square(maps_clean - maps_adv), axis=(1, 2))


def attention_loss(apply: ApplyFn, x: Array, x_adv: Array, labels: Array, *, layer: str,
                   rect_weight: float, pres_weight: float) -> Array:
  """``rect_weight * L_rect + pres_weight * L_pres`` per example (the ``model_loss`` hook)."""
  clean = attention_maps(apply, x, labels, layer)
  adv = attention_maps(apply, x_adv, labels, layer)
  rect = rectification_loss(apply, x, clean) + rectification_loss(apply, x_adv, adv)
  return rect_weight * rect + pres_weight * preservation_loss(clean.maps, adv.maps)


def select_strong(forward: ApplyFn, x: Array, labels: Array, x_adv: Array,
                  again: Callable[[Array], Array], *, layer: str, threshold: float,
                  extra: int, unroll: Optional[int | bool] = None) -> Array:
  """Strong-sample selection: per example, ``x_adv <- again(x_adv)`` while the IoU
  of the clean and adversarial attention regions is above ``threshold``, at
  most ``extra`` times. Static shapes: every round computes ``again`` for the
  whole batch and keeps it where the example is still selected."""
  clean = attention_maps(forward, x, labels, layer).maps

  def round_(_, carry):
    x_adv, active = carry
    iou = attention_iou(clean, attention_maps(forward, x_adv, labels, layer).maps)
    active = active & (iou > threshold)
    return jnp.where(active[:, None, None, None], again(x_adv), x_adv), active

  x_adv, _ = jax.lax.fori_loop(0, extra, round_, (x_adv, jnp.ones(labels.shape, bool)),
                               unroll=loop_unroll(unroll, extra))
  return x_adv


def stepll_generator(*, eps: Optional[float], smoothing: float, ball: str, iou_select: bool,
                     iou_threshold: float, iou_extra: int, layer: str) -> Callable:
  """The ``Defense.generate`` hook: StepLL from ``x_start`` (+ strong-sample selection)."""
  def generate(forward, x, y, key, budget, step, x_start):
    ramp = budget if eps is None else dataclasses.replace(budget, eps=eps, step_size=eps)
    eps_t, _ = ramp.at_step(step)

    def again(z):
      z = step_ll(forward, z, eps=eps_t, key=key, norm=budget.norm, smoothing=smoothing)
      return attacks.project(z, x, eps_t, budget.norm) if ball == "clean" else z

    x_adv = again(x_start)
    if iou_select:
      x_adv = select_strong(forward, x, y, x_adv, again, layer=layer, threshold=iou_threshold,
                            extra=iou_extra, unroll=budget.unroll)
    return x_adv

  return generate


@register("aad")
def make_aad(layer: str = "auto", ce_weight: float = 8.0, rect_weight: float = 4.0,
             pres_weight: float = 1.0, generator: str = "stepll", eps: Optional[float] = 0.075,
             smoothing: float = 0.1, iterated: bool = True, ball: str = "chained",
             iou_select: bool = False, iou_threshold: float = 0.595,
             iou_extra: int = 4) -> Defense:
  """AAD with the paper's weights (8, 4, 1) by default; see the module docstring.

  Args:
    layer: Grad-CAM tap point ('auto': the deepest one with >= 8 x 8 cells).
    ce_weight, rect_weight, pres_weight: weights of the CE terms, ``L_rect``
      and ``L_pres``. The CE terms weigh 16 in all: scale the learning rate.
    generator: 'stepll' or 'pgd' (the trainer's ``attack.*`` PGD).
    eps: StepLL step and ball (None: ``attack.eps``).
    smoothing: label smoothing of StepLL's CE.
    iterated: a second update per batch on StepLL(StepLL(x)).
    ball: 'chained' or 'clean', the ball of repeated StepLL steps.
    iou_select, iou_threshold, iou_extra: strong-sample selection.
  """
  if generator not in GENERATORS:
    raise unknown_name("AAD generator (defense.kwargs.generator)", generator, GENERATORS)
  if ball not in BALLS:
    raise unknown_name("AAD ball (defense.kwargs.ball)", ball, BALLS)
  if generator == "pgd" and iou_select:
    raise ConfigError("AAD: iou_select re-applies StepLL; it needs generator='stepll'")
  if eps is not None:
    attacks.check_budget(eps=eps, step_size=eps, steps=1, norm="linf")
  if int(iou_extra) != iou_extra or iou_extra < 0:
    raise ConfigError(f"AAD: iou_extra must be a non-negative integer, got {iou_extra}")
  generate = None
  if generator == "stepll":
    generate = stepll_generator(eps=eps, smoothing=smoothing, ball=ball, iou_select=iou_select,
                                iou_threshold=iou_threshold, iou_extra=int(iou_extra),
                                layer=layer)
  model_loss = None
  if rect_weight or pres_weight:
    model_loss = functools.partial(attention_loss, layer=layer, rect_weight=rect_weight,
                                   pres_weight=pres_weight)
  return Defense(
      name="aad",
      loss_term=lambda out_clean, out_adv, y: ce_weight * cross_entropy(out_clean["logits"], y),
      needs_clean_pass=True,
      objective_weight=ce_weight,
      model_loss=model_loss,
      generate=generate,
      updates_per_batch=2 if iterated else 1,
      hyperparameters=dict(layer=layer, ce_weight=ce_weight, rect_weight=rect_weight,
                           pres_weight=pres_weight, generator=generator, eps=eps,
                           smoothing=smoothing, iterated=iterated, ball=ball,
                           iou_select=iou_select, iou_threshold=iou_threshold,
                           iou_extra=int(iou_extra)),
  )
