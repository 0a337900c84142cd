"""Fast Adaptive Boundary attack, FAB and FAB-T (Croce & Hein, ICML 2020, "Minimally
distorted adversarial examples with a fast adaptive boundary attack").

FAB looks for the smallest perturbation that changes the decision. Each step
linearises the decision boundary between the true class and one other class
(the target for FAB-T, the nearest by the linear estimate for FAB) and
projects both the current iterate and the clean point onto that hyperplane
inside the [0, 1] box (sec. 3.1); the step is a convex combination of the two
projections with weight ``alpha <= alpha_max``, extrapolated by ``eta``. When
an iterate fools the model it is recorded if it is the closest yet, and the
iterate is pulled back towards ``x`` by ``beta``. AutoAttack accepts the
result only if it lies within eps.

Defaults (100 steps, alpha_max 0.1, eta 1.05, beta 0.9, 9 target classes, no
random start on the first restart, a start at half of eps on later ones)
follow the reference implementation.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdef.attacks.common import (Best, KeyedLogitsFn, attack_from_clean, example_ids,
                                   lp_norm, per_example, repeat, run_on_robust, select,
                                   target_ranks)
from jaxdef.attacks.eager import compiles_itself
from jaxdef.attacks.pgd import check_budget, project
from jaxdef.errors import ConfigError

Array = jax.Array

# Halvings of the bracket [0, max breakpoint] before the exact linear solve:
# float32 cannot resolve it further.
_BISECTIONS = 26


def project_onto_hyperplane_in_box(t: Array, w: Array, b: Array, norm: str) -> Array:
  """Smallest ``d`` (in ``norm``) with ``w . (t + d) = b`` and ``t + d`` in [0, 1].

  Args:
    t: points (M, D) in [0, 1]; w: normals (M, D); b: offsets (M,).

  Returns:
    d (M, D). Where the box makes the hyperplane unreachable, the box corner
    that moves ``w . z`` furthest towards ``b``.

  With ``c = w.t - b``, coordinate i moves in direction ``-sign(c w_i)`` by
  at most its distance ``u_i`` to the box. For L-inf the optimum is
  ``min(lam, u_i)`` and the change of ``w.z`` is ``sum |w_i| min(lam, u_i)``;
  for L2 it is ``|w_i| min(mu, u_i / |w_i|)`` and ``sum w_i^2 min(mu, u_i / |w_i|)``.
  Both are ``sum a_i min(lam, r_i)``, concave, piecewise linear and
  increasing in lam. Bisection brackets the root (sorting the breakpoints, as
  the reference does, is several times slower under XLA on CPU), then the
  linear piece through the bracket gives it exactly.
  """
  c = jnp.sum(w * t, axis=1) - b
  direction = -jnp.where(c >= 0, 1.0, -1.0)[:, None] * jnp.sign(w)
  room = jnp.where(direction > 0, 1.0 - t, t)
  if norm == "linf":
    active = w != 0
    a, r = jnp.abs(w), room
  else:
    active = jnp.abs(w) > 1e-8
    a = jnp.square(w)
    r = room / jnp.where(active, jnp.abs(w), 1.0)
  a = jnp.where(active, a, 0.0)
  r = jnp.where(active, r, 0.0)
  need = jnp.abs(c)
  reach = lambda lam: jnp.sum(a * jnp.minimum(lam[:, None], r), axis=1)
  r_max = jnp.max(r, axis=1)
  feasible = reach(r_max) >= need

  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    enough = reach(mid) >= need
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  lo, hi = jax.lax.fori_loop(0, _BISECTIONS, halve, (jnp.zeros_like(need), r_max))
  below = r <= lo[:, None]
  lam = ((need - jnp.sum(jnp.where(below, a * r, 0.0), axis=1))
         / jnp.maximum(jnp.sum(jnp.where(below, 0.0, a), axis=1), 1e-30))
  lam = jnp.where(feasible, jnp.clip(lam, lo, hi), r_max)
  magnitude = jnp.minimum(lam[:, None], r)
  if norm == "l2":
    magnitude = magnitude * jnp.abs(w)
  return jnp.where(active, direction * magnitude, 0.0)


def _boundary(model: KeyedLogitsFn, z: Array, y: Array, target: Optional[Array],
              norm: str, key: Array) -> tuple[Array, Array]:
  """Linearised boundary at ``z``: f (N,) and its gradient, for f = z_t - z_y.

  Untargeted FAB picks, per example, the class whose linearised boundary is
  nearest (|f_k| / ||grad f_k||_dual), which needs the full Jacobian.
  """
  if target is not None:
    def diff(v):
      logits = model(v, key)
      pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=-1)[:, 0]
      f = pick(target) - pick(y)
      return jnp.sum(f), f
    g, f = jax.grad(diff, has_aux=True)(z)
    return f, g
  logits, vjp = jax.vjp(lambda v: model(v, key), z)
  num_classes = logits.shape[-1]
  eye = jnp.broadcast_to(jnp.eye(num_classes, dtype=logits.dtype)[:, None, :],
                         (num_classes,) + logits.shape)
  jac = jax.vmap(lambda e: vjp(e)[0])(eye)                         # (K, N, H, W, C)
  onehot = jax.nn.one_hot(y, num_classes, dtype=bool)
  f = logits - jnp.take_along_axis(logits, y[:, None], axis=-1)      # (N, K)
  g = jac - jnp.take_along_axis(jac, y[None, :, None, None, None], axis=0)
  dual = "l2" if norm == "l2" else "l1"
  flat = g.reshape(num_classes, z.shape[0], -1)
  g_norm = (jnp.sqrt(jnp.sum(jnp.square(flat), -1)) if dual == "l2"
            else jnp.sum(jnp.abs(flat), -1)).T                     # (N, K)
  dist = jnp.where(onehot, jnp.inf, jnp.abs(f) / (g_norm + 1e-12))
  nearest = jnp.argmin(dist, axis=-1)
  f_near = jnp.take_along_axis(f, nearest[:, None], axis=-1)[:, 0]
  g_near = jnp.take_along_axis(g, nearest[None, :, None, None, None], axis=0)[0]
  return f_near, g_near


def fab_run(model: KeyedLogitsFn, x: Array, y: Array, target: Optional[Array], *,
            key: Array, eps: float, norm: str, steps: int = 100, alpha_max: float = 0.1,
            eta: float = 1.05, beta: float = 0.9, random_start: bool = False,
            ids: Optional[Array] = None) -> Best:
  """One FAB run (Croce & Hein 2020, Algorithm 1); ``target=None`` is untargeted.

  ``ids`` (N,): which example each row is (default ``0 .. N-1``); the random
  start is drawn per example (:func:`jaxdef.attacks.common.per_example`).

  Returns:
    :class:`Best` holding the closest adversarial point found where it is
    within eps (and ``x`` elsewhere); its loss is minus its distance.
  """
  x = jax.lax.stop_gradient(x)
  n = x.shape[0]
  k_start, k_model = jax.random.split(key)
  x1 = x
  if random_start:
    draw = ((lambda k, shape: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0))
            if norm == "linf" else (lambda k, shape: jax.random.normal(k, shape, x.dtype)))
    t = per_example(draw, k_start, example_ids(n, ids), x.shape[1:])
    x1 = jnp.clip(x + t * (0.5 * eps / (lp_norm(t, norm) + 1e-12))[:, None, None, None], 0, 1)
  x0 = x.reshape(n, -1)

  def iteration(i, c):
    x1, adv, dist = c
    k = jax.random.fold_in(k_model, i)
    f, g = _boundary(model, x1, y, target, norm, k)
    w = g.reshape(n, -1)
    b = jnp.sum(w * x1.reshape(n, -1), axis=1) - f
    d = project_onto_hyperplane_in_box(
        jnp.concatenate([x1.reshape(n, -1), x0]), jnp.concatenate([w, w]),
        jnp.concatenate([b, b]), norm)
    d = d.reshape((2 * n,) + x.shape[1:])
    size = jnp.maximum(lp_norm(d, norm), 1e-8)
    alpha = jnp.clip(size[:n] / (size[:n] + size[n:]), 0.0, alpha_max)[:, None, None, None]
    x1 = jnp.clip((x1 + eta * d[:n]) * (1 - alpha) + (x + eta * d[n:]) * alpha, 0.0, 1.0)
    fooled = jnp.argmax(model(x1, k), axis=-1) != y
    t = lp_norm(x1 - x, norm)
    closer = fooled & (t < dist)
    adv = select(closer, x1, adv)
    dist = jnp.where(closer, t, dist)
    x1 = select(fooled, x + (x1 - x) * beta, x1)
    return x1, adv, dist

  _, adv, dist = jax.lax.fori_loop(
      0, steps, iteration, (x1, x, jnp.full((n,), jnp.inf, jnp.float32)))
  success = dist <= eps
  x_adv = project(select(success, adv, x), x, eps, norm)
  return Best(x_adv, success, jnp.where(success, -dist, -jnp.inf))


def fab_update(best: Best, model: KeyedLogitsFn, x: Array, y: Array, *, key: Array,
               eps: float, norm: str = "linf", steps: int = 100, targeted: bool = True,
               n_target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1,
               eta: float = 1.05, beta: float = 0.9, chunks: int = 1,
               ids: Optional[Array] = None) -> Best:
  """Refines ``best`` with FAB (or FAB-T) on the examples it has not fooled yet.

  Restart r > 0 starts at a random point at half of eps. FAB-T runs
  ``restarts`` runs towards each of the classes ranked 2nd .. (n+1)-th.
  ``ids``: which example each row is (see :func:`fab_run`).
  """
  check_budget(eps=eps, step_size=eps, steps=steps, norm=norm)
  if int(restarts) != restarts or restarts < 1:
    raise ConfigError(f"attack restarts must be a positive integer, got {restarts}")
  k_clean, key = jax.random.split(key)
  params = dict(eps=eps, norm=norm, steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
  ids = example_ids(x.shape[0], ids)
  if not targeted:
    def run(r, b):
      attack = lambda batch, k: fab_run(model, *batch[:2], None, key=k, random_start=r > 0,
                                        ids=batch[2], **params)
      return run_on_robust(attack, (x, y, ids), b, jax.random.fold_in(key, r), chunks)
    # Python loop: the random start differs between the first and later restarts.
    for r in range(restarts):
      best = run(r, best)
    return best

  logits = model(x, k_clean)
  n_targets = min(n_target_classes, logits.shape[-1] - 1)
  ranks = target_ranks(jax.lax.stop_gradient(logits), n_targets)

  def run_targeted(j, b, first):
    target = jax.lax.dynamic_index_in_dim(ranks, j // restarts, axis=1, keepdims=False)
    attack = lambda batch, k: fab_run(model, *batch[:3], key=k, random_start=not first,
                                      ids=batch[3], **params)
    return run_on_robust(attack, (x, y, target, ids), b, jax.random.fold_in(key, j), chunks)

  def per_target(j, b):
    b = run_targeted(j * restarts, b, True)
    return jax.lax.fori_loop(1, restarts, lambda r, bb: run_targeted(j * restarts + r, bb, False), b)

  return repeat(n_targets, per_target, best)


@compiles_itself
def fab_t(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
          norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
          restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
          targeted: bool = True, randomized: bool = False, chunks: int = 1) -> Array:
  """FAB-T (targeted FAB over the top ``n_target_classes`` other classes), or
  untargeted FAB with ``targeted=False``; the result is accepted only within eps.

  Returns:
    ``x_adv`` (N, H, W, C) within the eps-ball of ``x`` and in [0, 1]; ``x``
    itself where no adversarial point within eps was found.
  """
  return attack_from_clean(fab_update, logits_fn, x, y, key=key, randomized=randomized,
                           eps=eps, norm=norm, steps=steps, targeted=targeted,
                           n_target_classes=n_target_classes, restarts=restarts,
                           alpha_max=alpha_max, eta=eta, beta=beta, chunks=chunks)


@compiles_itself
def fab(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
        norm: str = "linf", steps: int = 100, restarts: int = 1, **kwargs) -> Array:
  """Untargeted FAB; see :func:`fab_t`."""
  return fab_t(logits_fn, x, y, key=key, eps=eps, norm=norm, steps=steps, restarts=restarts,
               targeted=False, **kwargs)
