"""Optimizer, schedules and EMA match their definitions."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdef.errors import ConfigError
from jaxdef.models import create_model
from jaxdef.train.state import (decay_mask, ema_decay_at, ema_update, learning_rate_schedule,
                                make_optimizer, parameter_path, stop_frozen_gradients)


def opt_config(**kw):
  base = dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="piecewise",
              milestones=(75, 90), warmup_epochs=0.0)
  return ml_collections.ConfigDict(base | kw)


def test_piecewise_schedule_drops_tenfold_at_each_milestone_epoch():
  sched = learning_rate_schedule(opt_config(), total_steps=100 * 10, steps_per_epoch=10)
  assert float(sched(0)) == pytest.approx(0.1)
  assert float(sched(749)) == pytest.approx(0.1)
  assert float(sched(751)) == pytest.approx(0.01)
  assert float(sched(901)) == pytest.approx(0.001)


def test_cosine_schedule_warms_up_then_decays_to_zero():
  sched = learning_rate_schedule(opt_config(schedule="cosine", warmup_epochs=1.0),
                                 total_steps=100, steps_per_epoch=10)
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(0.05)
  assert float(sched(10)) == pytest.approx(0.1)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_schedule_is_a_config_error():
  with pytest.raises(ConfigError, match="piecewise"):
    learning_rate_schedule(opt_config(schedule="step"), 10, 1)


def test_sgd_step_matches_pytorch_sgd_with_coupled_weight_decay():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.25])}
  tx = make_optimizer(opt_config(schedule="constant"), 10, 1)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # torch.optim.SGD: d = g + wd * p; buf = m * buf + d; p -= lr * buf
  p, buf = np.array([1.0, -2.0]), np.zeros(2)
  for _ in range(2):
    d = np.array([0.5, 0.25]) + 5e-4 * p
    buf = 0.9 * buf + d
    p = p - 0.1 * buf
  chex.assert_trees_all_close(params["w"], jnp.asarray(p, jnp.float32), rtol=1e-6)


def test_ema_is_a_convex_combination_with_a_warm_up_ramp():
  ema, new = {"a": jnp.zeros(3)}, {"a": jnp.ones(3)}
  early = ema_update(ema, new, 0.999, jnp.int32(0))  # d = 1/10
  chex.assert_trees_all_close(early["a"], jnp.full(3, 0.9))
  late = ema_update(ema, new, 0.999, jnp.int32(10 ** 6))
  chex.assert_trees_all_close(late["a"], jnp.full(3, 0.001), rtol=1e-4)


def test_frozen_parameters_get_zero_gradients_that_are_never_computed():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"head": {"w": jax.random.normal(k1, (5, 3))},
            "body": {"w": jax.random.normal(k2, (4, 5))}}
  x = jax.random.normal(k3, (6, 4))

  def loss(p, pattern):
    p = stop_frozen_gradients(p, pattern)
    return jnp.sum(jnp.tanh(x @ p["body"]["w"]) @ p["head"]["w"])

  full = jax.grad(loss)(params, "")
  frozen = jax.grad(loss)(params, "^head/")
  chex.assert_trees_all_close(frozen["head"], full["head"])
  chex.assert_trees_all_equal(frozen["body"]["w"], jnp.zeros((4, 5)))
  # the body's weight gradient (one matmul) is gone from the program, not just zeroed
  count = lambda pattern: str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(
      params, pattern)).count("dot_general")
  assert count("^head/") < count("")
  with pytest.raises(ConfigError, match="matches no parameter"):
    stop_frozen_gradients(params, "^nothing/")


def test_ema_decay_follows_the_recipes_ramp_after_its_warm_up():
  # d = min(tau, (1 + t) / (10 + t)), t counted from the warm-up's end; 0 before it.
  values = [float(ema_decay_at(0.995, jnp.int32(s))) for s in (0, 1, 10, 1000, 10 ** 6)]
  np.testing.assert_allclose(values, [1 / 10, 2 / 11, 11 / 20, 1001 / 1010, 0.995], rtol=1e-6)
  warm = [float(ema_decay_at(0.995, jnp.int32(s), 5.0)) for s in (0, 4, 5, 6, 15)]
  np.testing.assert_allclose(warm, [0.0, 0.0, 1 / 10, 2 / 11, 11 / 20], rtol=1e-6)


def test_ema_copies_the_weights_during_its_warm_up_then_averages():
  ema, new = {"a": jnp.zeros(3)}, {"a": jnp.full(3, 2.0)}
  chex.assert_trees_all_equal(ema_update(ema, new, 0.995, jnp.int32(3), 4.0), new)
  after = ema_update(ema, new, 0.995, jnp.int32(5), 4.0)  # t = 1: d = 2/11
  chex.assert_trees_all_close(after["a"], jnp.full(3, 2.0 * 9 / 11), rtol=1e-6)


def test_triangle_schedule_rises_to_the_peak_then_falls_linearly_to_zero():
  # Wong et al. 2020: 0 -> 0.2 at 2/5 of training -> 0, per step.
  sched = learning_rate_schedule(opt_config(lr=0.2, schedule="triangle", warmup_epochs=4.0),
                                 total_steps=100, steps_per_epoch=10)
  got = [float(sched(s)) for s in (0, 20, 40, 70, 100)]
  np.testing.assert_allclose(got, [0.0, 0.1, 0.2, 0.1, 0.0], atol=1e-7)


def test_cosine_after_warm_up_is_half_the_peak_halfway_through_the_decay():
  sched = learning_rate_schedule(opt_config(lr=0.4, schedule="cosine", warmup_epochs=1.0),
                                 total_steps=110, steps_per_epoch=10)
  got = [float(sched(s)) for s in (5, 10, 35, 60, 110)]
  quarter = 0.2 * (1 + np.cos(np.pi / 4))
  np.testing.assert_allclose(got, [0.2, 0.4, quarter, 0.2, 0.0], atol=1e-6)


def test_learning_rate_scales_with_the_global_batch():
  # DeepMind's recipe: 0.1 per 256 images, 0.4 at batch 1024.
  opt = opt_config(schedule="constant", base_batch=256)
  assert float(learning_rate_schedule(opt, 10, 1, global_batch=1024)(3)) == pytest.approx(0.4)
  assert float(learning_rate_schedule(opt, 10, 1, global_batch=128)(3)) == pytest.approx(0.05)
  with pytest.raises(ConfigError, match="base_batch"):
    learning_rate_schedule(opt, 10, 1)


def small_model_params():
  """The parameter tree (shapes only) of a BatchNorm ResNet-18 with conv and dense biases."""
  model = create_model("resnet18", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  return variables["params"]


def test_weight_decay_masks_leave_out_exactly_the_norm_parameters_and_biases():
  params = small_model_params()
  paths = {parameter_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  is_norm = {k: "BatchNorm" in k.rsplit("/", 2)[-2] for k in paths}
  is_bias = {k: k.endswith("/bias") for k in paths}
  assert any(is_norm.values()) and any(b and not is_norm[k] for k, b in is_bias.items())
  for on, expected in (("all", lambda k: True),
                       ("no_norm", lambda k: not is_norm[k]),
                       ("kernels", lambda k: not is_norm[k] and not is_bias[k])):
    mask = {parameter_path(p): m for p, m in
            jax.tree_util.tree_leaves_with_path(decay_mask(params, on))}
    assert mask == {k: expected(k) for k in paths}, on
  with pytest.raises(ConfigError, match="weight_decay_on"):
    decay_mask(params, "bn")


def test_sgd_nesterov_decays_only_the_masked_parameters():
  params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([3.0])}}
  grads = {"Dense_0": {"kernel": jnp.array([[0.5, 0.25]]), "bias": jnp.array([1.0])}}
  tx = make_optimizer(opt_config(schedule="constant", nesterov=True, weight_decay=0.1,
                                 weight_decay_on="kernels"), 10, 1)
  updates, _ = tx.update(grads, tx.init(params), params)
  # torch SGD(nesterov): d = g + wd p; buf = d; step = d + m buf = (1 + m) d
  kernel = -0.1 * 1.9 * (np.array([[0.5, 0.25]]) + 0.1 * np.array([[1.0, -2.0]]))
  chex.assert_trees_all_close(updates["Dense_0"]["kernel"], jnp.asarray(kernel, jnp.float32),
                              rtol=1e-6)
  chex.assert_trees_all_close(updates["Dense_0"]["bias"], jnp.array([-0.1 * 1.9]), rtol=1e-6)


def test_adamw_first_step_is_the_gradient_sign_plus_decoupled_decay():
  params = {"w": jnp.array([[1.0, -2.0]])}
  grads = {"w": jnp.array([[0.5, -0.25]])}
  tx = make_optimizer(opt_config(name="adamw", schedule="constant", lr=0.01, weight_decay=0.1),
                      10, 1)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Step 1: m_hat = g, v_hat = g^2, so the Adam direction is g / (|g| + 1e-8).
  expected = -0.01 * (np.sign([[0.5, -0.25]]) + 0.1 * np.array([[1.0, -2.0]]))
  chex.assert_trees_all_close(updates["w"], jnp.asarray(expected, jnp.float32), rtol=1e-5)
