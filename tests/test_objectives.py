"""TRADES and MART: each objective is its paper's formula, with the papers' defaults."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef.objectives import create_objective, objective_names

# Hand-made logits: example 0 is classified correctly, example 1 is not.
CLEAN = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 1.5]], np.float32)
ADV = np.array([[0.5, 1.5, -0.5], [-1.0, 2.0, 0.0]], np.float32)
Y = np.array([0, 2])


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ce(z, y):
  return -np.log(_softmax(z)[np.arange(len(y)), y])


def _kl(p_logits, q_logits):
  p, q = _softmax(p_logits), _softmax(q_logits)
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _outer(objective):
  return objective.outer_loss({"logits": jnp.asarray(CLEAN)}, {"logits": jnp.asarray(ADV)},
                              jnp.asarray(Y))


def test_trades_and_mart_are_registered():
  assert {"at", "trades", "mart"} <= set(objective_names())


def test_trades_outer_loss_is_clean_ce_plus_beta_kl():
  expected = _ce(CLEAN, Y) + 6.0 * _kl(CLEAN, ADV)
  chex.assert_trees_all_close(_outer(create_objective("trades")), expected, rtol=1e-5)
  expected = _ce(CLEAN, Y) + 1.5 * _kl(CLEAN, ADV)
  chex.assert_trees_all_close(_outer(create_objective("trades", beta=1.5)), expected, rtol=1e-5)


def test_mart_outer_loss_is_boosted_ce_plus_misclassification_weighted_kl():
  p_adv, p_clean = _softmax(ADV), _softmax(CLEAN)
  best_wrong = np.array([p_adv[0, 1], p_adv[1, 1]])  # max over k != y
  bce = _ce(ADV, Y) - np.log(1.0001 - best_wrong + 1e-12)
  weight = 1.0 - p_clean[np.arange(2), Y]
  expected = bce + 6.0 * _kl(CLEAN, ADV) * weight
  chex.assert_trees_all_close(_outer(create_objective("mart")), expected, rtol=1e-5)
  expected = bce + 2.0 * _kl(CLEAN, ADV) * weight
  chex.assert_trees_all_close(_outer(create_objective("mart", beta=2.0)), expected, rtol=1e-5)


def test_mart_margin_term_stays_finite_when_a_wrong_class_takes_all_probability():
  from jaxdef.objectives.mart import mart_bce
  logits = jnp.array([[-100.0, 100.0]])
  value = mart_bce(logits, jnp.array([0]))
  assert np.isfinite(value).all() and value[0] > 200.0
  grads = jax.grad(lambda z: mart_bce(z, jnp.array([0])).sum())(logits)
  assert np.isfinite(grads).all()


@pytest.mark.parametrize("name,init,expected", [
    ("trades", "normal", _kl(CLEAN, ADV)),  # KL(f(x) || f(x_adv)) from x + 0.001 N(0, 1)
    ("mart", "uniform", _ce(ADV, Y)),  # CE, as PGD-AT
])
def test_attack_loss_and_start_follow_the_papers(name, init, expected):
  objective = create_objective(name)
  inner = objective.inner_loss(jnp.asarray(ADV), jnp.asarray(CLEAN), jnp.asarray(Y))
  chex.assert_trees_all_close(inner, expected, rtol=1e-5)
  assert objective.attack_init == init and objective.needs_clean_pass


def test_outer_losses_differentiate_through_clean_and_adversarial_logits():
  for name in ("trades", "mart"):
    objective = create_objective(name)
    loss = lambda c, a: objective.outer_loss({"logits": c}, {"logits": a}, jnp.asarray(Y)).sum()
    g_clean, g_adv = jax.grad(loss, argnums=(0, 1))(jnp.asarray(CLEAN), jnp.asarray(ADV))
    assert np.abs(g_clean).sum() > 0 and np.abs(g_adv).sum() > 0, name


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_default_beta_is_six_as_in_the_papers(name):
  default = _outer(create_objective(name))
  chex.assert_trees_all_close(default, _outer(create_objective(name, beta=6.0)))
