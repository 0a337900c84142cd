"""PSSR: Pixel Surgery and Semantic Regeneration (docs/methods.md section 5).

"Invariance-powered Trustworthy Defense via Remove Then Restore", Fu et al.,
arXiv 2402.00304. Only the abstract is public: everything below is jaxdef's
RECONSTRUCTION of it, following docs/methods.md 5.1-5.4, with every open choice
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
what ``jaxdef train`` trains, and the registered defense ``pssr`` supplies the
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

from typing import Any

import jax
import jax.numpy as jnp

from jaxdef import attacks
from jaxdef.attacks.losses import cross_entropy, kl_divergence
from jaxdef.defenses.base import Defense, TestTimeTransform, register, register_transform
from jaxdef.errors import ConfigError
# The pipeline model and its pixel surgery live in jaxdef.models.pssr (a model
# like any other); re-exported here, where the method's pieces are looked up.
from jaxdef.models.pssr import (CONDITIONS, PSSR, TRAIN_RESTORATIONS,  # noqa: F401
                                channel_saliency, make_pssr_model, own_prediction_loss,
                                pssr_parts, remove_pixels, removed_pixel_count,
                                restore_pixels, surgery_score, top_rho_mask)

Array = jax.Array


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


@register_transform("pssr")
def make_pssr_transform(*, run: Any, config: Any = None, data: Any = None
                        ) -> TestTimeTransform:
  """``eval.transform = 'pssr'``: the evaluation attacks the bare classifier
  (non-adaptive) and, adaptively, the whole pipeline, from :func:`pssr_parts`
  of the restored ``pssr`` run (deterministic: no randomness to average)."""
  del config, data
  classify, transform = pssr_parts(run.model, run.variables)
  return TestTimeTransform(classifier=classify, transform=transform, randomized=False,
                           info={"rho": run.model.rho, "condition": run.model.condition})


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
      (docs/methods.md 5.4 starts at 1, 1, 1).
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
