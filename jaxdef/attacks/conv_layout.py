"""Input gradients of convolutions and max-pooling that XLA:CPU computes fast inside loops.

The gradient of a convolution with respect to its input is itself a
convolution, which JAX writes with the kernel's input and output feature
axes exchanged through the dimension numbers (kernel spec HWOI for an HWIO
kernel). XLA:CPU hands a convolution to its fast (Eigen) implementation only
in the canonical layout (NHWC input, HWIO kernel), and its pass that
rewrites other layouts into it (``ConvCanonicalization``) visits the entry
computation only: inside a ``while`` loop, i.e. inside every attack's
``fori_loop``, the input gradient stays non-canonical and runs on a generic
loop emitter. Measured on the benchmark CNN (twin CNN of
benchmarks/compare_torch_attacks.py, 128 images, PGD-20, jaxlib 0.10.2, 2
cores): 0.56 s rolled against 0.32 s unrolled.

:func:`canonical_input_gradients` re-evaluates a model's jaxpr with each
convolution's input gradient written in the canonical form: the backward
pass transposes the kernel explicitly (a small, loop-invariant array) and
convolves in the layout XLA:CPU recognises. The forward pass and every
value are unchanged (the gradients are the same convolution, bit for bit on
that CNN); the same PGD-20 then runs in 0.22 s rolled. Only ungrouped
convolutions are rewritten; convolutions inside higher-order primitives
other than ``jit`` (``remat``, ``scan``, custom derivatives) are left as
they are.

Max-pooling gets the same treatment (:func:`_max_pool`). JAX differentiates
``reduce_window`` max with XLA's ``select_and_scatter``, which XLA:CPU runs
on a slow generic emitter; for non-overlapping windows (window equal to
stride, no dilation: the 2x2 / stride-2 pooling of VGG-style networks) the
backward pass is rewritten as a reshape into windows and a mask of each
window's first maximum (the element ``select_and_scatter`` picks, so ties
go to the same input), fused by XLA into one elementwise pass. Measured on
a plain-``lax`` CNN with two 2x2 max-pools (four 3x3 convolutions, batch
80, jaxlib 0.10.2, loaded 2 cores): an input-gradient step inside a
``fori_loop`` 429 -> 308 ms. Overlapping windows are left as they are.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

Array = jax.Array
_CONV = jcore.primitives.conv_general_dilated_p
_MAX_POOL = jcore.primitives.reduce_window_max_p
_CALLS = (jcore.primitives.jit_p, jcore.primitives.closed_call_p)


def _conv(x: Array, w: Array, params: dict) -> Array:
  """One convolution whose input gradient is computed in the canonical layout.

  ``params`` are the primitive's; the kernel gradient is JAX's own.
  """
  dnums = params["dimension_numbers"]
  out_dim, in_dim = dnums.rhs_spec[:2]
  swap = list(range(w.ndim))
  swap[out_dim], swap[in_dim] = in_dim, out_dim
  # The same convolution of the kernel with its feature axes exchanged: its
  # transpose has the kernel axes in canonical order again.
  swapped = dnums._replace(rhs_spec=(in_dim, out_dim) + tuple(dnums.rhs_spec[2:]))
  conv = lambda xx, ww, dn: _CONV.bind(xx, ww, **dict(params, dimension_numbers=dn))

  @jax.custom_vjp
  def f(x, w):
    return conv(x, w, dnums)

  def f_fwd(x, w):
    return conv(x, w, dnums), (x, w)

  def f_bwd(res, g):
    x, w = res
    dx = jax.vjp(lambda xx: conv(xx, lax.transpose(w, swap), swapped), x)[1](g)[0]
    dw = jax.vjp(lambda ww: conv(x, ww, dnums), w)[1](g)[0]
    return dx, dw

  f.defvjp(f_fwd, f_bwd)
  return f(x, w)


def _first_max_mask(windows: Array, out: Array, window: tuple) -> Array:
  """Bool mask of each window's first maximum (row-major order within the
  window, the element ``select_and_scatter`` with ``>=`` keeps).

  ``windows`` has the shape ``(o_0, k_0, o_1, k_1, ...)``, ``out`` the
  maxima ``(o_0, o_1, ...)``, ``window`` the ``k``s.
  """
  axes = tuple(range(1, 2 * len(window), 2))
  # Position of each element inside its window, row-major, broadcast over the windows.
  position = np.arange(np.prod(window), dtype=np.int32).reshape(
      tuple(v for k in window for v in (1, k)))
  tied = windows == out.reshape(tuple(v for o in out.shape for v in (o, 1)))
  first = jnp.min(jnp.where(tied, position, position.size), axis=axes, keepdims=True)
  return position == first


def _max_pool(x: Array, params: dict) -> Array:
  """Max-pooling over non-overlapping windows whose input gradient is a
  mask of each window's first maximum (see the module docstring); the value
  is the primitive's own."""
  window, pads = params["window_dimensions"], params["padding"]

  def windowed(xx):
    """(padded and cropped input split into windows, its shape)."""
    padded = lax.pad(xx, jnp.array(-jnp.inf, xx.dtype), [(lo, hi, 0) for lo, hi in pads])
    out = tuple(s // k for s, k in zip(padded.shape, window))
    cropped = padded[tuple(slice(0, o * k) for o, k in zip(out, window))]
    return cropped.reshape(tuple(v for o, k in zip(out, window) for v in (o, k))), padded.shape

  @jax.custom_vjp
  def f(xx):
    return _MAX_POOL.bind(xx, **params)

  def f_fwd(xx):
    out = _MAX_POOL.bind(xx, **params)
    return out, (xx, out)

  def f_bwd(res, g):
    xx, out = res
    windows, padded_shape = windowed(xx)
    mask = _first_max_mask(windows, out, window)
    spread = g.reshape(tuple(v for o in g.shape for v in (o, 1)))
    dx = jnp.where(mask, spread, jnp.zeros((), g.dtype)).reshape(
        tuple(o * k for o, k in zip(out.shape, window)))
    # Back to the padded shape (the cropped tail gets no gradient), then unpadded.
    dx = lax.pad(dx, jnp.zeros((), g.dtype),
                 [(0, p - s, 0) for p, s in zip(padded_shape, dx.shape)])
    return (lax.slice(dx, [lo for lo, _ in pads],
                      [lo + s for (lo, _), s in zip(pads, xx.shape)]),)

  f.defvjp(f_fwd, f_bwd)
  return f(x)


def _rewritable_pool(eqn: Any) -> bool:
  p = eqn.params
  return (eqn.primitive is _MAX_POOL and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)
          and tuple(p["window_dimensions"]) == tuple(p["window_strides"])
          and all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"]))
          and all(lo >= 0 and hi >= 0 for lo, hi in p["padding"]))


def _rewritable(eqn: Any) -> bool:
  return (eqn.primitive is _CONV and eqn.params["feature_group_count"] == 1
          and eqn.params["batch_group_count"] == 1)


def _evaluate(jaxpr: Any, consts: list, *args: Any) -> list:
  """``jaxpr`` applied to ``args`` with :func:`_conv` for its convolutions
  (``jit`` calls are inlined so that theirs are found too)."""
  env: dict = {}
  read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if _rewritable(eqn):
      outputs = [_conv(*inputs, eqn.params)]
    elif _rewritable_pool(eqn):
      outputs = [_max_pool(*inputs, eqn.params)]
    elif eqn.primitive in _CALLS:
      inner = eqn.params["jaxpr" if eqn.primitive is _CALLS[0] else "call_jaxpr"]
      outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
    else:
      with eqn.ctx.manager:
        outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
      outputs = outputs if eqn.primitive.multiple_results else [outputs]
    env.update(zip(eqn.outvars, outputs))
  return [read(v) for v in jaxpr.outvars]


def canonical_input_gradients(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with the input gradients of its convolutions in the canonical
  layout and those of its non-overlapping max-pooling as a first-maximum
  mask (see the module docstring); same values, same gradients.

  On backends other than CPU ``fn`` itself is returned: their compilers
  choose convolution layouts inside loops too.
  """
  if jax.default_backend() != "cpu":
    return fn

  def rewritten(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outputs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shape), outputs)

  return rewritten
