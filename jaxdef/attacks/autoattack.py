"""AutoAttack (Croce & Hein, ICML 2020, sec. 4): a fixed ensemble run in sequence.

Each attack only attacks the examples that every earlier one failed on, and
the result keeps, per example, the first adversarial point found (the worst
case over the ensemble). Versions and budgets are those of the reference
implementation:

* ``standard``: APGD-CE (100 steps, 1 restart), APGD-T (9 target classes,
  100 steps, 1 restart each), FAB-T (9 target classes, 100 steps), Square
  (5000 queries, p_init 0.8).
* ``plus``: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square,
  APGD-T, FAB-T.
* ``rand`` (randomized defenses): APGD-CE and APGD-DLR, 1 restart each, with
  the gradient averaged over 20 draws (EOT).

All of it is one pure function: jit it once and the batch never leaves the
device between attacks.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxdef.attacks.apgd import apgd_t_update, apgd_update
from jaxdef.attacks.common import keyed, start_from_clean
from jaxdef.attacks.fab import fab_update
from jaxdef.attacks.square import square_update
from jaxdef.errors import unknown_name

Array = jax.Array

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


def _stage(name: str, *, version: str, norm: str, eps: float, steps: int,
           n_target_classes: int, fab_steps: int, queries: int, p_init: float,
           restarts: Optional[int], eot_iter: Optional[int], chunks: int):
  """``update(best, model, x, y, key) -> Best`` for one attack of the ensemble."""
  plus = version == "plus"
  untargeted_restarts = restarts or (5 if plus else 1)
  eot = eot_iter or (20 if version == "rand" else 1)
  common = dict(eps=eps, norm=norm, chunks=chunks)
  if name in ("apgd-ce", "apgd-dlr"):
    return functools.partial(apgd_update, loss=name[5:], steps=steps,
                             restarts=untargeted_restarts, eot_iter=eot, **common)
  if name == "apgd-t":
    return functools.partial(apgd_t_update, steps=steps, n_target_classes=n_target_classes,
                             restarts=1, eot_iter=eot, **common)
  if name in ("fab", "fab-t"):
    return functools.partial(fab_update, steps=fab_steps, targeted=name == "fab-t",
                             n_target_classes=n_target_classes,
                             restarts=1 if name == "fab-t" else untargeted_restarts, **common)
  if name == "square":
    return functools.partial(square_update, queries=queries, p_init=p_init, restarts=1,
                             **common)
  raise unknown_name("AutoAttack attack", name, ATTACKS)


def autoattack(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array,
               eps: float, norm: str = "linf", version: str = "standard",
               attacks: Optional[Sequence[str]] = None, steps: int = 100,
               n_target_classes: int = 9, fab_steps: int = 100, queries: int = 5000,
               p_init: float = 0.8, restarts: Optional[int] = None,
               eot_iter: Optional[int] = None, randomized: bool = False, chunks: int = 1,
               return_stages: bool = False):
  """AutoAttack: the worst case per example over an ensemble run in sequence.

  Args:
    logits_fn: ``x -> logits``, or ``(x, key) -> logits`` if ``randomized``.
    x: (N, H, W, C) images in [0, 1]; y: (N,) labels.
    key: all randomness; the result is a deterministic function of it.
    eps, norm: the threat model ('linf' or 'l2').
    version: 'standard' | 'plus' | 'rand' (see the module docstring).
    attacks: a custom sequence from ``ATTACKS`` instead of the version's.
    steps: APGD / APGD-T iterations; fab_steps: FAB iterations; queries:
      Square queries. Smaller values make quick tests, not evaluations.
    n_target_classes: targets of APGD-T and FAB-T.
    restarts: restarts of APGD-CE, APGD-DLR and FAB (default: the version's).
    eot_iter: EOT draws per APGD gradient (default: 20 for 'rand', else 1).
    chunks: see :func:`jaxdef.attacks.common.run_on_robust`.
    return_stages: also return ``{attack: fooled after it (N,) bool}``, the
      cumulative per-example success after each attack, and 'clean' (jit
      returns dicts with sorted keys: the order is the version's).

  Returns:
    ``x_adv`` (N, H, W, C) within the eps-ball and [0, 1]; ``(x_adv,
    stages)`` with ``return_stages``.
  """
  if version not in VERSIONS:
    raise unknown_name("AutoAttack version", version, VERSIONS)
  names = tuple(attacks) if attacks is not None else VERSIONS[version]
  stages = [_stage(name, version=version, norm=norm, eps=eps, steps=steps,
                   n_target_classes=n_target_classes, fab_steps=fab_steps, queries=queries,
                   p_init=p_init, restarts=restarts, eot_iter=eot_iter, chunks=chunks)
            for name in names]
  model = keyed(logits_fn, randomized)
  k_clean, key = jax.random.split(key)
  best = start_from_clean(model, x, y, k_clean)
  fooled_after = {"clean": best.fooled}
  for i, (name, update) in enumerate(zip(names, stages)):
    # Losses of different attacks are not comparable: each stage starts afresh.
    best = best._replace(loss=jnp.full_like(best.loss, -jnp.inf))
    best = update(best, model, x, y, key=jax.random.fold_in(key, i))
    fooled_after[name] = best.fooled
  if return_stages:
    return best.x_adv, fooled_after
  return best.x_adv

