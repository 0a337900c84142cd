"""Optimizer, schedules and EMA match their definitions."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdef.errors import ConfigError
from jaxdef.train.state import (ema_update, learning_rate_schedule, make_optimizer,
                                stop_frozen_gradients)


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
