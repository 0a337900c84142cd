"""The one PGD loop: bounds, ascent, determinism, restarts (Madry et al. 2018)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef import attacks
from jaxdef.attacks.pgd import logits_loss, loop_unroll, project, random_init
from jaxdef.errors import ConfigError


@functools.lru_cache(maxsize=None)
def linear_logits_fn(seed=0, shape=(8, 8, 3), classes=10):
  """One function object per model, so the attacks' compiled programs are reused."""
  w = jax.random.normal(jax.random.key(seed), (int(np.prod(shape)), classes))
  return lambda x: x.reshape(x.shape[0], -1) @ w


@pytest.fixture(scope="module")
def batch():
  x = jax.random.uniform(jax.random.key(3), (16, 8, 8, 3))
  y = jnp.arange(16) % 10
  return x, y


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_eps_ball_and_unit_box(batch, norm, eps):
  x, y = batch
  x_adv = attacks.pgd(linear_logits_fn(), x, y, key=jax.random.key(0), eps=eps,
                      step_size=eps / 4, steps=10, norm=norm, restarts=2)
  chex.assert_shape(x_adv, x.shape)
  delta = np.asarray(x_adv - x)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  else:
    assert np.sqrt((delta ** 2).sum(axis=(1, 2, 3))).max() <= eps + 1e-5
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr", "kl"])
def test_pgd_raises_its_loss(batch, loss):
  x, y = batch
  f = linear_logits_fn()
  x_adv = attacks.pgd(f, x, y, key=jax.random.key(0), eps=8 / 255, step_size=2 / 255,
                      steps=10, loss=loss, random_start=False)
  objective = logits_loss(f, x, y, loss)
  k = jax.random.key(0)
  assert float(jnp.mean(objective(x_adv, k))) > float(jnp.mean(objective(x, k)))


def test_pgd_raises_cross_entropy_of_a_conv_model_under_jit():
  from jaxdef.models.registry import create_model
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.25,),
                       width=0.25)
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
  y = jnp.arange(8)
  variables = model.init(jax.random.key(1), x[:1])
  f = lambda z: model.apply(variables, z)["logits"]
  x_adv = jax.jit(lambda x, y: attacks.pgd(f, x, y, key=jax.random.key(2), eps=0.3,
                                           step_size=0.05, steps=5))(x, y)
  assert float(attacks.cross_entropy(f(x_adv), y).mean()) > float(
      attacks.cross_entropy(f(x), y).mean())
  assert float(jnp.abs(x_adv - x).max()) <= 0.3 + 1e-6


def test_pgd_is_deterministic_given_the_key(batch):
  x, y = batch
  run = lambda k: attacks.pgd(linear_logits_fn(), x, y, key=jax.random.key(k),
                              eps=8 / 255, step_size=2 / 255, steps=5)
  chex.assert_trees_all_equal(run(1), run(1))
  assert not np.array_equal(np.asarray(run(1)), np.asarray(run(2)))


def test_rolled_and_unrolled_loops_agree(batch):
  x, y = batch
  run = lambda u: attacks.pgd(linear_logits_fn(), x, y, key=jax.random.key(0), eps=8 / 255,
                              step_size=2 / 255, steps=6, unroll=u)
  chex.assert_trees_all_close(run(1), run(True), atol=1e-6)
  assert loop_unroll(3, 10) == 3


def test_restarts_never_lose_to_a_single_run(batch):
  x, y = batch
  f = linear_logits_fn(seed=5)
  kw = dict(eps=2 / 255, step_size=0.5 / 255, steps=3)
  single = attacks.pgd(f, x, y, key=jax.random.key(0), restarts=1, **kw)
  multi = attacks.pgd(f, x, y, key=jax.random.key(0), restarts=4, **kw)
  fooled = lambda z: np.asarray(jnp.argmax(f(z), -1) != y)
  # the first restart uses the same key, so every example fooled once stays fooled
  assert np.all(fooled(multi) >= fooled(single))


def test_fgsm_moves_every_pixel_by_eps_or_hits_the_box(batch):
  x, y = batch
  x_adv = attacks.fgsm(linear_logits_fn(), x, y, eps=4 / 255)
  delta = np.abs(np.asarray(x_adv - x))
  at_box = (np.asarray(x_adv) == 0) | (np.asarray(x_adv) == 1)
  assert np.all(np.isclose(delta, 4 / 255, atol=1e-6) | at_box)


def test_projection_is_idempotent_and_random_init_is_inside(batch):
  x, _ = batch
  for norm, eps in (("linf", 0.1), ("l2", 0.7)):
    z = random_init(jax.random.key(0), x, eps, norm, "uniform")
    chex.assert_trees_all_close(project(z, x, eps, norm), z, atol=1e-6)
    far = x + 5.0
    p = project(far, x, eps, norm)
    chex.assert_trees_all_close(project(p, x, eps, norm), p, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.001, 0.2])
def test_gaussian_start_is_x_plus_sigma_noise_in_the_box_and_the_attack_ends_in_the_ball(
    batch, sigma):
  """'normal': x + sigma N(0, 1) clipped to [0, 1] (MART's and TRADES' start at
  sigma 0.001); a start outside the eps-ball (sigma 0.2) is projected by the first
  step, so the attack's result is still inside it."""
  x, y = batch
  key, eps = jax.random.key(5), 8 / 255
  start = random_init(key, x, eps, "linf", "normal", sigma)
  expected = np.clip(np.asarray(x) + sigma * np.asarray(jax.random.normal(key, x.shape)), 0, 1)
  np.testing.assert_allclose(np.asarray(start), expected, rtol=0, atol=1e-7)
  assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0
  moved = np.abs(np.asarray(start - x))
  assert moved.max() > 0 and (sigma < eps) == (moved.max() <= eps)
  loss = logits_loss(linear_logits_fn(), x, y, "ce")
  x_adv = attacks.perturb(lambda z: loss(z, None), x, key=key, eps=eps, step_size=2 / 255,
                          steps=3, init="normal", init_sigma=sigma)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  # One step from the start shows the start was the Gaussian one of the same key.
  one = attacks.perturb(lambda z: loss(z, None), x, key=key, eps=eps, step_size=2 / 255,
                        steps=1, init="normal", init_sigma=sigma)
  g = jax.grad(lambda z: jnp.sum(loss(z, None)))(start)
  chex.assert_trees_all_close(one, project(start + 2 / 255 * jnp.sign(g), x, eps, "linf"),
                              atol=1e-6)


def test_the_training_attack_takes_the_configured_start_over_the_objective_s():
  """attack.init='normal' (MART's reference start) replaces MART's uniform start
  in the training step's inner maximisation, with attack.init_sigma."""
  from jaxdef.defenses import create_defense
  from jaxdef.objectives import create_objective
  from jaxdef.train.step import AttackBudget, adversarial_examples
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
  y = jnp.arange(4)
  w = jax.random.normal(jax.random.key(2), (8 * 8 * 3, 10))
  forward = lambda z: {"logits": z.reshape(z.shape[0], -1) @ w}
  mart = create_objective("mart")
  assert mart.attack_init == "uniform"
  budget = AttackBudget(eps=8 / 255, step_size=2 / 255, steps=2, init="normal", init_sigma=0.01)
  key = jax.random.key(3)
  got = adversarial_examples(forward, x, y, key, objective=mart, defense=create_defense("none"),
                             budget=budget, step=jnp.int32(0))
  ce = lambda z: mart.inner_loss(forward(z)["logits"], forward(x)["logits"], y)
  want = attacks.perturb(ce, x, key=key, eps=8 / 255, step_size=2 / 255, steps=2,
                         init="normal", init_sigma=0.01)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  uniform = attacks.perturb(ce, x, key=key, eps=8 / 255, step_size=2 / 255, steps=2)
  assert not np.allclose(np.asarray(got), np.asarray(uniform))


def test_fgsm_with_a_random_start_is_one_eps_step_from_a_uniform_point_of_the_ball(batch):
  """The CAS authors' FGSM: a uniform start in the eps-ball, one step of eps, projected."""
  x, y = batch
  f, key, eps = linear_logits_fn(), jax.random.key(7), 8 / 255
  x_adv = attacks.fgsm(f, x, y, key=key, eps=eps, random_start=True)
  start = random_init(jax.random.split(key, 1)[0], x, eps, "linf", "uniform")  # pgd's run 0
  g = jax.grad(lambda z: jnp.sum(logits_loss(f, x, y, "ce")(z, None)))(start)
  chex.assert_trees_all_close(x_adv, project(start + eps * jnp.sign(g), x, eps, "linf"),
                              atol=1e-6)
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert not np.allclose(np.asarray(x_adv), np.asarray(attacks.fgsm(f, x, y, key=key, eps=eps)))


@pytest.mark.parametrize("kwargs,field", [
    ({"eps": 0.0}, "eps"), ({"eps": -0.1}, "eps"), ({"eps": 2.0}, "eps"),
    ({"step_size": 0.0}, "step_size"), ({"steps": 0}, "steps"), ({"norm": "l1"}, "norm")])
def test_bad_budgets_are_one_line_errors(batch, kwargs, field):
  x, y = batch
  args = dict(eps=8 / 255, step_size=2 / 255, steps=3, norm="linf") | kwargs
  with pytest.raises(ConfigError, match=field) as err:
    attacks.pgd(linear_logits_fn(), x, y, key=jax.random.key(0), **args)
  assert "\n" not in str(err.value)


def test_failure_indicators_follow_their_definitions_on_a_hand_made_trace():
  from jaxdef.attacks.indicators import Trace, failure_indicators
  steps = 10
  rising = np.arange(steps + 1, dtype=np.float32)                # still climbing at the end
  saturated = np.minimum(np.arange(steps + 1), 3).astype(np.float32)
  oscillating = np.array([0, 5, 1, 5, 1, 5, 1, 5, 1, 5, 1], np.float32)
  losses = np.stack([rising, saturated, oscillating, saturated, rising], axis=1)
  trace = Trace(losses=jnp.asarray(losses),
                fooled_any=jnp.array([False, False, False, True, True]),
                fooled_last=jnp.array([False, False, False, False, True]),
                zero_gradient=jnp.array([False, True, False, False, True]),
                nonfinite_gradient=jnp.zeros(5, bool))
  fired = {k: np.asarray(v).tolist() for k, v in failure_indicators(trace).items()}
  assert fired["incomplete optimisation"] == [True, False, False, False, False]
  assert fired["non-converging attack"] == [False, False, True, False, False]
  assert fired["silent success"] == [False, False, False, True, False]
  # Example 4 was fooled: nothing is flagged there, zero gradients or not.
  assert fired["unavailable gradients"] == [False, True, False, False, False]


def test_pgd_called_eagerly_compiles_itself_and_matches_the_jitted_call(batch):
  x, y = batch
  f = linear_logits_fn()
  kw = dict(eps=8 / 255, step_size=2 / 255, steps=5, restarts=2)
  eager = attacks.pgd(f, x, y, key=jax.random.key(4), **kw)
  jitted = jax.jit(lambda x, y, k: attacks.pgd(f, x, y, key=k, **kw))(x, y, jax.random.key(4))
  chex.assert_trees_all_close(eager, jitted, atol=1e-6)


def test_an_unhashable_model_reuses_its_compiled_attack(batch):
  """A model object that cannot be hashed (as a bound method of a record
  holding dicts of weights) is cached by identity: its second call compiles
  nothing."""
  class Model:
    __hash__ = None  # unhashable, like a frozen dataclass holding dicts

    def __init__(self):
      self.weights = {"w": jax.random.normal(jax.random.key(7), (8 * 8 * 3, 10))}

    def logits(self, z):
      return z.reshape(z.shape[0], -1) @ self.weights["w"]

  x, y = batch
  model = Model()
  kw = dict(key=jax.random.key(0), eps=8 / 255, step_size=2 / 255, steps=2)
  first = attacks.pgd(model.logits, x, y, **kw)
  compiles = []
  count = lambda event, seconds, **_: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    second = attacks.pgd(model.logits, x, y, **kw)  # a new bound method, the same model
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  chex.assert_trees_all_equal(first, second)
