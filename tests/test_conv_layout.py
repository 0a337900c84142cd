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
