"""Adversarial Weight Perturbation (Wu et al. 2020): the rule on small trees, the
train step against a hand-written reference, the warm-up, the config and its refusals.

The rule (csdongxian/AWP utils_awp.py): Delta = one SGD step of rate proxy_lr on
the negated training loss; v = Delta ||theta|| / (||Delta|| + 1e-20) for tensors of
more than one dimension, 0 elsewhere; loss, gradient and optimizer step at
theta + gamma v; then - gamma v.
"""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdef.config import base_config, validate
from jaxdef.defenses.base import Defense, make_none
from jaxdef.errors import ConfigError
from jaxdef.objectives import create_objective
from jaxdef.train import awp
from jaxdef.train.state import init_train_state
from jaxdef.train.step import AttackBudget, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_tree():
  """A kernel (3, 4), its bias (4,) and a normalisation scale (4,)."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"Dense_0": {"kernel": jax.random.normal(k1, (3, 4)),
                      "bias": jax.random.normal(k2, (4,))},
          "BatchNorm_0": {"scale": 1.0 + jax.random.normal(k3, (4,))}}


def test_layerwise_scale_gives_each_kernel_a_perturbation_of_gamma_times_its_norm():
  params = toy_tree()
  delta = jax.tree.map(lambda p: 1e-3 * jnp.cos(3.0 * p + 1.0), params)
  v = awp.layerwise_scaled(delta, params)
  kernel, d = np.asarray(params["Dense_0"]["kernel"]), np.asarray(delta["Dense_0"]["kernel"])
  expected = d * np.linalg.norm(kernel) / (np.linalg.norm(d) + 1e-20)
  np.testing.assert_allclose(np.asarray(v["Dense_0"]["kernel"]), expected, rtol=1e-5)
  gamma = 0.005
  shift = jax.tree.map(lambda a, b: a - b, awp.perturb(params, v, gamma), params)
  np.testing.assert_allclose(float(jnp.linalg.norm(shift["Dense_0"]["kernel"])),
                             gamma * np.linalg.norm(kernel), rtol=1e-4)
  # Biases and normalisation scales (one dimension) are not perturbed.
  chex.assert_trees_all_equal(shift["Dense_0"]["bias"], jnp.zeros(4))
  chex.assert_trees_all_equal(shift["BatchNorm_0"]["scale"], jnp.zeros(4))


def test_a_layer_whose_proxy_did_not_move_gets_no_perturbation():
  params = toy_tree()
  v = awp.layerwise_scaled(jax.tree.map(jnp.zeros_like, params), params)
  chex.assert_trees_all_equal(v, jax.tree.map(jnp.zeros_like, params))


def test_the_proxy_step_is_sgd_on_the_negated_loss_so_the_loss_goes_up():
  params = toy_tree()
  # A linear loss sum(c * theta): the proxy step is exactly lr * c.
  c = jax.tree.map(lambda p: jnp.sign(jnp.sin(p)), params)
  linear = lambda p: sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(p)))
  chex.assert_trees_all_close(awp.proxy_ascent(linear, params, 0.01),
                              jax.tree.map(lambda a: 0.01 * a, c), atol=1e-7)
  # A cross-entropy loss of the kernel: both the proxy and the rescaled step raise it.
  x = jax.random.normal(jax.random.key(1), (8, 3))
  y = jnp.arange(8) % 4
  ce = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], y))
  delta = awp.proxy_ascent(ce, params, 0.01)
  proxy = jax.tree.map(lambda a, b: a + b, params, delta)
  assert float(ce(proxy)) > float(ce(params))
  v = awp.layerwise_scaled(delta, params)
  assert float(ce(awp.perturb(params, v, 0.01))) > float(ce(params))


def test_restore_takes_the_perturbation_back():
  params = toy_tree()
  v = awp.layerwise_scaled(jax.tree.map(lambda p: jnp.sin(p), params), params)
  back = awp.restore(awp.perturb(params, v, 0.01), v, 0.01)
  chex.assert_trees_all_close(back, params, atol=1e-6)


class TwoLayer(nn.Module):
  """Dense(5) - relu - Dense(3) on flattened images, as a ModelOutput."""

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    h = nn.relu(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return {"logits": nn.Dense(3)(h)}


def shifted_generator(forward, x, y, key, budget, step, x_start):
  """A fixed 'attack' (x + 0.05), so the reference knows x_adv."""
  return x + 0.05


def reference_awp_step(params, x_adv, labels, *, lr, wd, gamma, proxy_lr):
  """AT-AWP with SGD + coupled weight decay, written out from the paper's rule."""
  def ce(p):
    h = jax.nn.relu(x_adv.reshape(x_adv.shape[0], -1) @ p["Dense_0"]["kernel"]
                    + p["Dense_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])
  g0 = jax.grad(ce)(params)
  v = {}
  for layer, leaves in params.items():
    d = proxy_lr * g0[layer]["kernel"]  # proxy = theta - proxy_lr * grad(-CE)
    k = leaves["kernel"]
    v[layer] = {"kernel": d * jnp.sqrt(jnp.sum(k ** 2)) / (jnp.sqrt(jnp.sum(d ** 2)) + 1e-20),
                "bias": jnp.zeros_like(leaves["bias"])}
  at = jax.tree.map(lambda p, s: p + gamma * s, params, v)
  g1 = jax.grad(ce)(at)
  return jax.tree.map(lambda p, g, s: p - lr * (g + wd * p) - gamma * s, at, g1, v)


def two_layer_step(awp_settings, tx):
  model = TwoLayer()
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(2, 2, 1))
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=create_objective("at"),
      defense=Defense(name="none", generate=shifted_generator),
      budget=AttackBudget(eps=0.1, step_size=0.1, steps=1), augment="none", ema_decay=0.0,
      seed=0, awp=awp_settings))
  images = jax.random.randint(jax.random.key(2), (6, 2, 2, 1), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(6, dtype=jnp.int32) % 3
  return state, step, images, labels


def test_awp_step_equals_the_hand_written_rule_on_a_two_layer_model():
  lr, wd, gamma, proxy_lr = 0.1, 5e-4, 0.01, 0.01
  tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
  state, step, images, labels = two_layer_step(awp.WeightPerturbation(gamma, proxy_lr), tx)
  new, metrics = step(state, images, labels)
  assert bool(metrics["finite"])
  x_adv = images.astype(jnp.float32) / 255.0 + 0.05
  expected = reference_awp_step(state.params, x_adv, labels, lr=lr, wd=wd, gamma=gamma,
                                proxy_lr=proxy_lr)
  chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)
  # ... and not the plain step: the perturbation changed the update.
  plain, _ = two_layer_step(None, tx)[1](state, images, labels)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(new.params), jax.tree.leaves(plain.params)))
  assert diff > 1e-5


def trades_step(awp_settings):
  """The two-layer model under TRADES with momentum SGD (its compile takes seconds)."""
  model = TwoLayer()
  tx = optax.sgd(0.05, momentum=0.9)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(2, 2, 1))
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=create_objective("trades"), defense=make_none(),
      budget=AttackBudget(eps=0.1, step_size=0.05, steps=2), augment="none", ema_decay=0.0,
      seed=0, awp=awp_settings))
  images = jax.random.randint(jax.random.key(2), (8, 2, 2, 1), 0, 256).astype(jnp.uint8)
  return step, state, images, jnp.arange(8, dtype=jnp.int32) % 3


def test_gamma_zero_is_the_plain_step_bit_for_bit():
  plain, state, images, labels = trades_step(None)
  off = trades_step(awp.WeightPerturbation(gamma=0.0, proxy_lr=0.1))[0]
  a, ma = plain(state, images, labels)
  b, mb = off(state, images, labels)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(ma, mb)
  from jaxdef.train.loop import awp_settings
  assert awp_settings(base_config().train, 100) is None


def test_no_perturbation_before_the_warm_up_ends():
  params = toy_tree()
  loss = lambda p: jnp.sum(jnp.sin(p["Dense_0"]["kernel"]))
  settings = awp.WeightPerturbation(gamma=0.01, proxy_lr=0.1, warmup_steps=3)
  before = awp.weight_perturbation(loss, params, jnp.int32(2), settings)
  after = awp.weight_perturbation(loss, params, jnp.int32(3), settings)
  chex.assert_trees_all_equal(before, jax.tree.map(jnp.zeros_like, params))
  assert float(jnp.linalg.norm(after["Dense_0"]["kernel"])) > 0
  # In the train step: before the warm-up the update is the plain one.
  plain, state, images, labels = trades_step(None)
  warm = trades_step(awp.WeightPerturbation(0.005, 0.1, warmup_steps=2))[0]
  a, _ = plain(state, images, labels)
  b, _ = warm(state, images, labels)
  chex.assert_trees_all_close(a.params, b.params, rtol=1e-6, atol=1e-7)
  later = state.replace(step=jnp.int32(2))
  c, _ = plain(later, images, labels)
  d, _ = warm(later, images, labels)
  diff = max(float(jnp.max(jnp.abs(p - q))) for p, q in
             zip(jax.tree.leaves(c.params), jax.tree.leaves(d.params)))
  assert diff > 1e-6


def with_awp(gamma=0.005, **fields):
  config = base_config()
  config.train.awp.gamma = gamma
  for key, value in fields.items():
    node, *path = key.split(".")
    target = config[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  return config


@pytest.mark.parametrize("fields, words", [
    (dict(gamma=-0.01), "train.awp.gamma must be >= 0"),
    (dict(**{"eval.transform": "nip"}), "eval.transform='nip'"),
    (dict(**{"defense.name": "pssr"}), "defense.name='pssr'"),
    (dict(**{"defense.name": "aad"}), "2 updates per batch"),
    (dict(**{"train.awp.proxy_lr": 0.0}), "train.awp.proxy_lr must be > 0"),
    (dict(**{"attack.free_replays": 4}), "attack.free_replays=4 do not go together"),
])
def test_awp_refusals_are_one_line_config_errors(fields, words):
  config = with_awp(**fields)
  with pytest.raises(ConfigError) as err:
    validate(config, num_devices=1)
  assert words in str(err.value) and "\n" not in str(err.value)
  if "transform" in words or "pssr" in words:
    assert "train.awp.gamma=0.005" in str(err.value)


def test_the_shipped_awp_recipes():
  from jaxdef import shipped
  trades = shipped.module("awp").get_config("cifar10_wrn34_10_trades")
  assert (trades.model.name, trades.model.kwargs.depth, trades.model.kwargs.width) == (
      "wide_resnet", 34, 10)
  assert trades.objective.name == "trades" and trades.objective.kwargs.beta == 6.0
  assert trades.train.awp.to_dict() == dict(gamma=0.005, proxy_lr=0.1, warmup_epochs=9.0)
  assert tuple(trades.train.optimizer.milestones) == (99, 149) and trades.train.epochs == 200
  at = shipped.module("awp").get_config("cifar10_preact18_at")
  assert at.model.name == "preact_resnet18" and at.objective.name == "at"
  assert at.train.awp.to_dict() == dict(gamma=0.01, proxy_lr=0.01, warmup_epochs=0.0)
  for config in (trades, at):
    validate(config, num_devices=1)


def test_a_tiny_trades_awp_config_takes_a_finite_jitted_step(tiny):
  """The shipped TRADES-AWP settings on the tiny MNIST config, through the loop's
  jit_steps (AWP from the first step): the step is finite and moves the weights."""
  from jaxdef import shipped
  from jaxdef.train.loop import jit_steps, prepare
  from jaxdef.train.step import INIT_STREAM, stream_key
  recipe = shipped.module("awp").get_config("cifar10_wrn34_10_trades")
  config = tiny(**{"objective.name": "trades", "objective.kwargs": {"beta": 6.0},
                   "attack.steps": 1, "train.batch_size": 8,
                   "train.awp": ml_collections.ConfigDict(
                       {**recipe.train.awp.to_dict(), "warmup_epochs": 0.0})})
  run = prepare(config)
  state = init_train_state(run.model, run.tx, stream_key(config.seed, INIT_STREAM),
                           image_shape=run.meta.image_shape)
  before = jax.tree.map(np.asarray, state.params)
  images = np.asarray(jax.random.randint(jax.random.key(3), (8, *run.meta.image_shape),
                                         0, 256), np.uint8)
  labels = np.arange(8, dtype=np.int32) % run.meta.num_classes
  train_step, _ = jit_steps(config, model=run.model, objective=run.objective,
                            defense=run.defense, tx=run.tx, mesh=run.mesh,
                            steps_per_epoch=run.steps_per_epoch)
  new, metrics = train_step(jax.tree.map(jnp.copy, state), images, labels)
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  chex.assert_tree_all_finite(new.params)
  assert max(float(np.max(np.abs(np.asarray(p) - q))) for p, q in
             zip(jax.tree.leaves(new.params), jax.tree.leaves(before))) > 0
