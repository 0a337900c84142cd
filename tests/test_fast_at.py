"""Single-step adversarial training: FGSM-RS and N-FGSM as parts of the one PGD loop.

FGSM-RS (Wong et al. 2020): delta0 ~ U(-eps, eps), one signed step of 1.25
eps, projected onto the eps-ball and [0, 1]. N-FGSM (de Jorge et al. 2022):
eta ~ U(-2 eps, 2 eps), one signed step of eps, clipped to [0, 1] only, so
the perturbation may reach 3 eps. References are written out in numpy from
the same uniform draw.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdef.attacks.pgd import perturb
from jaxdef.config import base_config, validate
from jaxdef.defenses.base import make_none
from jaxdef.errors import ConfigError
from jaxdef.models import create_model
from jaxdef.objectives import create_objective
from jaxdef.train.state import init_train_state
from jaxdef.train.step import AttackBudget, adversarial_examples, make_train_step

EPS = 0.1
SHAPE = (2, 3, 3, 2)


def images_and_weights():
  """Images with pixels at the box's edges and inside it, and a linear loss's
  weights w: the loss sum(w * z) ascends along sign(w) everywhere."""
  x = np.linspace(0.0, 1.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
  w = np.where(np.arange(x.size).reshape(SHAPE) % 3 == 0, -1.0, 1.0).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


def linear_loss(w):
  return lambda z: jnp.sum(z * w, axis=(1, 2, 3))


def uniform_draw(key, scale):
  """The start's noise as :func:`jaxdef.attacks.pgd.random_init` draws it."""
  return np.asarray(jax.random.uniform(key, SHAPE, jnp.float32, -scale * EPS, scale * EPS))


def test_fgsm_rs_is_one_step_of_one_and_a_quarter_eps_projected_onto_the_ball():
  x, w = images_and_weights()
  key = jax.random.key(3)
  x_adv = perturb(linear_loss(w), x, key=key, eps=EPS, step_size=1.25 * EPS, steps=1,
                  init="uniform")
  xn, wn = np.asarray(x), np.asarray(w)
  start = np.clip(xn + uniform_draw(key, 1.0), 0.0, 1.0)
  stepped = start + 1.25 * EPS * np.sign(wn)
  expected = np.clip(xn + np.clip(stepped - xn, -EPS, EPS), 0.0, 1.0)
  chex.assert_trees_all_close(x_adv, jnp.asarray(expected), atol=1e-6)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_n_fgsm_is_not_projected_onto_the_ball_and_stays_in_the_image_range():
  x, w = images_and_weights()
  key = jax.random.key(5)
  x_adv = perturb(linear_loss(w), x, key=key, eps=EPS, step_size=EPS, steps=1,
                  init="uniform", init_scale=2.0, project_eps=False)
  xn, wn = np.asarray(x), np.asarray(w)
  start = np.clip(xn + uniform_draw(key, 2.0), 0.0, 1.0)
  expected = np.clip(start + EPS * np.sign(wn), 0.0, 1.0)
  chex.assert_trees_all_close(x_adv, jnp.asarray(expected), atol=1e-6)
  reach = float(jnp.max(jnp.abs(x_adv - x)))
  assert EPS * 1.5 < reach <= 3 * EPS + 1e-6  # leaves the eps-ball, within 3 eps
  assert float(jnp.min(x_adv)) == 0.0 and float(jnp.max(x_adv)) == 1.0  # edge pixels clip


def test_n_fgsm_with_the_projection_left_on_is_back_inside_the_ball():
  x, w = images_and_weights()
  x_adv = perturb(linear_loss(w), x, key=jax.random.key(5), eps=EPS, step_size=EPS, steps=1,
                  init="uniform", init_scale=2.0)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-6


def test_the_training_attack_budget_reaches_the_loop_unprojected():
  """adversarial_examples (the train step's inner maximisation) passes the
  budget's start scale and projection to the loop: N-FGSM on a linear model
  equals the numpy reference on the CE gradient's sign."""
  x, _ = images_and_weights()
  k_w, key = jax.random.split(jax.random.key(0))
  weights = jax.random.normal(k_w, (int(np.prod(SHAPE[1:])), 4))
  y = jnp.array([1, 2])
  forward = lambda z: {"logits": z.reshape(z.shape[0], -1) @ weights}
  budget = AttackBudget(eps=EPS, step_size=EPS, steps=1, init="uniform", init_scale=2.0,
                        project_eps=False)
  x_adv = adversarial_examples(forward, x, y, key, objective=create_objective("at"),
                               defense=make_none(), budget=budget, step=jnp.int32(0))
  start = jnp.clip(x + uniform_draw(key, 2.0), 0.0, 1.0)
  ce = lambda z: -jnp.sum(jax.nn.log_softmax(forward(z)["logits"])[jnp.arange(2), y])
  expected = jnp.clip(start + EPS * jnp.sign(jax.grad(ce)(start)), 0.0, 1.0)
  chex.assert_trees_all_close(x_adv, expected, atol=1e-6)
  assert float(jnp.max(jnp.abs(x_adv - x))) > EPS


@pytest.mark.parametrize("field, value, message", [
    ("init_scale", 0.0, "attack.init_scale must be > 0"),
    ("project", "no", "attack.project must be True or False"),
])
def test_bad_single_step_fields_are_one_line_config_errors(field, value, message):
  config = base_config()
  # A fresh section: a loaded config.json is not type-checked against the defaults.
  config.attack = ml_collections.ConfigDict({**config.attack.to_dict(), field: value})
  with pytest.raises(ConfigError, match=message):
    validate(config, 1)


def test_fgsm_rs_and_n_fgsm_settings_validate():
  for fields in (dict(steps=1, step_size=10 / 255, init="uniform"),
                 dict(steps=1, step_size=8 / 255, init="uniform", init_scale=2.0,
                      project=False)):
    config = base_config()
    config.attack.update(ml_collections.ConfigDict(fields))
    validate(config, 1)


def test_train_step_ema_copies_the_weights_until_its_warm_up_ends():
  """make_train_step(ema_warmup_steps=1): after step 0 the EMA is the weights;
  after step 1 it is 0.1 * the previous EMA + 0.9 * the weights (t = 0)."""
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.25,), width=0.25)
  tx = optax.sgd(0.1)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(28, 28, 1))
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=create_objective("at"), defense=make_none(),
      budget=AttackBudget(eps=EPS, step_size=1.25 * EPS, steps=1), augment="none",
      ema_decay=0.9, seed=0, ema_warmup_steps=1.0))
  images = jax.random.randint(jax.random.key(2), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(4, dtype=jnp.int32)
  first, _ = step(state, images, labels)
  chex.assert_trees_all_equal(first.ema_params, first.params)
  second, _ = step(first, images, labels)
  expected = jax.tree.map(lambda e, p: 0.1 * e + 0.9 * p, first.ema_params, second.params)
  chex.assert_trees_all_close(second.ema_params, expected, rtol=1e-6, atol=1e-7)
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, second.ema_params, second.params))
