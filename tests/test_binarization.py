"""The attack unit test (binarization, Zimmermann et al. 2022): its construction,
its verdict on sound and crippled attacks, and the headline it marks."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef import evaluate
from jaxdef.attacks.common import lp_norm
from jaxdef.config import validate
from jaxdef.errors import ConfigError
from jaxdef.evaluate import binarization

SHAPE, EPS = (16, 16, 1), 0.3


@functools.lru_cache(maxsize=None)
def small_cnn():
  """An undefended quarter-width small CNN (random weights) on 16x16 images, as a
  Target with its tap points, and 12 test images."""
  from jaxdef.models.registry import create_model
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.5,), width=0.25)
  x = images(12)
  # XLA's generator: threefry's initialisers take ~25 s to compile on a loaded CPU.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0, impl="rbg"), x[:1])
  outputs = lambda z: model.apply(variables, z, train=False)
  return evaluate.Target(predict=lambda z: outputs(z)["logits"], outputs=outputs), x


def images(n, shape=SHAPE):
  return np.asarray(jax.random.uniform(jax.random.key(1), (n,) + shape))


def eval_config(**overrides):
  c = evaluate.default_eval_config(EPS, "linf")
  c.update(dict(attacks="clean,pgd10", num_examples=12, batch_size=12, masking_checks=False,
                unit_test="cheap"))
  c.update(overrides)
  return c


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ball_points_lie_in_the_ball_and_the_boundary_point_at_its_edge(norm):
  x = jnp.asarray(images(3))
  x = x.at[0].set(0.0).at[1].set(1.0)  # saturated images: the box must clip nothing

  @jax.jit
  def sample(x):
    points, labels = binarization.ball_points(jax.random.key(0), x, eps=EPS, norm=norm, inner=7)
    return points, labels, jax.vmap(lambda p, c: lp_norm(p - c, norm))(points, x)

  points, labels, dist = sample(x)
  chex.assert_shape(points, (3, 9) + SHAPE)
  np.testing.assert_array_equal(labels, [0] * 8 + [1])
  assert float(points.min()) >= 0.0 and float(points.max()) <= 1.0
  chex.assert_shape(dist, (3, 9))
  np.testing.assert_array_equal(dist[:, 0], 0.0)                  # x itself
  assert float(dist[:, 1:-1].max()) <= 0.95 * EPS + 1e-6          # inner points
  np.testing.assert_allclose(dist[:, -1], 0.99 * EPS, rtol=1e-5)  # inside, near the edge


def test_the_fitted_readout_makes_the_boundary_point_adversarial():
  """The construction is valid: on the model's penultimate features the readout
  classifies x and the inner points 0 and the boundary point 1, so the
  binarized model has an adversarial example inside the eps-ball."""
  target, x = small_cnn()
  kind, deployed, _ = binarization.feature_fns(target, jnp.asarray(x[:1]))
  assert kind == "penultimate"

  @jax.jit
  def construct(x):
    points, labels = binarization.ball_points(jax.random.key(0), x, eps=EPS, norm="linf",
                                              inner=15)

    def one(p):
      features = deployed(p, None)
      readout = binarization.fit_readout(features, labels)
      return (binarization.binarized_logits(readout, features),
              binarization.separates(readout, features, labels),
              binarization.readout_logit(readout, features))
    return labels, jax.vmap(one)(points)

  labels, (logits, separated, s) = construct(jnp.asarray(x[:4]))
  chex.assert_shape(logits, (4, 17, 2))
  np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.broadcast_to(labels, (4, 17)))
  assert bool(separated.all())
  # The authors' 'fixed' rescaling: |s| <= 1 on the fitted points.
  assert float(jnp.abs(s).max()) <= 1 + 1e-5
  # Without tap points the logits are the features.
  assert binarization.feature_fns(evaluate.Target(predict=target.predict),
                                  jnp.asarray(x[:1]))[0] == "logits"


def test_an_undefended_small_cnn_passes_with_the_suites_pgd():
  target, x = small_cnn()
  unit = binarization.unit_test(target, x, suite_config=eval_config(), names=["clean", "pgd10"],
                                key=jax.random.key(0))
  assert unit["features"] == "penultimate" and unit["examples"] == 12
  assert unit["valid"] == 12 and unit["fit_failed"] == 0
  assert unit["attacks"]["pgd10"]["success_rate"] >= 0.95 and unit["passed"]
  assert evaluate.report.unit_test_line(unit).startswith(
      "Attack unit test (cheap; binarization, Zimmermann et al. 2022): passed")
  assert binarization.unit_test(target, x, suite_config=eval_config(unit_test="off"),
                                names=["pgd10"], key=jax.random.key(0)) is None


def test_a_crippled_pgd_fails_and_marks_the_headline_unreliable(tmp_path, capsys):
  """Steps ten thousand times too small leave PGD near its random start: it
  finds (almost) none of the adversarial examples that exist, and the
  headline says so, naming the test, its rate and what to run next."""
  target, x = small_cnn()
  r = evaluate.evaluate_and_report(target, x, np.zeros(len(x), np.int32),
                                   eval_config=eval_config(attacks="clean,pgd2",
                                                           pgd_step_size=EPS / 1e4),
                                   workdir=str(tmp_path), key=jax.random.key(0))
  unit, claim = r["unit_test"], r["headline"]
  assert unit["valid"] == 12 and unit["success_rate"] < 0.5 and unit["passed"] is False
  assert not claim["reliable"] and claim["robust_accuracy"] == r["ensemble"]
  assert any(reason.startswith("attack unit test (binarization, Zimmermann et al. 2022) "
                               "failed") and f"pgd2 {100 * unit['success_rate']:.1f}%" in reason
             for reason in claim["reasons"])
  assert any("stronger or different attack" in step for step in claim["next"])
  saved = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert saved["unit_test"]["passed"] is False and not saved["headline"]["reliable"]
  table = (tmp_path / "eval" / "results.md").read_text()
  assert "Attack unit test (cheap; binarization, Zimmermann et al. 2022): FAILED" in table
  assert "UNRELIABLE" in table
  assert "WARNING (attack unit test)" in capsys.readouterr().out


def test_the_modes_pick_the_suites_attacks_a_binary_model_can_take():
  names = ["clean", "fgsm", "pgd20", "pgd100", "cw", "autoattack", "square", "joint-pgd20"]
  assert binarization.unit_test_attacks(names, "cheap") == ["apgd-ce"]
  assert binarization.unit_test_attacks(["clean", "pgd20", "pgd100", "cw"], "cheap") == ["pgd100"]
  assert binarization.unit_test_attacks(names, "full") == ["fgsm", "pgd20", "pgd100", "cw",
                                                           "apgd-ce"]
  assert binarization.unit_test_attacks(names, "off") == []
  assert binarization.unit_test_attacks(["clean", "fgsm"], "cheap") == ["fgsm"]
  with pytest.raises(ConfigError, match="unknown eval.unit_test"):
    binarization.unit_test_attacks(names, "fast")
  skipped = binarization.unit_test(*small_cnn(), names=["clean", "square"],
                                   suite_config=eval_config(), key=jax.random.key(0))
  assert skipped["passed"] is None and "square" in skipped["skipped"]
  assert "not run" in evaluate.report.unit_test_line(skipped)


def test_the_default_is_the_cheap_test_and_a_bad_mode_is_refused(tiny):
  c = evaluate.default_eval_config(EPS, "linf")
  assert (c.unit_test, c.unit_test_examples, c.unit_test_threshold) == ("cheap", 200, 0.95)
  config = tiny()
  config.eval.unit_test = "always"
  with pytest.raises(ConfigError, match="eval.unit_test"):
    validate(config, 1)
