"""PSSR (docs/methods.md section 5): pixel surgery, the regenerator, the losses, training
through the trainer (frozen and joint classifier), and the restored pipeline."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxdef
from jaxdef.restored import load_run
from jaxdef.attacks.losses import cross_entropy
from jaxdef.build import DataMeta, build
from jaxdef.config import validate
from jaxdef.defenses import create_defense
from jaxdef.defenses import pssr
from jaxdef.errors import ConfigError
from jaxdef.models.base import Taps
from jaxdef.models.layers import Classifier, batch_norm, classify, conv
from jaxdef.models.registry import create_model
from jaxdef.models.unet import ConditionalUNet
from jaxdef.objectives import create_objective
from jaxdef import checkpoint as ckpt
from jaxdef.train.state import TrainState, graft_variables, init_train_state, make_optimizer
from jaxdef.train.step import AttackBudget, make_train_step

N = 4
SHAPE = (12, 12, 1)


class TinyBN(Classifier):
  """A classifier with BatchNorm (so frozen statistics can be checked), in milliseconds."""

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    taps = Taps(self, self.insert, train, labels)
    h = nn.relu(batch_norm(train, self.dtype)(conv(4, 3, dtype=self.dtype)(x)))
    h = taps("conv", h)
    return classify(taps, jnp.mean(h, axis=(1, 2)), self.num_classes, self.dtype)


def sgd_config(weight_decay: float = 0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, nesterov=False,
                                        weight_decay=weight_decay, schedule="constant",
                                        milestones=(), warmup_epochs=0.0))


def tiny_pssr(classifier_train: bool = False, rho: float = 0.25) -> pssr.PSSR:
  return pssr.PSSR(classifier=TinyBN(num_classes=10),
                   regenerator=ConditionalUNet(width=4, levels=1), rho=rho,
                   classifier_train=classifier_train)


def jitted_apply(model: nn.Module):
  """``model.apply`` compiled (eager Flax calls are slow on a busy CPU)."""
  return jax.jit(model.apply, static_argnames=("train", "mutable", "method"))


@pytest.fixture(scope="module")
def tiny():
  model = tiny_pssr()
  x = jax.random.uniform(jax.random.key(1), (N, *SHAPE))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  return model, variables, x


# ---- pixel surgery ----------------------------------------------------------------------

def test_surgery_removes_exactly_round_rho_hw_pixels_and_keeps_the_others_bit_identical():
  x = jax.random.uniform(jax.random.key(0), (3, 7, 9, 2))
  score = jax.random.normal(jax.random.key(1), (3, 7, 9))
  for rho, expected in ((0.3, 19), (0.2, 13), (0.5, 32)):  # 18.9, 12.6, 31.5 (half up)
    mask = pssr.top_rho_mask(score, rho)
    assert pssr.removed_pixel_count(rho, 7, 9) == expected
    np.testing.assert_array_equal(jnp.sum(mask, axis=(1, 2)), [expected] * 3)
    x_s = pssr.remove_pixels(x, mask)
    keep = np.asarray(~mask)
    np.testing.assert_array_equal(np.asarray(x_s)[keep], np.asarray(x)[keep])
    assert float(jnp.max(jnp.abs(x_s[mask]))) == 0.0


def test_mask_is_the_top_rho_of_the_score_with_ties_to_the_lower_index():
  score = jax.random.normal(jax.random.key(2), (5, 8, 8))
  mask = np.asarray(pssr.top_rho_mask(score, 0.2))
  s = np.asarray(score)
  for i in range(5):
    assert s[i][mask[i]].min() > s[i][~mask[i]].max()
  flat = np.asarray(pssr.top_rho_mask(jnp.ones((1, 4, 5)), 0.3)).reshape(-1)
  np.testing.assert_array_equal(flat, np.arange(20) < 6)  # equal scores: row-major first


def test_model_mask_is_the_top_rho_of_the_classifier_input_gradient(tiny):
  model, variables, x = tiny
  classify, _ = pssr.pssr_parts(model, variables)
  expected = jax.jit(lambda z: pssr.top_rho_mask(pssr.surgery_score(classify, z), model.rho))(x)
  out = jitted_apply(model)(variables, x)
  np.testing.assert_array_equal(out["aux"]["pssr"]["mask"], expected)
  # No label is used: the score is the loss at the classifier's own prediction.
  grad = jax.grad(lambda z: pssr.own_prediction_loss(classify(z)))(x)
  chex.assert_trees_all_close(pssr.surgery_score(classify, x), jnp.sum(jnp.abs(grad), -1))


# ---- the regenerator and the restoration --------------------------------------------------

@pytest.mark.parametrize("shape,levels", [((28, 28, 1), 2), ((32, 32, 3), 2), ((13, 11, 3), 2)])
def test_regenerator_output_has_the_image_shape_and_is_in_unit_interval(shape, levels):
  unet = ConditionalUNet(width=2, levels=levels)
  x_s = jax.random.uniform(jax.random.key(0), (2, *shape))
  mask = jax.random.bernoulli(jax.random.key(1), 0.3, (2, *shape[:2]))
  cond = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, 10)))
  variables = unet.init(jax.random.key(3), x_s, mask, cond, train=False)
  variables = jax.tree.map(lambda v: v * 30.0, variables)  # push the sigmoid to saturation
  out = unet.apply(variables, x_s, mask, cond, train=False)
  chex.assert_shape(out, (2, *shape))
  assert float(jnp.min(out)) >= 0.0 and float(jnp.max(out)) <= 1.0


def test_restoration_equals_the_input_outside_the_mask(tiny):
  model, variables, x = tiny
  out = jitted_apply(model)(variables, x, train=True, rngs={"dropout": jax.random.key(5)},
                            mutable=("batch_stats",))[0]["aux"]["pssr"]
  keep = np.asarray(~out["mask"])
  for restored in out["restored"]:
    np.testing.assert_array_equal(np.asarray(restored)[keep], np.asarray(x)[keep])
  assert float(jnp.max(jnp.abs(out["restored"][0] - x))) > 0  # the mask was filled


def test_rdrop_is_zero_for_identical_restorations_and_positive_for_different_dropout(tiny):
  model, variables, x = tiny
  logits = jax.random.normal(jax.random.key(0), (N, 10))
  np.testing.assert_allclose(pssr.rdrop_loss(logits, logits), 0.0, atol=1e-6)
  apply = jitted_apply(model)
  run = lambda key: apply(variables, x, train=True, rngs={"dropout": key},
                          mutable=("batch_stats",))[0]["aux"]["pssr"]["logits_r"]
  two = run(jax.random.key(1))  # the two restorations of one pass: different draws
  assert bool(jnp.all(pssr.rdrop_loss(two[0], two[1]) > 0))
  assert bool(jnp.all(pssr.rdrop_loss(two[0], run(jax.random.key(2))[0]) > 0))
  evaluation = apply(variables, x)["aux"]["pssr"]["restored"]
  chex.assert_trees_all_equal(evaluation, apply(variables, x)["aux"]["pssr"]["restored"])


def test_objective_is_ce_plus_weighted_terms_on_adversarial_and_clean_restorations(tiny):
  model, variables, x = tiny
  y = jnp.arange(N) % 10
  apply = jitted_apply(model)
  run = lambda z: apply(variables, z, train=True, rngs={"dropout": jax.random.key(1)},
                        mutable=("batch_stats",))[0]
  clean, adv = run(x), run(jnp.clip(x + 0.1, 0, 1))
  weights = dict(lam_pix=0.5, lam_sem=2.0, alpha=3.0, mask_weight=5.0)
  total = pssr.pssr_objective(clean, adv, y, clean_weight=0.25, **weights)
  terms = lambda out: pssr.restoration_terms(out["aux"]["pssr"], clean["aux"]["pssr"], y,
                                             **weights)
  chex.assert_trees_all_close(total, terms(adv) + 0.25 * terms(clean), rtol=1e-6)
  a, c = adv["aux"]["pssr"], clean["aux"]["pssr"]
  by_hand = sum(
      cross_entropy(a["logits_r"][i], y)
      + 0.5 * pssr.pixel_loss(a["restored"][i], x, a["mask"], 5.0)
      + 2.0 * pssr.semantic_loss(a["features_r"][i], c["raw_features"], a["logits_r"][i],
                                 c["raw_logits"]) for i in range(2)) / 2
  by_hand = by_hand + 3.0 * pssr.rdrop_loss(a["logits_r"][0], a["logits_r"][1])
  chex.assert_trees_all_close(terms(adv), by_hand, rtol=1e-5)


# ---- training through the trainer -----------------------------------------------------------

def _one_step(classifier_train: bool, trainable: str):
  model = tiny_pssr(classifier_train=classifier_train)
  tx = make_optimizer(sgd_config(5e-4), 10, 10, trainable=trainable)
  state = jax.jit(lambda: init_train_state(model, tx, jax.random.key(0), image_shape=SHAPE))()
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=create_objective("at"), defense=create_defense("pssr"),
      budget=AttackBudget(eps=0.3, step_size=0.1, steps=1), augment="none", ema_decay=0.0,
      seed=0, trainable=trainable))
  images = jax.random.randint(jax.random.key(2), (8, *SHAPE), 0, 256).astype(jnp.uint8)
  new, metrics = step(state, images, jnp.arange(8, dtype=jnp.int32) % 10)
  assert bool(metrics["finite"])
  return state, new


def _changed(a, b) -> bool:
  return any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_step_changes_only_the_regenerator():
  before, after = _one_step(classifier_train=False, trainable="^regenerator/")
  chex.assert_trees_all_equal(before.params["classifier"], after.params["classifier"])
  chex.assert_trees_all_equal(before.batch_stats, after.batch_stats)
  assert _changed(before.params["regenerator"], after.params["regenerator"])


def test_joint_step_changes_classifier_and_regenerator():
  before, after = _one_step(classifier_train=True, trainable="")
  assert _changed(before.params["classifier"], after.params["classifier"])
  assert _changed(before.batch_stats, after.batch_stats)
  assert _changed(before.params["regenerator"], after.params["regenerator"])


def test_trainable_pattern_that_matches_nothing_is_a_config_error(tiny):
  _, variables, _ = tiny
  with pytest.raises(ConfigError, match="matches no parameter"):
    make_optimizer(sgd_config(), 10, 10, trainable="^generator/").init(variables["params"])


def test_graft_puts_a_trained_classifier_into_the_classifier_subtree(tiny):
  _, variables, _ = tiny
  params, stats = variables["params"], variables["batch_stats"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                     opt_state=(), ema_params=params, ema_batch_stats=stats)
  trained = jax.jit(TinyBN(num_classes=10).init)(jax.random.key(8), jnp.zeros((1, *SHAPE)))
  grafted = graft_variables(state, "classifier", trained)
  chex.assert_trees_all_equal(grafted.params["classifier"], trained["params"])
  chex.assert_trees_all_equal(grafted.ema_batch_stats["classifier"], trained["batch_stats"])
  chex.assert_trees_all_equal(grafted.params["regenerator"], state.params["regenerator"])
  other = jax.jit(TinyBN(num_classes=3).init)(jax.random.key(8), jnp.zeros((1, *SHAPE)))
  with pytest.raises(ConfigError, match="do not fit"):
    graft_variables(state, "classifier", other)


# ---- configuration and the restored pipeline ---------------------------------------------------

def test_pssr_defense_needs_the_pssr_model_and_valid_weights():
  with pytest.raises(ConfigError, match="model.name='pssr'"):
    create_defense("pssr").insert("small_cnn", 10)
  with pytest.raises(ConfigError, match="alpha"):
    create_defense("pssr", alpha=-1.0)
  with pytest.raises(ConfigError, match="rho"):
    create_model("pssr", num_classes=10, mean=(0.0,), std=(1.0,), rho=1.5)


def test_missing_classifier_workdir_is_a_one_line_config_error_when_training_starts(tmp_path):
  from jaxdef.configs.pssr_mnist import get_config
  from jaxdef.train.loop import train_and_evaluate
  c = get_config()
  validate(c, num_devices=1)  # loads and validates without the workdir
  with pytest.raises(ConfigError) as err:
    train_and_evaluate(c, str(tmp_path / "run"), progress=False)
  assert "train.init_from.classifier is empty" in str(err.value)
  assert "\n" not in str(err.value)


def test_restore_gives_the_pipeline_logits_classifier_of_transform(tmp_path):
  from jaxdef.configs.pssr_mnist import get_config
  c = get_config()
  c.model.kwargs.classifier_kwargs.width = 0.25
  c.model.kwargs.update(width=4, levels=1)
  meta = DataMeta(name="mnist5k", num_classes=10, image_shape=(28, 28, 1), mean=(0.1307,),
                  std=(0.3081,))
  model, _, _ = build(c, meta)
  tx = make_optimizer(c.train.optimizer, 10, 10, trainable=c.train.trainable)
  state = jax.jit(lambda: init_train_state(model, tx, jax.random.key(0),
                                           image_shape=meta.image_shape))()
  workdir = str(tmp_path / "run")
  ckpt.write_run_config(workdir, c, meta.to_dict())
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=1, async_save=False)
  ckpt.save(manager, 1, state)
  ckpt.finish(manager, 1)
  manager.close()

  _, logits_fn = jaxdef.restore(workdir)
  run = load_run(workdir)
  restored_model, variables = run.model, run.variables
  classify, transform = pssr.pssr_parts(restored_model, variables)

  @jax.jit
  def views(z):
    grad = jax.grad(lambda u: jnp.sum(classify(transform(u))))(z)
    return logits_fn(z), classify(transform(z)), classify(z), transform(z), grad

  x = jax.random.uniform(jax.random.key(3), (3, 28, 28, 1))
  pipeline, composed, bare, x_r, grad = views(x)
  chex.assert_trees_all_close(pipeline, composed, atol=1e-5)
  assert float(jnp.max(jnp.abs(bare - pipeline))) > 0  # the transform acts
  # BPDA's ingredients: the transform is deterministic and differentiable (mask constant).
  chex.assert_trees_all_equal(x_r, views(x)[3])
  assert float(jnp.sum(jnp.abs(grad))) > 0
