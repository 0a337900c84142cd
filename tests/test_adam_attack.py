"""The Adam step rule of the one PGD loop (the DeepMind training attack).

Gowal et al. 2020 / Rebuffi et al. 2021 (deepmind-research
adversarial_robustness/jax): 10 Adam steps on the raw input gradient, lr 0.1
then 0.01 from step 5, from U(-eps, eps), projected onto the eps-ball and
[0, 1] after every step. The reference below is Adam written out in numpy.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdef.attacks.pgd import perturb
from jaxdef.config import base_config, validate
from jaxdef.defenses.base import make_none
from jaxdef.errors import ConfigError
from jaxdef.objectives import create_objective
from jaxdef.train.step import AttackBudget, adversarial_examples

EPS = 0.2
SHAPE = (3, 4, 4, 2)


def quadratic():
  """Images, and a loss -0.5 sum(a (z - c)^2) per example whose maximum c lies
  partly outside the eps-ball and the [0, 1] box, with curvatures a spanning
  two orders of magnitude (Adam's steps do not scale with them)."""
  rng = np.random.default_rng(0)
  x = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
  c = (x + rng.uniform(-0.5, 0.5, SHAPE)).astype(np.float32)
  a = np.exp(rng.uniform(np.log(0.1), np.log(10.0), SHAPE)).astype(np.float32)
  loss = lambda z: -0.5 * jnp.sum(a * jnp.square(z - c), axis=(1, 2, 3))
  return x, a, c, loss


def adam_reference(x, a, c, start, *, steps, lr, boundaries, scales, b1=0.9, b2=0.999,
                   eps_adam=1e-9):
  """Projected Adam ascent on the quadratic, in float64 numpy."""
  x, a, c = (np.asarray(v, np.float64) for v in (x, a, c))
  z = np.asarray(start, np.float64)
  m = np.zeros_like(z)
  v = np.zeros_like(z)
  for t in range(steps):
    g = -a * (z - c)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** (t + 1))
    v_hat = v / (1 - b2 ** (t + 1))
    rate = lr * np.prod([s for b, s in zip(boundaries, scales) if t >= b])
    z = z + rate * m_hat / (np.sqrt(v_hat) + eps_adam)
    z = np.clip(x + np.clip(z - x, -EPS, EPS), 0.0, 1.0)
  return z


@pytest.mark.parametrize("lr, boundaries, scales", [
    (0.1, (5,), (0.1,)),           # the DeepMind training attack
    (0.05, (3, 6), (0.5, 0.1)),    # two drops, cumulative as optax's schedule
])
def test_adam_iterates_match_a_hand_written_adam_on_a_quadratic(lr, boundaries, scales):
  x, a, c, loss = quadratic()
  key = jax.random.key(4)
  x_adv = perturb(loss, jnp.asarray(x), key=key, eps=EPS, step_size=0.01, steps=10,
                  init="uniform", step_rule="adam", adam_lr=lr, adam_boundaries=boundaries,
                  adam_scales=scales)
  noise = np.asarray(jax.random.uniform(key, SHAPE, jnp.float32, -EPS, EPS))
  start = np.clip(x + noise, 0.0, 1.0)
  expected = adam_reference(x, a, c, start, steps=10, lr=lr, boundaries=boundaries,
                            scales=scales)
  chex.assert_trees_all_close(x_adv, jnp.asarray(expected, jnp.float32), atol=2e-6)
  # The steps are Adam's, not sign steps of any fixed size: some pixels stop short
  # of the ball's edge and of c.
  inside = np.abs(np.asarray(x_adv) - x) < EPS - 1e-3
  assert inside.any() and (~inside).any()


def test_adam_stays_in_the_eps_ball_and_the_image_range():
  x, _, _, _ = quadratic()
  far = lambda z: jnp.sum(z * jnp.where(jnp.arange(z.size).reshape(z.shape) % 2, 50.0, -50.0),
                          axis=(1, 2, 3))
  x_adv = perturb(far, jnp.asarray(x), key=jax.random.key(0), eps=EPS, step_size=0.01,
                  steps=10, step_rule="adam", adam_lr=1.0)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_the_steepest_rule_is_the_sign_loop_written_out():
  """The default rule is unchanged: ten sign steps of step_size, projected."""
  x, a, c, loss = quadratic()
  key = jax.random.key(1)
  x_adv = perturb(loss, jnp.asarray(x), key=key, eps=EPS, step_size=0.03, steps=10)
  z = jnp.clip(x + jax.random.uniform(key, SHAPE, jnp.float32, -EPS, EPS), 0.0, 1.0)
  grad = jax.grad(lambda z: jnp.sum(loss(z)))
  for _ in range(10):
    z = z + 0.03 * jnp.sign(grad(z))
    z = jnp.clip(x + jnp.clip(z - x, -EPS, EPS), 0.0, 1.0)
  chex.assert_trees_all_equal(x_adv, z)
  explicit = perturb(loss, jnp.asarray(x), key=key, eps=EPS, step_size=0.03, steps=10,
                     step_rule="steepest")
  chex.assert_trees_all_equal(explicit, x_adv)


def test_the_training_attack_budget_reaches_the_adam_rule():
  """adversarial_examples passes attack.step_rule and its schedule to the loop:
  AT's inner loss (CE) attacked with Adam equals perturb called directly."""
  x, _, _, _ = quadratic()
  weights = jax.random.normal(jax.random.key(2), (int(np.prod(SHAPE[1:])), 5))
  forward = lambda z: {"logits": z.reshape(z.shape[0], -1) @ weights}
  y = jnp.array([0, 3, 4])
  key = jax.random.key(7)
  budget = AttackBudget(eps=EPS, step_size=0.01, steps=4, step_rule="adam", adam_lr=0.02,
                        adam_boundaries=(2,), adam_scales=(0.5,))
  x_adv = adversarial_examples(forward, jnp.asarray(x), y, key, objective=create_objective("at"),
                               defense=make_none(), budget=budget, step=jnp.int32(0))
  ce = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(forward(z)["logits"]), y[:, None],
                                      axis=-1)[:, 0]
  direct = perturb(ce, jnp.asarray(x), key=key, eps=EPS, step_size=0.01, steps=4,
                   step_rule="adam", adam_lr=0.02, adam_boundaries=(2,), adam_scales=(0.5,))
  chex.assert_trees_all_close(x_adv, direct, atol=1e-6)
  sign = adversarial_examples(forward, jnp.asarray(x), y, key, objective=create_objective("at"),
                              defense=make_none(), budget=AttackBudget(eps=EPS, step_size=0.01,
                                                                       steps=4),
                              step=jnp.int32(0))
  assert not np.allclose(np.asarray(sign), np.asarray(x_adv))


@pytest.mark.parametrize("fields, message", [
    (dict(step_rule="lbfgs"), "attack.step_rule"),
    (dict(step_rule="adam", adam_lr=0.0), "learning rate must be > 0"),
    (dict(step_rule="adam", adam_boundaries=(5, 3), adam_scales=(0.1, 0.1)), "increasing"),
    (dict(step_rule="adam", adam_boundaries=(5,), adam_scales=()), "one scale per boundary"),
])
def test_bad_adam_fields_are_one_line_config_errors(fields, message):
  config = base_config()
  config.attack = ml_collections.ConfigDict({**config.attack.to_dict(), **fields})
  with pytest.raises(ConfigError, match=message) as err:
    validate(config, 1)
  assert "\n" not in str(err.value)


def test_the_deepmind_attack_settings_validate():
  config = base_config()
  config.attack.step_rule = "adam"
  validate(config, 1)
