"""FSR (Kim et al. 2023): Gumbel-sigmoid separation, recalibration, losses, training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdef
from jaxdef.attacks.losses import cross_entropy
from jaxdef.defenses import create_defense
from jaxdef.defenses.fsr import (FeatureSeparationRecalibration, fsr_joint_attack_loss,
                                 fsr_training_loss, gumbel_sigmoid_mask, highest_wrong_class)
from jaxdef.train.loop import train_and_evaluate

F = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
MODULE = FeatureSeparationRecalibration(num_classes=5, hidden=8)
VARIABLES = MODULE.init(jax.random.key(0), F, train=False)


def _apply(train, gumbel_key=None):
  """(output, aux, sown intermediates) of the FSR module on F."""
  rngs = {} if gumbel_key is None else {"gumbel": gumbel_key}
  (out, aux), state = MODULE.apply(VARIABLES, F, train=train, rngs=rngs,
                                   mutable=["intermediates", "batch_stats"])
  parts = {name: values[0] for name, values in state["intermediates"].items()}
  return out, aux, parts


def test_fsr_eval_mask_is_deterministic_sigmoid_of_scores_over_tau():
  out1, _, parts1 = _apply(train=False)
  out2, _, parts2 = _apply(train=False)
  chex.assert_trees_all_equal(out1, out2)
  chex.assert_trees_all_equal(parts1["mask"], parts2["mask"])
  scores = jnp.array([-1.0, 0.0, 0.05, 1.0])
  mask, complement = gumbel_sigmoid_mask(scores, 0.1)
  chex.assert_trees_all_close(mask, jax.nn.sigmoid(scores / 0.1))
  chex.assert_trees_all_close(mask + complement, jnp.ones_like(scores), atol=1e-6)


def test_non_robust_part_keeps_its_precision_in_bfloat16():
  """Where the mask is near 1 (scores 0.6-1.5 at tau 0.1), ``1 - m`` taken in
  bfloat16 collapses to a few levels; the complement taken in float32 and then
  cast keeps bfloat16's relative precision (2^-8)."""
  scores = jnp.linspace(0.6, 1.5, 64)
  exact = jax.nn.sigmoid(-scores / 0.1)  # float32: 1 - m to 2^-24 relative
  mask, complement = gumbel_sigmoid_mask(scores, 0.1)
  relative = jnp.abs(complement.astype(jnp.bfloat16).astype(jnp.float32) - exact) / exact
  assert float(jnp.max(relative)) < 2.0 ** -8
  naive = 1 - mask.astype(jnp.bfloat16)  # what the module computed before
  assert float(jnp.mean(naive == 0)) > 0.5  # most of the non-robust part was erased


def test_fsr_training_mask_is_stochastic_in_the_gumbel_key():
  _, _, a = _apply(train=True, gumbel_key=jax.random.key(1))
  _, _, b = _apply(train=True, gumbel_key=jax.random.key(2))
  _, _, a_again = _apply(train=True, gumbel_key=jax.random.key(1))
  assert not np.allclose(a["mask"], b["mask"])
  chex.assert_trees_all_equal(a["mask"], a_again["mask"])
  assert float(jnp.min(a["mask"])) >= 0.0 and float(jnp.max(a["mask"])) <= 1.0


@pytest.mark.parametrize("train", [False, True])
def test_robust_and_non_robust_parts_add_up_to_the_features(train):
  out, _, parts = _apply(train, jax.random.key(3) if train else None)
  chex.assert_trees_all_close(parts["robust"] + parts["non_robust"], F, atol=1e-6)
  chex.assert_trees_all_close(parts["robust"], F * parts["mask"], atol=1e-6)
  chex.assert_trees_all_close(out, parts["robust"] + parts["recalibrated"], atol=1e-6)
  chex.assert_shape(out, F.shape)


def test_fsr_aux_has_logits_for_the_three_parts():
  _, aux, _ = _apply(train=False)
  assert set(aux) == {"robust", "non_robust", "recalibrated"}
  for logits in aux.values():
    chex.assert_shape(logits, (2, 5))


def test_fsr_rejects_flattened_features():
  with pytest.raises(ValueError, match="feature map"):
    MODULE.init(jax.random.key(0), jnp.zeros((2, 7)), train=False)


def test_highest_wrong_class_is_the_wrong_prediction_or_the_runner_up():
  logits = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
  chex.assert_trees_all_equal(highest_wrong_class(logits, jnp.array([0, 0])), jnp.array([2, 1]))


def _aux(k):
  heads = jax.random.normal(k, (3, 4, 5))
  return dict(zip(("robust", "non_robust", "recalibrated"), heads))


FINAL = jnp.array([[0.0, 3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0, 0.0],
                   [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 4.0, 0.0, 0.0]])
Y = jnp.array([1, 3, 0, 2])
Y_WRONG = jnp.array([2, 0, 4, 0])
AUX = _aux(jax.random.key(5))
OUT = {"logits": FINAL, "aux": {"stage4": AUX}}


def test_fsr_loss_is_separation_plus_recalibration_ce():
  expected = (0.5 * (cross_entropy(AUX["robust"], Y) + cross_entropy(AUX["non_robust"], Y_WRONG))
              + 2.0 * cross_entropy(AUX["recalibrated"], Y))
  chex.assert_trees_all_close(fsr_training_loss(OUT, Y, lam_sep=0.5, lam_rec=2.0), expected,
                              rtol=1e-6)
  defense = create_defense("fsr")
  default = (cross_entropy(AUX["robust"], Y) + cross_entropy(AUX["non_robust"], Y_WRONG)
             + cross_entropy(AUX["recalibrated"], Y))
  chex.assert_trees_all_close(defense.loss_term(None, OUT, Y), default, rtol=1e-6)


def test_fsr_training_attack_uses_final_logits_only_and_joint_attack_adds_heads():
  defense = create_defense("fsr")
  chex.assert_trees_all_equal(defense.attack_term(None, OUT, Y), jnp.zeros(4))
  expected = (cross_entropy(FINAL, Y) + cross_entropy(AUX["robust"], Y)
              + cross_entropy(AUX["recalibrated"], Y))
  chex.assert_trees_all_close(fsr_joint_attack_loss(OUT, Y), expected, rtol=1e-6)


def test_fsr_defaults_match_the_paper():
  defense = create_defense("fsr")
  assert defense.hyperparameters == dict(lam_sep=1.0, lam_rec=1.0, tau=0.1, hidden=64,
                                         points=None)
  assert defense.rng_collections == ("gumbel",) and not defense.needs_clean_pass


def test_fsr_loss_trains_both_the_separation_and_the_recalibration_net():
  y = jnp.array([0, 4])
  final_logits = jnp.array([[0.0, 1.0, 0.0, 0.0, 2.0], [1.0, 0.0, 3.0, 0.0, 0.0]])

  def loss(params):
    (_, aux), _ = MODULE.apply({**VARIABLES, "params": params}, F, train=True,
                               rngs={"gumbel": jax.random.key(2)}, mutable=["batch_stats"])
    return jnp.mean(fsr_training_loss({"logits": final_logits, "aux": {"p": aux}}, y))

  grads = jax.jit(jax.grad(loss))(VARIABLES["params"])
  for net in ("separation", "recalibration", "head"):
    norm = float(optax.tree.norm(grads[net]))
    assert norm > 0.0 and np.isfinite(norm), net


def test_trades_with_fsr_trains_checkpoints_and_restores_deterministically(tmp_path, tiny):
  config = tiny(**{"objective.name": "trades", "defense.name": "fsr"})
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary["objective"] == "trades" and summary["defense"] == "fsr"
  assert 0.0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1.0
  config, logits_fn = jaxdef.restore(str(tmp_path))
  x = jnp.linspace(0.0, 1.0, 3 * 28 * 28).reshape(3, 28, 28, 1)
  logits = jax.jit(logits_fn)(x)
  chex.assert_shape(logits, (3, 10))
  chex.assert_trees_all_equal(logits, jax.jit(logits_fn)(x))
