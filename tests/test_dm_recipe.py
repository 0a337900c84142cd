"""CutMix with the attack aimed at the mixed labels, and the BatchNorm update rule.

Rebuffi et al. 2021 (deepmind-research adversarial_robustness/jax) and Wang
et al. 2023 (DM-Improves-AT) mix every batch with CutMix and attack the mixed
labels; the DeepMind code updates BatchNorm statistics only on the
adversarial pass, DM-Improves-AT on the clean and the adversarial one.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxdef.attacks.losses import cross_entropy, dominant_label, label_targets
from jaxdef.attacks.pgd import perturb
from jaxdef.config import base_config, validate
from jaxdef.data.cutmix import box_mask, cutmix, cutmix_batch, cutmix_box
from jaxdef.defenses.base import make_none
from jaxdef.errors import ConfigError
from jaxdef.objectives import create_objective
from jaxdef.objectives.base import Objective
from jaxdef.train.state import init_train_state
from jaxdef.train.step import AttackBudget, adversarial_examples, make_train_step

K = 5


class TinyBN(nn.Module):
  """Conv -> BatchNorm -> ReLU -> mean -> Dense: the smallest model with statistics."""
  num_classes: int = K

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
    h = jnp.mean(nn.relu(h), axis=(1, 2))
    return {"logits": nn.Dense(self.num_classes)(h)}


def batch(n=6, side=8, seed=0):
  images = jax.random.randint(jax.random.key(seed), (n, side, side, 1), 0, 256).astype(jnp.uint8)
  return images, jnp.arange(n, dtype=jnp.int32) % K


# ---- CutMix itself ---------------------------------------------------------------------


def test_the_box_area_is_the_weight_of_the_pasted_label():
  """Image i filled with the value i + 1: the share of its pixels that came
  from image perm[i] is exactly the weight of perm[i]'s label, for boxes
  clipped at the border and not; one rectangle per batch."""
  n, h, w = 6, 12, 10
  images = jnp.broadcast_to(jnp.arange(1.0, n + 1.0)[:, None, None, None], (n, h, w, 2))
  targets = jax.nn.one_hot(jnp.arange(n), n)
  mix = jax.jit(cutmix)
  draw_box = jax.jit(cutmix_box, static_argnums=(1, 2))
  weights = []
  for seed in range(12):
    mixed, mixed_targets = mix(jax.random.key(seed), images, targets)
    box, lam = draw_box(jax.random.split(jax.random.key(seed))[0], h, w)
    mask = np.asarray(box_mask(box, h, w))[..., 0]
    chex.assert_shape(mixed, (n, h, w, 2))
    chex.assert_trees_all_close(jnp.sum(mixed_targets, -1), jnp.ones(n), atol=1e-6)
    for i in range(n):
      values = np.asarray(mixed[i, ..., 0])
      from_other = values != i + 1
      if from_other.any():  # paired with another image
        other = int(values[from_other][0]) - 1
        assert np.array_equal(from_other, mask)  # the same box in every image
        np.testing.assert_allclose(float(mixed_targets[i, other]), from_other.mean(), atol=1e-6)
        np.testing.assert_allclose(float(mixed_targets[i, i]), 1.0 - from_other.mean(),
                                   atol=1e-6)
        np.testing.assert_allclose(float(lam), 1.0 - mask.mean(), atol=1e-6)
        weights.append(float(lam))
  assert len(set(np.round(weights, 6))) > 3  # the box's size varies with the draw


def test_cutmix_smooths_each_label_before_mixing():
  images, labels = batch()
  key = jax.random.key(3)
  smoothing = np.linspace(0.0, 0.5, 6).astype(np.float32)
  _, targets = cutmix_batch(key, images.astype(jnp.float32), labels, K, smoothing)
  _, expected = cutmix(key, images.astype(jnp.float32), label_targets(labels, K, smoothing))
  chex.assert_trees_all_close(targets, expected)
  smoothed = label_targets(labels, K, smoothing)
  chex.assert_trees_all_close(jnp.max(smoothed, -1), 1 - smoothing + smoothing / K)


# ---- cross-entropy against target distributions ----------------------------------------


def test_integer_labels_take_the_same_path_as_before():
  logits = jax.random.normal(jax.random.key(0), (7, K)) * 3
  labels = jnp.arange(7) % K
  chex.assert_trees_all_equal(cross_entropy(logits, labels),
                              optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  # One target distribution per idea: one-hot and smoothed targets give the same CE.
  chex.assert_trees_all_close(cross_entropy(logits, label_targets(labels, K)),
                              cross_entropy(logits, labels), atol=1e-5)
  s = jnp.linspace(0.0, 0.3, 7)
  chex.assert_trees_all_close(cross_entropy(logits, label_targets(labels, K, s)),
                              cross_entropy(logits, labels, s), atol=1e-5)
  chex.assert_trees_all_equal(dominant_label(labels), labels)


@pytest.mark.parametrize("name", ["at", "trades"])
def test_the_attack_loss_is_aimed_at_the_mixed_target(name):
  """The inner loss's gradient in the logits is softmax - y for the mixed
  target y (the CE against it; for TRADES KL(y || f(x_adv)) up to a constant),
  unlike the unmixed loss; the attack then differs from the unmixed one."""
  objective = create_objective(name)
  logits_adv = jax.random.normal(jax.random.key(1), (4, K))
  logits_clean = jax.random.normal(jax.random.key(2), (4, K))
  labels = jnp.array([0, 1, 2, 3])
  mixed = 0.6 * jax.nn.one_hot(labels, K) + 0.4 * jax.nn.one_hot((labels + 2) % K, K)
  grad = lambda y: jax.grad(lambda z: jnp.sum(objective.inner_loss(z, logits_clean, y)))(
      logits_adv)
  chex.assert_trees_all_close(grad(mixed), jax.nn.softmax(logits_adv) - mixed, atol=1e-6)
  assert not np.allclose(grad(mixed), grad(labels), atol=1e-3)

  x = jax.random.uniform(jax.random.key(3), (4, 6, 6, 1))
  weights = jax.random.normal(jax.random.key(4), (36, K))
  forward = lambda z: {"logits": z.reshape(4, -1) @ weights}
  budget = AttackBudget(eps=0.1, step_size=0.02, steps=3, init="uniform")
  attack = jax.jit(lambda y: adversarial_examples(forward, x, y, jax.random.key(5),
                                                  objective=objective, defense=make_none(),
                                                  budget=budget, step=jnp.int32(0)))
  towards_mixed = perturb(lambda z: cross_entropy(forward(z)["logits"], mixed), x,
                          key=jax.random.key(5), eps=0.1, step_size=0.02, steps=3)
  chex.assert_trees_all_close(attack(mixed), towards_mixed, atol=1e-6)
  assert not np.allclose(attack(mixed), attack(labels))


# ---- the train step --------------------------------------------------------------------


def tiny_step(objective, **options):
  model = TinyBN()
  tx = optax.sgd(0.1)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(8, 8, 1))
  budget = AttackBudget(eps=0.1, step_size=0.1, steps=1, init="uniform",
                        bn=options.pop("attack_bn", "eval"))
  step = jax.jit(make_train_step(model=model, tx=tx, objective=objective, defense=make_none(),
                                 budget=budget, augment="crop_flip", ema_decay=0.0, seed=0,
                                 **options))
  return state, step


@pytest.mark.parametrize("name", ["trades", "at"])
def test_a_cutmix_step_is_finite_and_deterministic(name):
  images, labels = batch()
  state, step = tiny_step(create_objective(name), cutmix=True,
                          label_smoothing=np.float32(0.1))
  new, metrics = step(state, images, labels)
  assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  assert 0.0 <= float(metrics["adv_acc"]) <= 1.0
  again, metrics_again = step(state, images, labels)  # a resumed step repeats it exactly
  chex.assert_trees_all_equal((new.params, metrics), (again.params, metrics_again))
  if name == "at":  # the batch was mixed: without CutMix the loss differs
    plain_state, plain = tiny_step(create_objective(name), label_smoothing=np.float32(0.1))
    _, plain_metrics = plain(plain_state, images, labels)
    assert float(plain_metrics["loss"]) != float(metrics["loss"])


@pytest.mark.parametrize("objective, defense, message", [
    ("mart", "none", "objective 'mart' needs class indices"),
    ("at", "cas", "defense 'cas' reads class indices"),
])
def test_cutmix_with_what_needs_class_indices_is_a_one_line_error(objective, defense, message):
  config = base_config()
  config.data.cutmix = True
  config.objective.name = objective
  config.defense.name = defense
  with pytest.raises(ConfigError, match=message) as err:
    validate(config, 1)
  assert "\n" not in str(err.value)


def test_bad_bn_update_and_cutmix_fields_are_one_line_errors():
  config = base_config()
  config.train = ml_collections.ConfigDict({**config.train.to_dict(), "bn_update": "clean"})
  with pytest.raises(ConfigError, match="train.bn_update"):
    validate(config, 1)
  config = base_config()
  config.data = ml_collections.ConfigDict({**config.data.to_dict(), "cutmix": "yes"})
  with pytest.raises(ConfigError, match="data.cutmix must be True or False"):
    validate(config, 1)
  config = base_config()
  config.data.cutmix = True
  config.objective.name = "trades"
  config.train.bn_update = "adversarial"
  validate(config, 1)


# ---- which passes update BatchNorm statistics ------------------------------------------


def probe(needs_clean_pass):
  """AT's losses; with ``needs_clean_pass`` the step also runs the clean pass
  (its output weighted by 0), so the attack and the adversarial pass are AT's."""
  at = create_objective("at")
  outer = lambda out_clean, out_adv, y, smoothing=None: (
      at.outer_loss(out_clean, out_adv, y, smoothing)
      + (0.0 if out_clean is None else 0.0 * jnp.sum(out_clean["logits"], -1)))
  return Objective("probe", at.inner_loss, outer, "uniform", needs_clean_pass)


def test_adversarial_bn_update_keeps_only_the_adversarial_pass_statistics():
  """With the DeepMind code's attack side (batch statistics, not updated)."""
  attack_bn = "train_no_update"
  images, labels = batch(seed=4)
  state, adv_only = tiny_step(probe(False), attack_bn=attack_bn)
  expected, _ = adv_only(state, images, labels)
  state, with_clean = tiny_step(probe(True), attack_bn=attack_bn, bn_update="adversarial")
  got, _ = with_clean(state, images, labels)
  chex.assert_trees_all_close(got.batch_stats, expected.batch_stats, atol=1e-7)
  state, both = tiny_step(probe(True), attack_bn=attack_bn, bn_update="both")
  updated_twice, _ = both(state, images, labels)
  assert not np.allclose(updated_twice.batch_stats["BatchNorm_0"]["mean"],
                         expected.batch_stats["BatchNorm_0"]["mean"])
