"""Square Attack: score-based random search (Andriushchenko et al., ECCV 2020).

Queries only the logits. Each step proposes a change of the current best
perturbation on one random square window (per example) and keeps it if the
margin loss ``z_y - max_{k != y} z_k`` drops; an example is finished once the
margin is <= 0. The window side shrinks with the schedule of ``p`` (the
fraction of pixels changed), halving p at queries 10, 50, 200, 500, 1000,
2000, 4000, 6000 and 8000 (or at those fractions of 10 000 queries with
``rescale_schedule``, which AutoAttack turns off).

L-inf (sec. 3.1): start from vertical stripes of +-eps; a proposal sets the
window to +-eps per channel around the current point. L2 (sec. 3.2): start
from a grid of "centre-heavy" square patterns of norm eps; a proposal moves
the mass of one window into another window with a fresh pattern, keeping the
total norm at eps.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxdef.attacks import losses
from jaxdef.attacks.common import (Best, KeyedLogitsFn, attack_from_clean, example_ids,
                                   lp_norm, per_example, repeat, run_on_robust)
from jaxdef.attacks.eager import compiles_itself
from jaxdef.attacks.pgd import NORMS, check_budget, project
from jaxdef.errors import ConfigError, unknown_name

Array = jax.Array

# A tuple, not an array: importing jaxdef must not initialise a JAX backend
# (jax.distributed.initialize has to come first).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: Array, p_init: float, queries: int, rescale: bool) -> Array:
  """Fraction of pixels a proposal changes at query ``i``."""
  if rescale:
    i = (i * 10000) // queries
  return p_init / 2.0 ** jnp.sum(jnp.asarray(_P_HALVINGS) < i)


def _window(key: Array, ids: Array, h: int, w: int, side: Array) -> tuple[Array, Array, Array]:
  """A random side x side window per example: (N, H, W, 1) 0/1 mask, top, left.

  The corner is uniform in [0, H - side) (the whole image when side = H).
  """
  k_h, k_w = jax.random.split(key)
  corner = lambda k, size: per_example(
      lambda kk, shape: jax.random.randint(kk, shape, 0, jnp.maximum(size - side, 1)), k, ids,
      (1, 1, 1))
  top, left = corner(k_h, h), corner(k_w, w)
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  return (((rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side))
          .astype(jnp.float32)), top, left


def _signs(key: Array, ids: Array, shape: tuple) -> Array:
  """Random +-1 per example, (len(ids),) + shape."""
  return jnp.where(_coins(key, ids, shape), 1.0, -1.0)


def _coins(key: Array, ids: Array, shape: tuple) -> Array:
  """Fair coin flips per example, (len(ids),) + shape."""
  return per_example(lambda k, s: jax.random.bernoulli(k, 0.5, s), key, ids, shape)


def _pattern(top: Array, left: Array, side: Array, flip: Array, h: int, w: int) -> Array:
  """The L2 proposal pattern on side x side windows, (N, H, W, 1).

  Two rectangles, +1 on the upper half and -1 on the lower half, each of
  nested rings around its centre weighted sum_{c >= ring} 1/(c+1)^2;
  transposed where ``flip``. ``top``, ``left`` and ``flip`` broadcast
  against (N, H, W, 1), so one call can lay several equal windows. Scaled so
  that each window has unit L2 norm when a single one is laid.
  """
  i = jnp.arange(h)[None, :, None, None] - top
  j = jnp.arange(w)[None, None, :, None] - left
  i, j = jnp.where(flip, j, i), jnp.where(flip, i, j)
  inside = (i >= 0) & (i < side) & (j >= 0) & (j < side)
  # tail[m] = sum_{c >= m} 1/(c+1)^2 up to the largest ring index.
  size = max(h, w) + 1
  inv_sq = 1.0 / (jnp.arange(size, dtype=jnp.float32) + 1.0) ** 2
  prefix = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(inv_sq)])

  def rectangle(ii, rows):
    centre_r, centre_c = rows // 2, side // 2
    rings = jnp.maximum(rows // 2 + 1, side // 2 + 1)
    ring = jnp.maximum(jnp.abs(ii - centre_r), jnp.abs(j - centre_c))
    value = prefix[jnp.clip(rings, 0, size)] - prefix[jnp.clip(ring, 0, size)]
    value = jnp.where(ring < rings, value, 0.0)
    return value

  upper_rows = side // 2
  upper = inside & (i < upper_rows)
  lower = inside & (i >= upper_rows)
  up = jnp.where(upper, rectangle(i, upper_rows), 0.0)
  down = jnp.where(lower, rectangle(i - upper_rows, side - upper_rows), 0.0)
  unit = lambda v: v / (jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True)) + 1e-12)
  return unit(unit(up) - unit(down))


def _l2_start(key: Array, x: Array, ids: Array, eps: float) -> Array:
  """Tiles of side H // 5 over the image, each a pattern with a random
  orientation and a random sign per channel, scaled to L2 norm eps."""
  _, h, w, c = x.shape
  side = h // 5
  offset = (h - 5 * side) // 2
  tiles_h, tiles_w = h // side, w // side
  k_flip, k_sign = jax.random.split(key)
  tile_r = (jnp.arange(h) - offset) // side
  tile_c = (jnp.arange(w) - offset) // side
  valid_r = (jnp.arange(h) >= offset) & (tile_r < tiles_h)
  valid_c = (jnp.arange(w) >= offset) & (tile_c < tiles_w)
  tile_r, tile_c = jnp.clip(tile_r, 0, tiles_h - 1), jnp.clip(tile_c, 0, tiles_w - 1)
  per_pixel = lambda a: a[:, tile_r][:, :, tile_c]   # (N, th, tw, k) -> (N, H, W, k)
  flip = per_pixel(_coins(k_flip, ids, (tiles_h, tiles_w, 1)))
  top = (offset + tile_r * side)[None, :, None, None]
  left = (offset + tile_c * side)[None, None, :, None]
  # Every tile has the same norm, so one joint scaling is the per-tile one.
  delta = _pattern(top, left, side, flip, h, w) * per_pixel(_signs(k_sign, ids, (tiles_h, tiles_w, c)))
  delta = delta * (valid_r[None, :, None, None] & valid_c[None, None, :, None])
  return jnp.clip(x + delta * (eps / (lp_norm(delta, "l2") + 1e-12))[:, None, None, None], 0, 1)


def _l2_proposal(key: Array, x: Array, ids: Array, x_best: Array, eps: float, p: Array) -> Array:
  _, h, w, c = x.shape
  k_win1, k_win2, k_flip, k_sign = jax.random.split(key, 4)
  side = jnp.maximum(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 3)
  side = jnp.minimum(side + (side % 2 == 0), min(h, w))
  win1, top, left = _window(k_win1, ids, h, w, side)
  win2, _, _ = _window(k_win2, ids, h, w, side)
  delta = x_best - x
  channel_norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
  in_win1 = channel_norm(delta * win1)
  in_both = channel_norm(delta * jnp.maximum(win1, win2))
  total = lp_norm(delta, "l2")[:, None, None, None]
  flip = _coins(k_flip, ids, (1, 1, 1))
  new = (_pattern(top, left, side, flip, h, w) * _signs(k_sign, ids, (1, 1, c))
         + delta * win1 / (1e-12 + in_win1))
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - total ** 2, 0.0) / c + in_both ** 2)
  new = new / (1e-12 + channel_norm(new)) * budget
  delta = delta * (1.0 - win2) * (1.0 - win1) + new * win1
  return jnp.clip(x + delta * (eps / (lp_norm(delta, "l2") + 1e-12))[:, None, None, None], 0, 1)


def _linf_proposal(key: Array, x: Array, ids: Array, x_best: Array, eps: float,
                   p: Array) -> Array:
  _, h, w, c = x.shape
  k_win, k_sign = jax.random.split(key)
  side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 1, min(h, w))
  win, _, _ = _window(k_win, ids, h, w, side)
  return project(x_best + win * 2.0 * eps * _signs(k_sign, ids, (1, 1, c)), x, eps, "linf")


def square_run(model: KeyedLogitsFn, x: Array, y: Array, *, key: Array, eps: float,
               norm: str, queries: int = 5000, p_init: float = 0.8,
               rescale_schedule: bool = False, ids: Optional[Array] = None) -> Best:
  """One Square Attack run; stops early once every example is fooled.

  ``ids`` (N,): which example each row is (default ``0 .. N-1``); every
  proposal is drawn per example (:func:`jaxdef.attacks.common.per_example`).

  Returns:
    :class:`Best` with the lowest-margin point found, whether its margin is
    <= 0, and minus its margin as the loss.
  """
  _, _, w, c = x.shape
  ids = example_ids(x.shape[0], ids)
  k_start, k_first, k_loop = jax.random.split(key, 3)
  if norm == "linf":
    x_best = jnp.clip(x + eps * _signs(k_start, ids, (1, w, c)), 0.0, 1.0)
    propose = _linf_proposal
  else:
    x_best = _l2_start(k_start, x, ids, eps)
    propose = _l2_proposal
  margin_of = lambda z, k: -losses.margin(model(z, k), y)
  margin = margin_of(x_best, k_first)

  def keep_going(s):
    i, _, m = s
    return (i < queries) & jnp.any(m > 0)

  def query(s):
    i, x_best, m = s
    k = jax.random.fold_in(k_loop, i)
    x_new = propose(k, x, ids, x_best, eps, p_schedule(i, p_init, queries, rescale_schedule))
    m_new = margin_of(x_new, k)
    better = (m > 0) & (m_new < m)
    return i + 1, jnp.where(better[:, None, None, None], x_new, x_best), jnp.where(better, m_new, m)

  _, x_best, margin = jax.lax.while_loop(keep_going, query, (jnp.int32(0), x_best, margin))
  return Best(project(x_best, x, eps, norm), margin <= 0, -margin)


def square_update(best: Best, model: KeyedLogitsFn, x: Array, y: Array, *, key: Array,
                  eps: float, norm: str = "linf", queries: int = 5000, p_init: float = 0.8,
                  restarts: int = 1, rescale_schedule: bool = False, chunks: int = 1,
                  ids: Optional[Array] = None) -> Best:
  """Refines ``best`` with Square Attack on the examples it has not fooled yet
  (``ids``: which example each row is, see :func:`square_run`)."""
  if norm not in NORMS:
    raise unknown_name("norm", norm, NORMS)
  check_budget(eps=eps, step_size=eps, steps=queries, norm=norm)
  if not 0 < p_init <= 1:
    raise ConfigError(f"square p_init must be in (0, 1], got {p_init}")

  def attack(batch, k):
    xb, yb, ib = batch
    return square_run(model, xb, yb, key=k, eps=eps, norm=norm, queries=queries,
                      p_init=p_init, rescale_schedule=rescale_schedule, ids=ib)

  batch = (x, y, example_ids(x.shape[0], ids))
  return repeat(restarts,
                lambda r, b: run_on_robust(attack, batch, b, jax.random.fold_in(key, r), chunks),
                best)


@compiles_itself
def square(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
           norm: str = "linf", queries: int = 5000, p_init: float = 0.8, restarts: int = 1,
           rescale_schedule: bool = False, randomized: bool = False, chunks: int = 1) -> Array:
  """Square Attack (Andriushchenko et al. 2020) with ``queries`` queries per restart.

  Returns:
    ``x_adv`` (N, H, W, C) within the eps-ball of ``x`` and in [0, 1]; the
    lowest-margin point where the model was not fooled.
  """
  return attack_from_clean(square_update, logits_fn, x, y, key=key, randomized=randomized,
                           eps=eps, norm=norm, queries=queries, p_init=p_init,
                           restarts=restarts, rescale_schedule=rescale_schedule, chunks=chunks)
