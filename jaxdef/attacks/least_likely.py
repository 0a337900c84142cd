"""Least-likely-class attacks (Kurakin et al. 2017; Tramer et al. 2018).

One implementation serves AAD's training generator (StepLL with label
smoothing, :mod:`jaxdef.defenses.aad`) and the evaluation's ``stepll``,
``r+stepll`` and ``iterll`` columns: targeted steps of :func:`~jaxdef.attacks.pgd.pgd`
towards the class the attacked model finds least likely on the clean input.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdef.attacks.common import keyed
from jaxdef.attacks.eager import compiles_itself
from jaxdef.attacks.losses import cross_entropy
from jaxdef.attacks.pgd import pgd
from jaxdef.errors import unknown_name

Array = jax.Array
KINDS = ("stepll", "r+stepll", "iterll")


def iterll_steps(eps: float) -> int:
  """Iterations of the iterative least-likely attack at step 1/255: Kurakin et
  al.'s ``min(255 eps + 4, 1.25 * 255 eps)`` (80 at eps 0.3, 10 at 8/255)."""
  return max(1, int(round(min(255 * eps + 4, 1.25 * 255 * eps))))


@compiles_itself
def least_likely(logits_fn: Callable[..., Array], x: Array, *, key: Array, eps: float,
                 kind: str = "stepll", norm: str = "linf", smoothing: float = 0.0,
                 randomized: bool = False, eot_samples: int = 1,
                 unroll: Optional[int | bool] = None) -> Array:
  """``x_adv`` in the eps-ball around ``x`` (and in [0, 1]), moved towards each
  example's least-likely class by lowering its (label-smoothed) CE.

  Kinds: 'stepll', one step of size eps from ``x``; 'r+stepll', a random step
  of eps/2 (``half_sign``) then one of eps/2; 'iterll', :func:`iterll_steps`
  steps of 1/255 (needs a concrete eps; the others take a traced one).
  ``logits_fn`` takes ``(x, key)`` when ``randomized`` (EOT over
  ``eot_samples`` draws per step).
  """
  if kind == "stepll":
    budget = dict(steps=1, step_size=eps, init="none")
  elif kind == "r+stepll":
    budget = dict(steps=1, step_size=eps / 2, init="half_sign")
  elif kind == "iterll":
    budget = dict(steps=iterll_steps(eps), step_size=1 / 255, init="none")
  else:
    raise unknown_name("least-likely attack", kind, KINDS)
  model = keyed(logits_fn, randomized)
  target = jnp.argmin(jax.lax.stop_gradient(model(x, key)), axis=-1)
  towards = lambda z, k: -cross_entropy(model(z, k), target, smoothing)
  return pgd(logits_fn, x, target, key=key, eps=eps, norm=norm, targeted=True,
             randomized=randomized, eot_samples=eot_samples, loss_fn=towards, unroll=unroll,
             **budget)
