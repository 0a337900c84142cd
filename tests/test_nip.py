"""NIP (docs/methods.md section 4): influence, neuron sets, inverse perturbation, statistics."""

from __future__ import annotations

import functools
import inspect
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdef.defenses import nip
from jaxdef.defenses.base import apply_fn
from jaxdef.errors import ConfigError
from jaxdef.models import create_model

CLASSES = 10
# 20 x 20 digits-like inputs: pool2 of the quarter-width small CNN is 2 x 2 x 16.
SHAPE = (20, 20, 1)
POOL2 = 2 * 2 * 16
ETA = 0.01


def random_variables(model, shape, seed: int):
  """Random weights without compiling ``model.init`` (about 20 s on XLA:CPU): He-scaled
  normal kernels and small normal biases, drawn by numpy into ``init``'s shapes."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0
    scale = np.sqrt(2.0 / fan_in) if fan_in else 0.1
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)
  return jax.tree.map(draw, abstract)


@functools.lru_cache(maxsize=None)
def tiny_model(seed: int = 0):
  """A quarter-width small CNN with random weights on ``SHAPE`` inputs."""
  model = create_model("small_cnn", num_classes=CLASSES, mean=(0.5,), std=(0.5,), width=0.25)
  return model, random_variables(model, SHAPE, seed)


@functools.lru_cache(maxsize=None)
def images(n: int = 8):
  return jax.random.uniform(jax.random.key(7), (n, *SHAPE))


@functools.lru_cache(maxsize=None)
def tiny_apply(seed: int = 0):
  model, variables = tiny_model(seed)
  return apply_fn(model, variables, train=False)


# Compiled once for the file (eager calls of a CNN's gradient are slow on CPU).
influence = jax.jit(nip.neuron_influence, static_argnums=(0, 3))
objective = jax.jit(nip.nip_objective, static_argnums=(0, 2))
restore = jax.jit(nip.inverse_perturbation, static_argnums=(0, 2),
                  static_argnames=("eta", "steps"))
restore_by_class = jax.jit(nip.class_conditional_restore, static_argnums=(0, 2),
                           static_argnames=("eta", "steps", "top_classes"))


@jax.jit
def logits(x):
  return tiny_apply()(x)["logits"]


@functools.lru_cache(maxsize=None)
def tiny_stats(layer: str = "pool2", seed: int = 0) -> nip.NipStatistics:
  """Statistics of the tiny model, using its own predictions as labels (all correct)."""
  apply = tiny_apply(seed)
  x = images(32)
  y = jnp.argmax(jax.jit(lambda z: apply(z)["logits"])(x), -1)
  return nip.influence_statistics(apply, np.asarray(x), np.asarray(y), layer=layer,
                                  num_classes=CLASSES, batch_size=5, progress=False)


def test_influence_has_one_value_per_neuron_of_the_layer():
  apply, x = tiny_apply(), images()
  y = jnp.zeros(len(x), jnp.int32)
  shape = lambda layer: jax.eval_shape(lambda z: nip.neuron_influence(apply, z, y, layer), x)
  chex.assert_shape(shape("pool2"), (len(x), POOL2))
  chex.assert_shape(shape("penultimate"), (len(x), 50))


def head_case():
  """(apply, x, y, penultimate activations a (N, D), head kernel (D, classes))."""
  _, variables = tiny_model()
  apply, x = tiny_apply(), images()
  a = jax.jit(lambda z: apply(z)["features"]["penultimate"])(x)
  return apply, x, jnp.arange(len(x)) % CLASSES, a, variables["params"]["head"]["kernel"]


def test_influence_before_a_linear_head_is_activation_times_the_class_weight():
  apply, x, y, a, kernel = head_case()
  expected = a * kernel[:, y].T                             # I_j = a_j * d z_y / d a_j
  assert float(jnp.max(jnp.abs(expected))) > 0
  chex.assert_trees_all_close(influence(apply, x, y, "penultimate"), expected,
                              rtol=1e-5, atol=1e-6)


def test_unknown_layer_is_a_one_line_error():
  with pytest.raises(ConfigError, match="valid") as err:
    influence(tiny_apply(), images(), jnp.zeros(len(images()), jnp.int32), "conv9")
  assert "\n" not in str(err.value)


def test_statistics_average_only_correctly_classified_images():
  apply, x = tiny_apply(), images()
  pred = jnp.argmax(logits(x), -1)
  y = np.asarray(pred).copy()
  y[::3] = (y[::3] + 1) % CLASSES                           # a third are misclassified
  stats = nip.influence_statistics(apply, np.asarray(x), y, layer="pool2",
                                   num_classes=CLASSES, batch_size=5, progress=False)
  correct = y == np.asarray(pred)
  by_hand = np.asarray(influence(apply, x, jnp.asarray(y), "pool2"))
  np.testing.assert_array_equal(stats.counts, np.bincount(y[correct], minlength=CLASSES))
  np.testing.assert_allclose(stats.overall, by_hand[correct].mean(0), rtol=1e-5, atol=1e-7)
  for c in range(CLASSES):
    rows = by_hand[correct & (y == c)]
    expected = rows.mean(0) if len(rows) else stats.overall  # empty class: overall mean
    np.testing.assert_allclose(stats.per_class[c], expected, rtol=1e-5, atol=1e-7)
  assert stats.train_examples == len(x) and stats.layer == "pool2"


def test_uint8_training_images_are_scaled_to_the_unit_interval():
  apply, x = tiny_apply(), images()
  y = np.asarray(jnp.argmax(logits(x), -1))
  as_uint8 = np.round(np.asarray(x) * 255).astype(np.uint8)
  a = nip.influence_statistics(apply, as_uint8, y, layer="pool2", num_classes=CLASSES,
                               batch_size=5, progress=False)
  b = nip.influence_statistics(apply, as_uint8.astype(np.float32) / 255, y, layer="pool2",
                               num_classes=CLASSES, batch_size=5, progress=False)
  np.testing.assert_allclose(a.overall, b.overall, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("front,tail,k,t", [(1, 5, 1, 5), (2, 0.25, 2, 2), (0.5, 1, 4, 1)])
def test_neuron_sets_honour_counts_and_fractions(front, tail, k, t):
  influence = jnp.asarray([0.3, -2.0, 5.0, 0.1, 4.0, -1.0, 0.0, 2.0])   # D = 8
  order = np.argsort(-np.asarray(influence), kind="stable")
  front_index, tail_index = nip.neuron_sets(influence, front, tail)
  np.testing.assert_array_equal(front_index, order[:k])
  np.testing.assert_array_equal(tail_index, order[::-1][:t])


def test_per_class_sets_rank_each_class_separately():
  influence = jnp.asarray([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]])
  front_index, tail_index = nip.neuron_sets(influence, 1, 1)
  np.testing.assert_array_equal(front_index, [[0], [2]])
  np.testing.assert_array_equal(tail_index, [[2], [0]])
  weights = nip.neuron_weights(front_index, tail_index, 3)
  np.testing.assert_array_equal(weights, [[1, 0, -1], [-1, 0, 1]])


def test_neuron_sets_larger_than_the_layer_are_refused():
  with pytest.raises(ConfigError, match="exceed"):
    nip.neuron_sets(jnp.zeros(8), 4, 5)


def test_one_inverse_step_increases_front_minus_tail():
  apply, x = tiny_apply(), images()
  stats = tiny_stats()
  front, tail = nip.neuron_sets(stats.overall, 1, 5)
  weights = nip.neuron_weights(front, tail, stats.overall.shape[-1])
  before = objective(apply, x, "pool2", weights)
  restored = restore(apply, x, "pool2", weights, eta=ETA, steps=1)
  after = objective(apply, restored, "pool2", weights)
  moved = jnp.max(jnp.abs(restored - x), axis=(1, 2, 3)) > 0
  assert bool(jnp.any(moved))
  assert bool(jnp.all(jnp.where(moved, after > before, after == before)))
  # The step is eta * g / rms(g): its rms over the pixels is eta (none are clipped here).
  inside = jnp.all((restored > 0) & (restored < 1), axis=(1, 2, 3)) & moved
  rms = jnp.sqrt(jnp.mean(jnp.square(restored - x), axis=(1, 2, 3)))
  np.testing.assert_allclose(np.asarray(rms)[np.asarray(inside)], ETA, rtol=1e-3)


def test_restored_images_stay_in_the_unit_box():
  model, variables = tiny_model()
  config = nip.default_nip_config()
  config.update(eta=0.5, steps=3)
  restored = jax.jit(nip.nip_transform(model, variables, tiny_stats(), config))(images())
  assert float(jnp.min(restored)) >= 0.0 and float(jnp.max(restored)) <= 1.0
  assert bool(jnp.any((restored == 0.0) | (restored == 1.0)))


@pytest.mark.parametrize("class_conditional,top_classes", [(False, 1), (True, 3)])
def test_transform_is_deterministic_and_reads_only_the_image(class_conditional, top_classes):
  model, variables = tiny_model()
  config = nip.default_nip_config()
  config.update(class_conditional=class_conditional, top_classes=top_classes, eta=0.01)
  transform = nip.nip_transform(model, variables, tiny_stats(), config)
  assert list(inspect.signature(transform).parameters) == ["x"]
  x = images()
  perm = np.random.default_rng(0).permutation(len(x))
  once, again = jax.jit(transform)(x), jax.jit(transform)(x)
  np.testing.assert_array_equal(once, again)
  # Each example's restoration depends on that example alone (no label, no batch order).
  chex.assert_trees_all_close(jax.jit(transform)(x[perm]), once[perm], atol=1e-6)
  assert float(jnp.max(jnp.abs(once - x))) > 0


def random_class_weights():
  """(C, D) +-1 weights of per-class sets ranked from random influences: every class differs."""
  front, tail = nip.neuron_sets(jax.random.normal(jax.random.key(3), (CLASSES, POOL2)), 1, 5)
  return nip.neuron_weights(front, tail, POOL2)


def test_class_conditional_restoration_uses_the_predicted_class_sets():
  apply, x = tiny_apply(), images()
  class_weights = random_class_weights()
  pred, runner_up = jax.lax.top_k(logits(x), 2)[1].T
  got = restore_by_class(apply, x, "pool2", class_weights, eta=ETA, steps=1)
  expected = restore(apply, x, "pool2", class_weights[pred], eta=ETA, steps=1)
  chex.assert_trees_all_close(got, expected, atol=1e-6)
  # Where the runner-up class has other sets, its restoration is not the one returned.
  other = restore(apply, x, "pool2", class_weights[runner_up], eta=ETA, steps=1)
  differs = np.any(np.asarray(class_weights[pred] != class_weights[runner_up]), axis=-1)
  assert differs.any()
  assert np.all(np.max(np.abs(np.asarray(got - other)), axis=(1, 2, 3))[differs] > 1e-4)


def test_top_classes_keeps_the_most_confident_restoration():
  apply, x = tiny_apply(), images()
  class_weights = random_class_weights()
  got = restore_by_class(apply, x, "pool2", class_weights, eta=ETA, steps=1, top_classes=3)
  top = jax.lax.top_k(logits(x), 3)[1]
  candidates = jnp.stack([restore(apply, x, "pool2", class_weights[top[:, j]], eta=ETA,
                                  steps=1) for j in range(3)])
  confidence = jnp.stack([jnp.max(jax.nn.softmax(logits(c)), -1) for c in candidates])
  best = jnp.argmax(confidence, 0)
  chex.assert_trees_all_close(got, candidates[best, jnp.arange(len(x))], atol=1e-6)


def test_statistics_round_trip_exactly_and_name_their_step(tmp_path):
  stats = nip.NipStatistics(**{**tiny_stats().__dict__, "step": 30, "weights": "params"})
  path = nip.statistics_path(str(tmp_path), 30)
  assert path.endswith(os.path.join("nip", "influence_step_30.npz"))
  nip.save_statistics(path, stats)
  back = nip.load_statistics(path, stats.identity())
  assert back.identity() == stats.identity() and back.train_examples == stats.train_examples
  for field in ("overall", "per_class", "counts"):
    a, b = getattr(stats, field), getattr(back, field)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="step=30"):
    nip.load_statistics(path, {"step": 60})
  with pytest.raises(ConfigError, match="layer"):
    nip.load_statistics(path, {"layer": "penultimate"})


def _write_run(workdir, config, steps):
  """A run directory with ``config`` and a random checkpoint per step."""
  from jaxdef.data import load_dataset
  from jaxdef import checkpoint as ckpt
  from jaxdef.build import DataMeta
  config.nip = nip.default_nip_config()
  config.nip.update(num_train_examples=24, batch_size=16)
  ckpt.write_run_config(str(workdir), config, DataMeta.from_dataset(load_dataset(config.data)).to_dict())
  manager = ckpt.checkpoint_manager(str(workdir), max_to_keep=5, async_save=False)
  model, _ = tiny_model()
  for i, step in enumerate(steps):
    variables = random_variables(model, (28, 28, 1), seed=i)
    ckpt.save(manager, step, {"params": variables["params"]})
    ckpt.finish(manager, step)
  manager.close()
  return config


def _statistics(workdir, config, step=None):
  """:func:`nip.ensure_statistics` of checkpoint ``step`` (default: newest) of the run."""
  from jaxdef.data import eval_data
  from jaxdef.restored import load_run
  return nip.ensure_statistics(load_run(str(workdir), step=step), config.nip,
                               eval_data(config.data), progress=False)


def test_ensure_statistics_computes_once_per_checkpoint_step(tmp_path, tiny):
  config = _write_run(tmp_path, tiny(), (3, 6))
  newest = _statistics(tmp_path, config)
  assert newest.step == 6 and newest.layer == "pool2" and newest.train_examples == 24
  path = nip.statistics_path(str(tmp_path), 6)
  mtime = os.stat(path).st_mtime_ns
  again = _statistics(tmp_path, config)
  assert os.stat(path).st_mtime_ns == mtime            # loaded, not recomputed
  np.testing.assert_array_equal(again.per_class, newest.per_class)
  older = _statistics(tmp_path, config, step=3)
  assert older.step == 3 and not np.array_equal(older.overall, newest.overall)
  config.nip.layer = "penultimate"                       # a mismatching file is recomputed
  changed = _statistics(tmp_path, config)
  assert changed.layer == "penultimate" and changed.overall.shape == (50,)
  assert nip.load_statistics(path).layer == "penultimate"


def test_nip_is_the_registered_test_time_transform_of_a_run(tmp_path, tiny):
  from jaxdef.data import eval_data
  from jaxdef.defenses import create_transform
  from jaxdef.restored import load_run
  config = _write_run(tmp_path, tiny(), (4,))
  run = load_run(str(tmp_path))
  model, variables = run.model, run.variables
  tt = create_transform("nip", run=run, config=config, data=eval_data(config.data))
  assert not tt.randomized and tt.info["step"] == 4 and tt.info["layer"] == "pool2"
  assert os.path.exists(nip.statistics_path(str(tmp_path), 4))
  stats = nip.load_statistics(nip.statistics_path(str(tmp_path), 4))
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  expected = nip.nip_transform(model, variables, stats, config.nip)(x)
  chex.assert_trees_all_close(jax.jit(tt.transform)(x), expected, atol=1e-6)
  chex.assert_trees_all_close(tt.classifier(x), model.apply(variables, x)["logits"])


@pytest.mark.parametrize("field,value", [
    ("front", 0), ("front", 1.5), ("tail", -0.2), ("tail", True), ("eta", 0.0),
    ("steps", 0), ("steps", 1.5), ("class_conditional", "yes"), ("top_classes", 0),
    ("top_classes", 3), ("num_train_examples", -1), ("batch_size", 0), ("layer", ""),
    ("oracle_signal", "softmax"),
])
def test_invalid_nip_config_is_one_line_error(field, value):
  config = ml_collections.ConfigDict({**nip.default_nip_config().to_dict(), field: value})
  with pytest.raises(ConfigError, match=f"nip.{field}") as err:
    nip.check_nip_config(config)
  assert "\n" not in str(err.value)


def test_config_overrides_take_counts_and_fractions():
  config = nip.default_nip_config()
  config.front, config.tail = 0.1, 3           # as --config.nip.front=0.1 --config.nip.tail=3
  nip.check_nip_config(config)
  assert nip.neuron_count(config.front, 64) == 6 and nip.neuron_count(config.tail, 64) == 3


def test_default_layer_is_the_last_conv_features_or_the_penultimate():
  assert nip.default_layer("small_cnn") == "pool2"
  assert nip.default_layer("resnet18") == "penultimate"
  assert nip.default_layer("wide_resnet") == "penultimate"


# ----------------------------------------------------------------------------
# The authors' oracle protocol (issue 15): reads the clean image, flips the sign.

oracle = jax.jit(nip.oracle_restore, static_argnums=(0, 3),
                 static_argnames=("front", "tail", "eta", "steps", "signal"))


def test_probability_influence_before_a_linear_head_is_the_softmax_gradient():
  apply, x, y, a, kernel = head_case()
  p = jax.nn.softmax(logits(x))
  # d p_y / d a = p_y * (W[:, y] - sum_k p_k W[:, k])
  expected = a * p[jnp.arange(len(x)), y][:, None] * (kernel[:, y].T - p @ kernel.T)
  got = nip.neuron_influence(apply, x, y, "penultimate", signal="probability")
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-7)


def _oracle_parts(apply, x_clean, eta):
  """The clean prediction, and the +- restorations' step built by hand: the
  clean image's own influence (probability signal), top-1 / bottom-5 sets, the
  gradient of J at the clean image, RMS-normalised."""
  pred = jnp.argmax(logits(x_clean), -1)
  infl = np.asarray(nip.neuron_influence(apply, x_clean, pred, "pool2", signal="probability"))
  order = np.argsort(infl, axis=-1, kind="stable")
  w = np.zeros_like(infl)
  for i in range(len(infl)):
    w[i, order[i, -1]] += 1.0
    w[i, order[i, :5]] -= 1.0
  g = jax.grad(lambda z: jnp.sum(nip.nip_objective(apply, z, "pool2", jnp.asarray(w))))(x_clean)
  g = g / jnp.sqrt(jnp.mean(jnp.square(g), axis=(1, 2, 3), keepdims=True))
  return pred, eta * g


def test_oracle_steps_from_the_clean_gradient_and_flips_the_sign_when_needed():
  apply, x = tiny_apply(), images()
  x_adv = jnp.clip(x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), 0, 1)
  eta = 0.3                                          # large enough to move predictions
  got = oracle(apply, x, x_adv, "pool2", front=1, tail=5, eta=eta, steps=1)
  pred, step = _oracle_parts(apply, x, eta)
  plus, minus = jnp.clip(x_adv + step, 0, 1), jnp.clip(x_adv - step, 0, 1)
  keep_plus = np.asarray(jnp.argmax(logits(plus), -1) == pred)
  assert keep_plus.any() and not keep_plus.all()     # both branches exercised
  expected = jnp.where(keep_plus[:, None, None, None], plus, minus)
  chex.assert_trees_all_close(got, expected, atol=1e-5)
  # T steps of a fixed direction: one step of T * eta.
  chex.assert_trees_all_close(oracle(apply, x, x_adv, "pool2", front=1, tail=5, eta=eta / 3,
                                     steps=3), got, atol=1e-5)


def test_oracle_depends_on_the_clean_image_the_deployable_nip_never_sees():
  model, variables = tiny_model()
  apply, x = tiny_apply(), images()
  x_adv = jnp.clip(x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), 0, 1)
  other_clean = images(16)[8:]
  a = oracle(apply, x, x_adv, "pool2", front=1, tail=5, eta=ETA, steps=1)
  b = oracle(apply, other_clean, x_adv, "pool2", front=1, tail=5, eta=ETA, steps=1)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  config = nip.default_nip_config()
  config.eta = ETA
  paired = nip.nip_oracle(model, variables, "pool2", config)
  assert list(inspect.signature(paired).parameters) == ["x_clean", "x_adv"]
  chex.assert_trees_all_close(jax.jit(paired)(x, x_adv), a, atol=1e-6)
  deployable = nip.nip_transform(model, variables, tiny_stats(), config)
  assert list(inspect.signature(deployable).parameters) == ["x"]


def test_suite_reports_the_oracle_beside_the_deployed_pipeline():
  """A fixture whose answers are known: the 'oracle' returns the clean image
  (restores every attacked example) and the deployed transform is the
  identity (restores none)."""
  from jaxdef import evaluate
  w = jax.random.normal(jax.random.key(0), (int(np.prod(SHAPE)), CLASSES))
  bare = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) - 0.5) @ w
  x = np.asarray(images(16))
  y = np.asarray(jnp.argmax(bare(x), -1)).astype(np.int32)
  target = evaluate.Target(predict=bare, reference=bare, oracle=lambda clean, adv: clean)
  cfg = evaluate.default_eval_config(0.1, "linf")
  cfg.update(num_examples=16, batch_size=8, attacks="clean,pgd5", masking_checks=False)
  r = evaluate.run_suite(target, x, y, suite_config=cfg, key=jax.random.key(0), progress=False)
  fooled = int(round((1 - r["attacks"]["pgd5"]) * 16))
  assert fooled > 0
  assert r["defense_success"]["pgd5"] == 0.0
  assert r["oracle_success"]["pgd5"] == 1.0 and r["oracle_attacked"]["pgd5"] == fooled
  table = evaluate.results_table(r)
  assert "oracle success (reads the clean image)" in table and f"100.00% of {fooled}" in table
  assert "not a defense" in table


def test_nip_protocol_scores_deployable_and_oracle_on_min_norm_and_pgd(tmp_path, tiny):
  from jaxdef.evaluate.run import evaluate_workdir
  config = _write_run(tmp_path, tiny(), (4,))
  config.eval.update(protocol="nip", num_examples=8, batch_size=8, masking_checks=False,
                     attention=False, aa_fab_steps=5, aa_steps=2, aa_queries=4,
                     adaptive_attacks="pgd2")
  r = evaluate_workdir(str(tmp_path), config)
  assert {"fab", "pgd20", "autoattack"} <= set(r["attacks"])
  assert set(r["oracle_success"]) == {"fab", "pgd20", "autoattack"}
  assert set(r["defense_success"]) >= {"fab", "pgd20"}
  for col in ("fab", "pgd20"):
    assert 0.0 <= r["oracle_success"][col] <= 1.0
    assert 0 <= r["oracle_attacked"][col] <= 8
