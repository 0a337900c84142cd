"""Adaptive attacks: BPDA, EOT, joint aux-head attacks and defended pipelines in the suite."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef import attacks, evaluate
from jaxdef.attacks.common import eot_value_and_grad
from jaxdef.errors import ConfigError

SHAPE, CLASSES = (6, 6, 1), 10


@functools.lru_cache(maxsize=None)
def problem(n=24):
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (int(np.prod(SHAPE)), CLASSES))
  logits_fn = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) - 0.5) @ w
  x = jax.random.uniform(k2, (n,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
  return logits_fn, x, y


def quantise(x):
  """A non-differentiable purification (zero gradient almost everywhere)."""
  return jnp.round(x * 4.0) / 4.0


def test_bpda_keeps_the_forward_pass_bit_identical():
  _, x, _ = problem()
  np.testing.assert_array_equal(attacks.bpda(quantise)(x), quantise(x))


@pytest.mark.parametrize("transform", [lambda x: x, quantise], ids=["identity", "quantise"])
def test_bpda_gradient_is_the_classifiers_gradient_at_the_transformed_point(transform):
  logits_fn, x, y = problem()
  ce = lambda f: lambda z: jnp.sum(attacks.cross_entropy(f(z), y))
  through_bpda = jax.grad(ce(attacks.defended_logits_fn(logits_fn, transform)))(x)
  at_transformed = jax.grad(ce(logits_fn))(transform(x))
  chex.assert_trees_all_close(through_bpda, at_transformed, rtol=1e-6)
  assert float(jnp.abs(through_bpda).sum()) > 0


def test_exact_backward_sees_the_vanishing_gradient_of_a_quantiser():
  logits_fn, x, y = problem()
  exact = attacks.defended_logits_fn(logits_fn, quantise, backward="exact")
  g = jax.grad(lambda z: jnp.sum(attacks.cross_entropy(exact(z), y)))(x)
  assert float(jnp.abs(g).max()) == 0.0


def test_bpda_pgd_breaks_a_quantiser_that_exact_gradients_cannot_attack():
  logits_fn, x, y = problem()
  pipeline = lambda z: logits_fn(quantise(z))
  budget = dict(key=jax.random.key(0), eps=0.2, step_size=0.05, steps=10, random_start=False)
  acc = lambda x_adv: float(jnp.mean(jnp.argmax(pipeline(x_adv), -1) == y))
  masked = attacks.pgd(pipeline, x, y, **budget)
  bpda = attacks.pgd(attacks.defended_logits_fn(logits_fn, quantise), x, y, **budget)
  assert acc(masked) == acc(x)  # zero gradients: PGD never moves
  assert acc(bpda) < acc(x) - 0.25


def test_eot_gradient_is_the_mean_over_the_draws():
  z = jnp.ones((3, 2, 2, 1))
  noise = lambda k: jax.random.normal(k, z.shape)
  fn = lambda z, k: (jnp.sum(z * noise(k)), None)
  key = jax.random.key(5)
  _, g = eot_value_and_grad(fn, z, key, 4)
  expected = jnp.mean(jnp.stack([noise(jax.random.fold_in(key, i)) for i in range(4)]), 0)
  chex.assert_trees_all_close(g, expected, atol=1e-6)


def test_pgd_with_eot_attacks_a_randomized_model_within_the_ball():
  logits_fn, x, y = problem()
  noisy = lambda z, k: logits_fn(z + 0.05 * jax.random.normal(k, z.shape))
  x_adv = jax.jit(lambda x, y: attacks.pgd(
      noisy, x, y, key=jax.random.key(1), eps=0.1, step_size=0.025, steps=8,
      randomized=True, eot_samples=4))(x, y)
  assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  fooled = jnp.mean(jnp.argmax(logits_fn(x_adv), -1) != y)
  assert float(fooled) > 0.3


def test_pgd_loss_fn_replaces_the_named_loss():
  logits_fn, x, y = problem()
  # Maximising the logit of class 0 drives every prediction towards 0.
  towards_zero = lambda z, k: logits_fn(z)[:, 0] - jnp.max(logits_fn(z)[:, 1:], -1)
  x_adv = attacks.pgd(logits_fn, x, y, key=jax.random.key(0), eps=0.3, step_size=0.05,
                      steps=10, loss_fn=towards_zero, random_start=False)
  assert float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == 0)) > \
      float(jnp.mean(jnp.argmax(logits_fn(x), -1) == 0)) + 0.3


def suite_config(**overrides):
  c = evaluate.default_eval_config(0.2, "linf")
  c.num_examples, c.batch_size = 24, 8
  c.attacks = "clean,pgd5"
  c.adaptive_attacks = "pgd5"
  c.joint_attacks = "joint-pgd5"
  c.update(overrides)
  return c


def as_np(*arrays):
  return [np.asarray(a) for a in arrays]


def test_identity_transform_adaptive_and_non_adaptive_columns_agree():
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  main = evaluate.Target(predict=logits_fn, reference=logits_fn)
  adaptive = evaluate.Target(predict=logits_fn, reference=logits_fn, label="bpda",
                             attack_view=attacks.defended_logits_fn(logits_fn, lambda z: z))
  r = evaluate.run_suite(main, x, y, suite_config=suite_config(), key=jax.random.key(0),
                         progress=False, adaptive=adaptive)
  assert set(r["attacks"]) == {"pgd5", "bpda pgd5"}
  assert r["attacks"]["pgd5"] == r["attacks"]["bpda pgd5"] < r["clean"]
  # The transform restores nothing: no fooling example is returned to its label.
  assert r["defense_success"] == {"pgd5": 0.0, "bpda pgd5": 0.0}


def test_defense_success_counts_examples_the_pipeline_restores():
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  # A transform that undoes any perturbation of the test set (an oracle used
  # only to check the bookkeeping): the pipeline restores every example.
  x_ref = jnp.asarray(x)
  restore = lambda z: x_ref[:z.shape[0]] if z.shape[0] == x_ref.shape[0] else z
  pipeline = lambda z: logits_fn(restore(z))
  cfg = suite_config(batch_size=24)
  r = evaluate.run_suite(evaluate.Target(predict=pipeline, attack_view=logits_fn,
                                         reference=logits_fn),
                         x, y, suite_config=cfg, key=jax.random.key(0), progress=False)
  assert r["attacks"]["pgd5"] == r["clean"] == 1.0
  assert r["defense_success"]["pgd5"] == 1.0
  table = evaluate.results_table(r)
  assert "| attack | accuracy | seconds | defense success |" in table
  assert all(row.count("|") == 5 for row in table.splitlines() if row.startswith("|"))


def test_joint_attacks_run_only_for_models_with_heads():
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  outputs = lambda z: {"logits": logits_fn(z), "aux": {"head": {"logits": logits_fn(z)}}}
  joint = lambda out, labels, loss=attacks.cross_entropy: loss(out["logits"], labels)
  target = evaluate.Target(predict=logits_fn, outputs=outputs, joint_loss=joint)
  cfg = suite_config(attacks="clean,fgsm,pgd5,cw", cw_steps=5,
                     joint_attacks="joint-fgsm,joint-pgd5,joint-cw")
  r = evaluate.run_suite(target, x, y, suite_config=cfg, key=jax.random.key(0), progress=False)
  assert set(r["attacks"]) == {"fgsm", "pgd5", "cw", "joint-fgsm", "joint-pgd5", "joint-cw"}
  # With only the final logits in the joint loss each joint attack is the
  # plain one (the same loss, CE or the C&W margin, the same steps and start).
  for name in ("fgsm", "pgd5", "cw"):
    assert r["attacks"][f"joint-{name}"] == r["attacks"][name], name
    np.testing.assert_array_equal(r["per_example"][f"joint-{name}"], r["per_example"][name])
  plain = evaluate.run_suite(logits_fn, x, y, suite_config=suite_config(),
                             key=jax.random.key(0), progress=False)
  assert set(plain["attacks"]) == {"pgd5"}
  with pytest.raises(ConfigError, match="auxiliary heads"):
    evaluate.run_suite(logits_fn, x, y, suite_config=suite_config(attacks="joint-pgd5"),
                       key=jax.random.key(0), progress=False)


def test_randomized_pipeline_runs_eot_pgd_and_autoattack_rand():
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  noisy = lambda z, k: jnp.clip(z + 0.02 * jax.random.normal(k, z.shape), 0, 1)
  pipeline = lambda z, k: logits_fn(noisy(z, k))
  target = evaluate.Target(predict=pipeline, randomized=True, eot_samples=2, label="eot",
                           attack_view=attacks.defended_logits_fn(logits_fn, noisy,
                                                                  randomized=True))
  cfg = suite_config(attacks="clean", adaptive_attacks="pgd5,autoattack", aa_steps=5)
  main = evaluate.Target(predict=pipeline, randomized=True, eot_samples=2)
  r = evaluate.run_suite(main, x, y, suite_config=cfg, key=jax.random.key(0),
                         progress=False, adaptive=target)
  assert set(r["attacks"]) == {"eot pgd5", "eot autoattack"}
  assert r["attacks"]["eot pgd5"] < r["clean"]
  assert list(r["autoattack_stages"]) == ["after apgd-ce", "after apgd-dlr"]  # 'auto' -> rand
  # Scored again under fresh draws (eval.score_draws, 5): mean and spread per column;
  # AutoAttack is scored by the reference's protocol (a fresh draw after each stage).
  assert set(r["draws"]) == {"clean", "eot pgd5"}
  spread = r["draws"]["eot pgd5"]
  assert spread["draws"] == 5 and spread["std"] >= 0.0
  assert abs(spread["mean"] - r["attacks"]["eot pgd5"]) <= 3 * spread["std"] + 0.25
  assert "over 5 draws" in evaluate.results_table(r)
  once = evaluate.run_suite(main, x, y, suite_config=suite_config(attacks="clean",
                            score_draws=1), key=jax.random.key(0), progress=False)
  assert "draws" not in once


def test_randomized_targets_get_rand_autoattack_with_its_20_draws(monkeypatch):
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  noisy = lambda z, k: jnp.clip(z + 0.02 * jax.random.normal(k, z.shape), 0, 1)
  pipeline = lambda z, k: logits_fn(noisy(z, k))
  target = evaluate.Target(predict=pipeline, randomized=True, eot_samples=2)
  calls = []
  original = attacks.autoattack

  def spy(*args, **kwargs):
    calls.append(kwargs)
    return original(*args, **kwargs)
  monkeypatch.setattr(attacks, "autoattack", spy)
  cfg = suite_config(attacks="clean,autoattack", aa_steps=2, num_examples=8)
  evaluate.run_suite(target, x, y, suite_config=cfg, key=jax.random.key(0), progress=False)
  # The version's own 20 EOT draws (eot_iter None), not the target's eot_samples=2.
  assert calls[-1]["version"] == "rand" and calls[-1]["eot_iter"] is None
  assert calls[-1]["n_target_classes"] == 9
  evaluate.run_suite(target, x, y, suite_config=suite_config(
      attacks="clean,autoattack", aa_steps=2, num_examples=8, aa_eot_iter=3,
      aa_n_target_classes=4), key=jax.random.key(0), progress=False)
  assert calls[-1]["eot_iter"] == 3 and calls[-1]["n_target_classes"] == 4
  from jaxdef.attacks.autoattack import _stage
  assert _stage("apgd-ce", version="rand", norm="linf", eps=0.1, steps=1, n_target_classes=9,
                fab_steps=1, queries=1, p_init=0.8, restarts=None, eot_iter=None,
                chunks=1).keywords["eot_iter"] == 20
  before = len(calls)
  with pytest.raises(ConfigError, match="aa_version='standard' on a randomized target"):
    evaluate.run_suite(target, x, y, suite_config=suite_config(
        attacks="clean,autoattack", aa_version="standard"), key=jax.random.key(0),
        progress=False)
  assert len(calls) == before              # refused before any attack ran


def test_eps_curve_compiles_pgd_once_for_every_eps():
  """The model is traced as often for three eps as for one: one compilation
  serves the whole curve (and nothing is cached between calls)."""
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  cfg = suite_config(curve_attack="pgd5")
  traces = []

  def counted(z):
    traces.append(1)  # runs at trace time only
    return logits_fn(z)

  def curve(eps_list):
    traces.clear()
    accs = evaluate.eps_curve(counted, x, y, suite_config=cfg, key=jax.random.key(0),
                              batch_size=8, eps_list=eps_list)
    return accs, len(traces)

  _, one = curve((0.1,))
  accs, three = curve((0.02, 0.1, 0.4))
  assert one > 0 and three == one
  assert accs[0] >= accs[1] >= accs[2]
  assert accs[2] < accs[0]


def test_iterll_steps_follow_kurakins_rule():
  assert evaluate.iterll_steps(0.3) == 80
  assert evaluate.iterll_steps(8 / 255) == 10
  assert evaluate.iterll_steps(2 / 255) == 2


@pytest.mark.parametrize("name", ["stepll", "r+stepll", "iterll"])
def test_least_likely_attacks_move_towards_the_least_likely_class_inside_the_ball(name):
  logits_fn, x, y = problem()
  eps = 0.1
  target = jnp.argmin(logits_fn(x), -1)
  attack = evaluate.suite_attack(name, suite_config())
  x_adv, _ = attack(evaluate.Target(predict=logits_fn), x, y, jax.random.key(0), eps)
  assert float(jnp.abs(x_adv - x).max()) <= eps + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  ll_ce = lambda z: float(jnp.mean(attacks.cross_entropy(logits_fn(z), target)))
  assert ll_ce(x_adv) < ll_ce(x)


def test_least_likely_attacks_run_through_the_suite_at_each_budget():
  """The suite jits StepLL with a traced eps and iterative LL per eps: both must compile."""
  logits_fn, x, y = problem()
  x, y = as_np(x, y)
  cfg = suite_config(attacks="clean,stepll,r+stepll,iterll")
  for eps in (0.05, 0.2):
    accs = {name: float(evaluate.robust_flags(logits_fn, name, cfg, x, y, key=jax.random.key(0),
                                              batch_size=8, eps=eps)[0].mean())
            for name in ("stepll", "r+stepll", "iterll")}
    assert all(0.0 <= a <= 1.0 for a in accs.values()), accs
  # a larger budget is never weaker for the one-step attack (same target, longer step)
  weak, strong = (float(evaluate.robust_flags(logits_fn, "stepll", cfg, x, y,
                                              key=jax.random.key(0), batch_size=8,
                                              eps=e)[0].mean()) for e in (0.01, 0.4))
  assert strong <= weak
