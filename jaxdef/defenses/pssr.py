"""PSSR: Pixel Surgery and Semantic Regeneration (METHODS.md section 5).

"Invariance-powered Trustworthy Defense via Remove Then Restore", Fu et al.,
arXiv 2402.00304. Only the abstract is public: everything below is jaxdef's
RECONSTRUCTION of it, following METHODS.md 5.1-5.4, with every open choice
stated here.

The defended pipeline, for an input ``x'`` (N, H, W, C) that may be adversarial:

1. Pixel surgery (5.1, :func:`surgery_score`, :func:`top_rho_mask`):
   ``s = sum_c |d CE(f(x'), argmax f(x')) / d x'|`` (N, H, W), no label used;
   ``M`` = 1 on the ``k = round(rho * H * W)`` highest-scoring pixels of each
   image (:func:`removed_pixel_count`: half-up rounding; ties go to the lower
   row-major pixel index, ``lax.top_k``'s order); ``x_s = x' * (1 - M)``
   (:func:`remove_pixels`), every other pixel bit-identical to ``x'``,
   its small perturbation included. The score is computed with the
   classifier in evaluation mode (BatchNorm running statistics) and the mask
   is piecewise constant in ``x'``: no gradient flows through ``M``.
2. Semantic regeneration (5.2): ``c`` = the classifier's soft prediction
   ``softmax f(x_s)`` ('soft', default) or its penultimate features
   ``phi(x_s)`` ('features'); ``G(x_s, M, c)`` is the conditional U-Net of
   :mod:`jaxdef.models.unet` (output in [0, 1]);
   ``x_r = M * G + (1 - M) * x'`` (:func:`restore_pixels`; outside the mask
   ``x_r`` is ``x'`` bit for bit).
3. The defended logits are ``f(x_r)``.

Training objective (5.2-5.4, :func:`pssr_objective`), per example, on the PGD
examples ``x_adv`` of the classifier alone (MNIST eps 0.3, CIFAR 8/255: the
config's ``attack.*``, ramped by ``attack.warmup_epochs``) and on the clean
``x``; in training mode every input gets TWO restorations ``x_r1, x_r2`` that
differ by the regenerator's dropout draws:

    T(x_in) = mean_i [CE(f(x_ri), y) + lam_pix L_pix(x_ri) + lam_sem L_sem(x_ri)]
              + alpha L_rd(x_r1, x_r2)
    loss    = T(x_adv) + clean_weight * T(x)

* ``L_pix = mean_{h,w,c} w_hw |x_r - x|`` with ``w = mask_weight`` (5) inside
  ``M`` and 1 outside. Outside ``M``, ``x_r - x`` is the residual perturbation
  ``x' - x``: a constant for the regenerator, kept so the value reads as the
  paper's ``|x_r - x|_1``.
* ``L_sem = mean_d (phi(x_r) - phi(x))^2 + KL(f(x) || f(x_r))`` (mean over
  the D penultimate features, so its scale does not grow with D).
* ``L_rd = 0.5 [KL(f(x_r1) || f(x_r2)) + KL(f(x_r2) || f(x_r1))]`` (5.3).
* The targets ``x``, ``f(x)`` and ``phi(x)`` are the clean image and the
  classifier's outputs on it, under ``stop_gradient`` (targets, not trained).
* ``T(x)``, the clean term (weight ``clean_weight``, default 1), is jaxdef's
  choice beyond the R-drop "self-augmentation" on clean inputs that 5.3 asks
  for: surgery runs on every input at test time, so the regenerator must also
  restore clean images.

How it meets the trainer (one trainer, no second loop): the registered model
``pssr`` (:class:`PSSR`, classifier and regenerator as Flax submodules) is
what ``launch.py`` trains, and the registered defense ``pssr`` supplies the
hooks of :class:`jaxdef.defenses.base.Defense`: ``generate`` = PGD on the
classifier's own logits (:func:`classifier_pgd`), ``objective_weight = 0``
(the host objective only logs), ``needs_clean_pass`` and ``loss_term`` =
:func:`pssr_objective`, read from the auxiliary outputs of the trainer's
clean and adversarial passes (so no extra model call is made), and
``rng_collections = ('dropout',)``. The classifier is initialised from a
trained run (``train.init_from.classifier``, aliased as
``pssr.classifier_workdir`` in ``configs/pssr_*.py``) and either frozen
(``train.trainable = '^regenerator/'`` and model kwarg
``classifier_train=False``: its parameters get zero updates, and it always
runs in evaluation mode, so its BatchNorm statistics never change) or
fine-tuned jointly (``train.trainable = ''``, ``classifier_train=True``: it
runs in training mode, and each of its calls in a training pass updates the
running statistics).

For evaluation, ``jaxdef.restore(workdir)`` returns the logits of the whole
pipeline (evaluation mode: one deterministic restoration, no dropout);
:func:`pssr_parts` gives the classifier and the transform ``x' -> x_r``
separately, for BPDA (identity backward through the transform) and for
full-differentiation attacks; the evaluation suite reaches them as the
registered test-time transform ``pssr`` (``eval.transform = 'pssr'``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdef import attacks
from jaxdef.attacks.losses import cross_entropy, kl_divergence
from jaxdef.defenses.base import Defense, TestTimeTransform, register, register_transform
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


# ---- losses (5.2-5.4) -----------------------------------------------------------------

def pixel_loss(x_r: Array, x: Array, mask: Array, mask_weight: float) -> Array:
  """``L_pix = mean_{h,w,c} w |x_r - x|``, ``w = mask_weight`` in ``M`` and 1 elsewhere, (N,)."""
  weight = jnp.where(mask[..., None], mask_weight, 1.0)
  return jnp.mean(weight * jnp.abs(x_r - x), axis=(1, 2, 3))


def semantic_loss(features_r: Array, features: Array, logits_r: Array, logits: Array
                  ) -> Array:
  """``L_sem = mean_d (phi(x_r) - phi(x))^2 + KL(f(x) || f(x_r))``, (N,).

  ``features*`` (N, D) penultimate features, ``logits*`` (N, K); the
  un-suffixed ones are of the clean image.
  """
  feature_gap = jnp.mean(jnp.square(features_r.astype(jnp.float32)
                                    - features.astype(jnp.float32)), axis=-1)
  return feature_gap + kl_divergence(logits, logits_r)


def rdrop_loss(logits_1: Array, logits_2: Array) -> Array:
  """``L_rd = 0.5 [KL(f(x_r1) || f(x_r2)) + KL(f(x_r2) || f(x_r1))]``, (N,)."""
  return 0.5 * (kl_divergence(logits_1, logits_2) + kl_divergence(logits_2, logits_1))


def restoration_terms(out: dict, clean: dict, labels: Array, *, lam_pix: float,
                      lam_sem: float, alpha: float, mask_weight: float) -> Array:
  """``T(x_in)`` of the module docstring for one pass of the :class:`PSSR` model, (N,).

  ``out`` and ``clean`` are the ``aux['pssr']`` outputs (see
  :meth:`PSSR.__call__`) of the pass on ``x_in`` and of the pass on the
  clean ``x``; the latter supplies the targets ``x``, ``f(x)``, ``phi(x)``.
  """
  target = jax.lax.stop_gradient(clean["input"])
  target_logits = jax.lax.stop_gradient(clean["raw_logits"])
  target_features = jax.lax.stop_gradient(clean["raw_features"])
  restored, logits_r, features_r = out["restored"], out["logits_r"], out["features_r"]
  if restored.shape[0] < 2:
    raise ValueError("the R-drop term needs two restorations (the model's training mode)")
  per_restoration = [
      cross_entropy(logits_r[i], labels)
      + lam_pix * pixel_loss(restored[i], target, out["mask"], mask_weight)
      + lam_sem * semantic_loss(features_r[i], target_features, logits_r[i], target_logits)
      for i in range(restored.shape[0])]
  return (sum(per_restoration) / len(per_restoration)
          + alpha * rdrop_loss(logits_r[0], logits_r[1]))


def pssr_objective(out_clean: dict, out_adv: dict, labels: Array, *, lam_pix: float,
                   lam_sem: float, alpha: float, mask_weight: float,
                   clean_weight: float) -> Array:
  """``T(x_adv) + clean_weight * T(x)`` per example (the ``loss_term`` hook), (N,)."""
  terms = lambda out: restoration_terms(out["aux"]["pssr"], out_clean["aux"]["pssr"], labels,
                                        lam_pix=lam_pix, lam_sem=lam_sem, alpha=alpha,
                                        mask_weight=mask_weight)
  loss = terms(out_adv)
  if clean_weight:
    loss = loss + clean_weight * terms(out_clean)
  return loss


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
  ``width``, ``levels`` and ``dropout``; ``rho`` (METHODS.md: 0.1-0.2 CIFAR,
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


@register_transform("pssr")
def make_pssr_transform(*, model: nn.Module, variables: dict, **context) -> TestTimeTransform:
  """``eval.transform = 'pssr'``: the evaluation attacks the bare classifier
  (non-adaptive) and, adaptively, the whole pipeline, from :func:`pssr_parts`
  of the restored ``pssr`` run (deterministic: no randomness to average)."""
  classify, transform = pssr_parts(model, variables)
  return TestTimeTransform(classifier=classify, transform=transform, randomized=False,
                           info={"rho": model.rho, "condition": model.condition})


# ---- the defense: trainer hooks -------------------------------------------------------

def classifier_pgd(forward, x: Array, y: Array, key: Array, budget, step: Array,
                   x_start: Array) -> Array:
  """The ``Defense.generate`` hook: PGD (CE, uniform start; ``attack.*`` budget,
  ramped) on the bare classifier's logits ``aux['pssr']['raw_logits']``, not
  on the pipeline: the examples PSSR is trained to repair. Under ``jit`` the
  unused rest of the pipeline is dead code."""
  eps, step_size = budget.at_step(step)
  loss = lambda z: cross_entropy(forward(z)["aux"]["pssr"]["raw_logits"], y)
  return attacks.perturb(loss, x, key=key, eps=eps, step_size=step_size, steps=budget.steps,
                         norm=budget.norm, init="uniform", unroll=budget.unroll)


def _require_pssr_model(model_name: str, num_classes: int) -> None:
  """The ``Defense.insert`` hook, used only to check the pairing: the defense reads
  the auxiliary outputs of the ``pssr`` model and inserts nothing."""
  if model_name != "pssr":
    raise ConfigError(f"defense 'pssr' needs model.name='pssr' (the classifier goes in "
                      f"model.kwargs.classifier), got model.name={model_name!r}")
  return None


@register("pssr")
def make_pssr(lam_pix: float = 1.0, lam_sem: float = 1.0, alpha: float = 1.0,
              mask_weight: float = 5.0, clean_weight: float = 1.0) -> Defense:
  """The ``pssr`` defense (use with ``model.name = 'pssr'``); see the module docstring.

  Args:
    lam_pix, lam_sem, alpha: weights of ``L_pix``, ``L_sem`` and ``L_rd``
      (METHODS.md 5.4 starts at 1, 1, 1).
    mask_weight: weight of the removed pixels in ``L_pix`` (others 1).
    clean_weight: weight of the clean-input term ``T(x)``.
  """
  for name, value in (("lam_pix", lam_pix), ("lam_sem", lam_sem), ("alpha", alpha),
                      ("mask_weight", mask_weight), ("clean_weight", clean_weight)):
    if not value >= 0:
      raise ConfigError(f"PSSR: defense.kwargs.{name} must be >= 0, got {value}")
  weights = dict(lam_pix=float(lam_pix), lam_sem=float(lam_sem), alpha=float(alpha),
                 mask_weight=float(mask_weight), clean_weight=float(clean_weight))
  return Defense(
      name="pssr",
      insert=_require_pssr_model,
      generate=classifier_pgd,
      objective_weight=0.0,
      needs_clean_pass=True,
      loss_term=lambda out_clean, out_adv, y: pssr_objective(out_clean, out_adv, y, **weights),
      rng_collections=("dropout",),
      hyperparameters=weights,
  )
