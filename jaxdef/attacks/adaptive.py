"""Adaptive attacks on whole defended pipelines: BPDA and EOT (docs/methods.md sec. 6).

An input-transformation defense (NIP, PSSR) deploys ``classifier(t(x))``. An
attack that only sees the classifier is non-adaptive; an adaptive one attacks
the pipeline. When ``t`` is not usefully differentiable (an iterative
purification, a hard top-k mask) BPDA (Athalye et al., ICML 2018, sec. 4.1)
keeps its forward pass and replaces its backward pass by the identity; when
it is cheap and differentiable the attack differentiates straight through it.
When ``t`` (or the classifier) draws randomness, every attack of the suite
averages the gradient over draws of it (EOT: ``pgd(..., randomized=True,
eot_samples=K)``, ``apgd``/``autoattack(..., randomized=True, eot_iter=K)``).

    logits = defended_logits_fn(classifier, transform, backward="bpda")
    x_adv = attacks.pgd(logits, x, y, key=key, eps=8/255, step_size=2/255, steps=20)
"""

from __future__ import annotations

from typing import Callable

import jax

from jaxdef.errors import unknown_name

Array = jax.Array
BACKWARDS = ("bpda", "exact")


@jax.custom_vjp
def straight_through(x: Array, y: Array) -> Array:
  """``y`` in the forward pass; in the backward pass the cotangent goes to ``x``
  unchanged and nothing to ``y`` (the identity approximation of BPDA)."""
  return y


def _straight_through_fwd(x, y):
  return y, None


def _straight_through_bwd(_, g):
  return g, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def bpda(transform: Callable[..., Array]) -> Callable[..., Array]:
  """``transform`` with its backward pass replaced by the identity.

  The forward value is exactly ``transform(x, *args)`` (bit-identical); the
  gradient with respect to ``x`` is the incoming gradient, so the attack sees
  the classifier's gradient at the transformed point. ``transform`` must keep
  the shape of ``x``.
  """
  def approximated(x: Array, *args) -> Array:
    return straight_through(x, jax.lax.stop_gradient(transform(x, *args)))
  return approximated


def defended_logits_fn(logits_fn: Callable[[Array], Array], transform: Callable[..., Array], *,
                       backward: str = "bpda", randomized: bool = False
                       ) -> Callable[..., Array]:
  """The pipeline ``logits_fn(transform(x))`` as an attack target.

  Args:
    logits_fn: the bare classifier, ``x -> logits``.
    transform: the defense's input transformation, ``x -> x'`` of the same
      shape, or ``(x, key) -> x'`` when ``randomized``.
    backward: 'bpda' (identity backward through ``transform``) or 'exact'
      (differentiate through it).
    randomized: ``transform`` takes a key; the result is then
      ``(x, key) -> logits`` (give the attacks ``randomized=True``).
  """
  if backward not in BACKWARDS:
    raise unknown_name("adaptive attack backward pass", backward, BACKWARDS)
  t = bpda(transform) if backward == "bpda" else transform
  if randomized:
    return lambda x, key: logits_fn(t(x, key))
  return lambda x: logits_fn(t(x))
