"""Convolution input gradients in the layout XLA:CPU runs fast inside loops."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef.attacks.conv_layout import canonical_input_gradients

NHWC = ("NHWC", "HWIO", "NHWC")


def _net(params, x):
  """Strided, padded, dilated and grouped convolutions, a jit call inside."""
  conv = jax.lax.conv_general_dilated
  h = jax.nn.relu(conv(x, params["k1"], (2, 2), "SAME", dimension_numbers=NHWC))
  h = jax.jit(lambda v: v * 2.0)(h)
  h = jax.nn.relu(conv(h, params["k2"], (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2),
                       dimension_numbers=NHWC))
  h = conv(h, params["k3"], (1, 1), "VALID", dimension_numbers=NHWC,
           feature_group_count=2)                           # grouped: left as it is
  return h.reshape(h.shape[0], -1) @ params["w"]


@pytest.fixture(scope="module")
def net():
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.3) for k, s in
            {"k1": (3, 3, 3, 8), "k2": (3, 3, 8, 8), "k3": (3, 3, 4, 8),
             "w": (2 * 2 * 8, 10)}.items()}
  x = jnp.asarray(rng.uniform(size=(4, 12, 12, 3)).astype(np.float32))
  return params, x


def _loss(fn):
  return lambda z: jnp.sum(jax.nn.log_softmax(fn(z))[:, 3])


def test_values_and_input_gradients_are_unchanged(net):
  params, x = net
  f = lambda z: _net(params, z)
  g = canonical_input_gradients(f)
  chex.assert_trees_all_close(g(x), f(x), atol=1e-6)
  chex.assert_trees_all_close(jax.grad(_loss(g))(x), jax.grad(_loss(f))(x), atol=1e-5)


def test_kernel_gradients_are_unchanged(net):
  """The weights' gradients stay JAX's own (training through the rewrite is exact)."""
  params, x = net
  plain = lambda p: _loss(lambda z: _net(p, z))(x)
  rewritten = lambda p: _loss(canonical_input_gradients(lambda z: _net(p, z)))(x)
  chex.assert_trees_all_close(jax.grad(rewritten)(params), jax.grad(plain)(params),
                              atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is for XLA:CPU")
def test_input_gradients_inside_a_loop_are_canonical_convolutions(net):
  """XLA:CPU leaves a loop body's input-gradient convolutions with swapped kernel
  axes (dim labels ..._01oi->...), off its fast path; rewritten, only the
  grouped convolution's is left."""
  params, x = net

  def steps(fn):
    grad = jax.grad(_loss(fn))
    return jax.jit(lambda z: jax.lax.fori_loop(0, 3, lambda i, v: v + 0.01 * grad(v), z))

  plain = lambda z: _net(params, z)
  swapped = lambda fn: steps(fn).lower(x).compile().as_text().count("01oi->")
  assert swapped(plain) == 3
  assert swapped(canonical_input_gradients(plain)) == 1


# Max-pooling: non-overlapping windows (window == stride) get a first-maximum
# mask as their input gradient instead of XLA's select_and_scatter.
POOLS = [((2, 8, 8, 3), (1, 2, 2, 1), "VALID"),
         ((2, 7, 9, 3), (1, 2, 2, 1), "VALID"),                 # a cropped tail
         ((2, 7, 9, 3), (1, 2, 2, 1), "SAME"),                  # -inf padding
         ((2, 9, 9, 2), (1, 3, 3, 1), "SAME"),
         ((2, 8, 8, 4), (1, 2, 2, 2), "VALID"),                 # channels pooled too
         ((3, 6, 6, 2), (1, 3, 2, 1), ((0, 0), (1, 2), (0, 1), (0, 0)))]


def _pooled(window, strides, padding):
  pool = lambda z: jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, window, strides, padding)
  return lambda z: jnp.sum(jnp.sin(3.0 * pool(z)))


@pytest.mark.parametrize("shape,window,padding", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_input_gradients_equal_jax_grad(shape, window, padding, ties):
  """Same values and the same gradient as select_and_scatter, ties included
  (values rounded to halves after a ReLU: many windows hold equal maxima,
  and the gradient goes to the same first one)."""
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  if ties:
    x = np.round(np.maximum(x, 0.0) * 2.0) / 2.0
  f = _pooled(window, window, padding)
  g = canonical_input_gradients(f)
  jaxpr = str(jax.make_jaxpr(jax.grad(g))(x))
  assert "select_and_scatter" not in jaxpr and "reduce_window_max" in jaxpr
  chex.assert_trees_all_close(g(x), f(x), atol=1e-6)
  chex.assert_trees_all_close(jax.grad(g)(x), jax.grad(f)(x), atol=1e-6)


def test_overlapping_max_pool_is_left_to_jax():
  x = np.random.default_rng(2).normal(size=(2, 9, 9, 3)).astype(np.float32)
  f = _pooled((1, 3, 3, 1), (1, 2, 2, 1), "SAME")
  g = canonical_input_gradients(f)
  assert "select_and_scatter" in str(jax.make_jaxpr(jax.grad(g))(x))
  chex.assert_trees_all_close(jax.grad(g)(x), jax.grad(f)(x), atol=1e-6)


def test_flax_max_pool_network_keeps_its_gradients():
  """A flax.linen network (convolutions, nn.max_pool, a dense head): the
  input gradient and the parameters' gradients through the rewrite are JAX's."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
      return nn.Dense(5)(h.reshape(h.shape[0], -1))

  x = jnp.asarray(np.random.default_rng(3).uniform(size=(3, 8, 8, 3)).astype(np.float32))
  variables = Net().init(jax.random.key(0), x)
  f = lambda v, z: Net().apply(v, z)
  g = lambda v, z: canonical_input_gradients(lambda zz: f(v, zz))(z)
  loss = lambda fn: (lambda v, z: _loss(lambda zz: fn(v, zz))(z))
  chex.assert_trees_all_close(jax.grad(loss(g), argnums=(0, 1))(variables, x),
                              jax.grad(loss(f), argnums=(0, 1))(variables, x), atol=1e-6)
