"""CAS (Bai et al. 2021): label-chosen channel masks, placements, losses, training."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdef
from jaxdef.attacks.losses import cross_entropy, cw_loss
from jaxdef.defenses import create_defense
from jaxdef.defenses.cas import (ChannelSuppression, cas_joint_attack_loss, cas_training_loss,
                                 default_points)
from jaxdef.errors import ConfigError
from jaxdef.models.registry import create_model
from jaxdef import checkpoint as ckpt
from jaxdef.train.loop import train_and_evaluate

# GAP of A is (1, 2, 3); with KERNEL's columns the head scores (1, 2, 18): it
# predicts class 2 whatever the true label.
A = jnp.ones((2, 2, 2, 3)) * jnp.array([1.0, 2.0, 3.0])
KERNEL = jnp.array([[1.0, 0.0, 3.0], [0.0, 1.0, 3.0], [0.0, 0.0, 3.0]])
VARIABLES = {"params": {"kernel": KERNEL, "bias": jnp.zeros(3)}}
LABELS = jnp.array([0, 1])


def _cas(**kwargs):
  return ChannelSuppression(num_classes=3).apply(VARIABLES, A, **kwargs)


def test_cas_mask_is_the_true_class_column_in_training():
  out, logits = _cas(train=True, labels=LABELS)
  chex.assert_trees_all_close(out[0], A[0] * KERNEL[:, 0])
  chex.assert_trees_all_close(out[1], A[1] * KERNEL[:, 1])
  chex.assert_trees_all_close(logits, jnp.array([[1.0, 2.0, 18.0]] * 2))


def test_cas_mask_is_the_predicted_class_column_in_eval():
  for kwargs in ({"train": False, "labels": LABELS}, {"train": False},
                 {"train": True}):  # no labels: nothing but the prediction to use
    out, _ = _cas(**kwargs)
    chex.assert_trees_all_close(out, A * KERNEL[:, 2])


def _model(model_name, defense, **model_kwargs):
  insert = defense.insert(model_name, 10)
  return create_model(model_name, num_classes=10, mean=(0.0,), std=(1.0,), insert=insert,
                      **model_kwargs)


@pytest.mark.parametrize("model_name,model_kwargs,points", [
    ("small_cnn", {"width": 0.25}, ("conv4",)),
    ("resnet18", {}, ("stage4.0", "stage4.1")),
    ("wide_resnet", {"depth": 16, "width": 1}, ("stage3.0", "final")),
    ("vgg16", {}, ("block5.conv0", "block5.conv1", "block5.conv2")),
])
def test_every_cas_head_outputs_class_logits(model_name, model_kwargs, points):
  defense = create_defense("cas", depth=model_kwargs.get("depth", 34))
  model = _model(model_name, defense, **model_kwargs)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert tuple(sorted(out["aux"])) == tuple(sorted(points))
  for logits in out["aux"].values():
    chex.assert_shape(logits, (2, 10))
  names = {f"cas_{p.replace('.', '_')}" for p in points}
  assert names <= set(variables["params"])


def test_wide_resnet_placement_is_the_input_of_the_last_block_and_the_final_features():
  assert default_points("wrn34_10") == ("stage3.3", "final")
  assert default_points("wide_resnet", depth=34) == ("stage3.3", "final")
  assert default_points("wide_resnet", depth=28) == ("stage3.2", "final")
  assert default_points("wide_resnet", depth=10) == ("stage2", "final")


def test_unknown_model_or_host_objective_is_a_config_error():
  with pytest.raises(ConfigError, match="points"):
    default_points("resnet50")
  with pytest.raises(ConfigError, match="valid: at, mart, trades"):
    create_defense("cas", objective="madry")


def _out(logits, *heads):
  return {"logits": logits, "aux": {f"p{i}": h for i, h in enumerate(heads)}}


KEYS = jax.random.split(jax.random.key(0), 5)
Y = jnp.array([1, 3, 0, 2])
S_CLEAN, S_ADV = (jax.random.normal(k, (2, 4, 5)) for k in KEYS[:2])
FINAL = jax.random.normal(KEYS[2], (4, 5))
OUT_CLEAN, OUT_ADV = _out(FINAL, *S_CLEAN), _out(FINAL, *S_ADV)


def test_cas_loss_with_at_is_beta_times_mean_aux_ce():
  expected = 2.0 * (cross_entropy(S_ADV[0], Y) + cross_entropy(S_ADV[1], Y)) / 2
  chex.assert_trees_all_close(cas_training_loss(None, OUT_ADV, Y), expected, rtol=1e-6)
  defense = create_defense("cas")
  chex.assert_trees_all_close(defense.loss_term(None, OUT_ADV, Y), expected, rtol=1e-6)
  assert not defense.needs_clean_pass


# Hand-written references (numpy, float64) for the authors' formulas.
def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(z, y):
  return -_np_log_softmax(z)[np.arange(len(y)), y]


def _np_kl(z_ref, z):
  lp, lq = _np_log_softmax(z_ref), _np_log_softmax(z)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_mart_bce(z, y):
  p = np.exp(_np_log_softmax(z))
  wrong = np.where(np.eye(p.shape[-1], dtype=bool)[y], 0.0, p).max(-1)
  return _np_ce(z, y) - np.log(1.0001 - wrong + 1e-12)


# Two heads, two examples, three classes: small enough to check by hand.
H_CLEAN = (np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]))
H_ADV = (np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), np.array([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]]))
F_CLEAN = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
Y2 = np.array([0, 2])
OUT2_CLEAN = _out(jnp.asarray(F_CLEAN), *map(jnp.asarray, H_CLEAN))
OUT2_ADV = _out(jnp.asarray(F_CLEAN), *map(jnp.asarray, H_ADV))


def test_reference_softmax_values_are_the_hand_computed_ones():
  # CE of [2, 0, -1] at class 0: log(1 + e^-2 + e^-3) = 0.1698...
  assert _np_ce(H_CLEAN[0][:1], np.array([0]))[0] == pytest.approx(0.16984, abs=1e-5)
  assert _np_kl(np.zeros((1, 3)), np.zeros((1, 3)))[0] == 0.0


def test_cas_loss_with_trades_is_the_authors_clean_ce_and_double_weighted_kl():
  """TRADES + CAS (authors' code): beta_cas * mean_s CE(s(x), y) on the CLEAN
  input + beta * beta_cas * mean_s KL(s(x) || s(x_adv))."""
  defense = create_defense("cas", objective="trades", objective_beta=4.0)
  ce_clean = (_np_ce(H_CLEAN[0], Y2) + _np_ce(H_CLEAN[1], Y2)) / 2
  kl = (_np_kl(H_CLEAN[0], H_ADV[0]) + _np_kl(H_CLEAN[1], H_ADV[1])) / 2
  expected = 2.0 * ce_clean + 4.0 * 2.0 * kl
  np.testing.assert_allclose(defense.loss_term(OUT2_CLEAN, OUT2_ADV, jnp.asarray(Y2)),
                             expected, rtol=1e-5)
  assert defense.needs_clean_pass


def test_cas_training_attack_with_trades_ascends_the_heads_kl():
  defense = create_defense("cas", objective="trades", objective_beta=4.0)
  kl = (_np_kl(H_CLEAN[0], H_ADV[0]) + _np_kl(H_CLEAN[1], H_ADV[1])) / 2
  np.testing.assert_allclose(defense.attack_term(OUT2_CLEAN, OUT2_ADV, jnp.asarray(Y2)),
                             2.0 * kl, rtol=1e-5)


def test_cas_loss_with_mart_is_the_heads_boosted_ce_plus_their_weighted_kl():
  """MART + CAS (authors' code): beta_cas * mean_s BCE(s(x_adv), y) + beta *
  beta_cas * mean_s KL(s(x) || s(x_adv)) * (1 - p_y(x)), p_y from the final
  clean logits."""
  defense = create_defense("cas", objective="mart", beta=1.5, objective_beta=5.0)
  bce = (_np_mart_bce(H_ADV[0], Y2) + _np_mart_bce(H_ADV[1], Y2)) / 2
  kl = (_np_kl(H_CLEAN[0], H_ADV[0]) + _np_kl(H_CLEAN[1], H_ADV[1])) / 2
  p_true = np.exp(_np_log_softmax(F_CLEAN))[np.arange(2), Y2]
  expected = 1.5 * bce + 5.0 * 1.5 * kl * (1 - p_true)
  np.testing.assert_allclose(defense.loss_term(OUT2_CLEAN, OUT2_ADV, jnp.asarray(Y2)),
                             expected, rtol=1e-5)
  assert defense.needs_clean_pass
  # MART's training attack stays PGD on the joint CE.
  ce = (_np_ce(H_ADV[0], Y2) + _np_ce(H_ADV[1], Y2)) / 2
  np.testing.assert_allclose(defense.attack_term(OUT2_CLEAN, OUT2_ADV, jnp.asarray(Y2)),
                             1.5 * ce, rtol=1e-5)


def test_cas_training_attack_and_joint_attack_ascend_the_heads_ce():
  defense = create_defense("cas")
  aux_ce = (cross_entropy(S_ADV[0], Y) + cross_entropy(S_ADV[1], Y)) / 2
  chex.assert_trees_all_close(defense.attack_term(OUT_CLEAN, OUT_ADV, Y), 2.0 * aux_ce,
                              rtol=1e-6)
  chex.assert_trees_all_close(cas_joint_attack_loss(OUT_ADV, Y),
                              cross_entropy(FINAL, Y) + 2.0 * aux_ce, rtol=1e-6)


def test_joint_cw_takes_the_margin_on_the_final_logits_and_every_head():
  def margin(z, y):  # numpy C&W margin with kappa 50: max_{k!=y} z_k - z_y, capped at 50
    z, y = np.asarray(z, np.float64), np.asarray(y)
    true = z[np.arange(len(y)), y]
    other = np.where(np.eye(z.shape[1], dtype=bool)[y], -np.inf, z).max(1)
    return np.minimum(other - true, 50.0)
  expected = margin(FINAL, Y) + 2.0 * (margin(S_ADV[0], Y) + margin(S_ADV[1], Y)) / 2
  got = cas_joint_attack_loss(OUT_ADV, Y, loss=functools.partial(cw_loss, kappa=50.0))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cas_defaults_match_the_paper():
  assert create_defense("cas").hyperparameters["beta"] == 2.0
  assert default_points("resnet18") == ("stage4.0", "stage4.1")


def test_defense_configs_tie_cas_to_the_objective():
  from jaxdef.configs.cifar10_resnet18_defenses import get_config
  config = get_config("trades_cas")
  config.objective.kwargs.beta = 4.0
  assert config.defense.kwargs.to_dict()["objective_beta"] == 4.0
  config.objective.name = "mart"
  assert config.defense.kwargs.to_dict()["objective"] == "mart"
  from jaxdef.configs.cifar10_wrn34_defenses import get_config as wrn_config
  config = wrn_config("at_cas")
  config.model.kwargs.depth = 28
  assert config.defense.kwargs.to_dict()["depth"] == 28


def test_at_with_cas_trains_checkpoints_and_restores(tmp_path, tiny):
  summary = train_and_evaluate(tiny(**{"defense.name": "cas"}), str(tmp_path), progress=False)
  assert 0.0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1.0
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=3, async_save=False)
  assert manager.latest_step() == summary["steps"]
  manager.close()
  config, logits_fn = jaxdef.restore(str(tmp_path))
  assert config.defense.name == "cas"
  x = jnp.linspace(0.0, 1.0, 3 * 28 * 28).reshape(3, 28, 28, 1)
  logits = jax.jit(logits_fn)(x)
  chex.assert_shape(logits, (3, 10))
  assert np.isfinite(np.asarray(logits)).all()
  # --mode eval attacks the heads too: the restored target carries CAS's joint loss.
  from jaxdef import evaluate
  eval_config = evaluate.default_eval_config(0.3, "linf")
  eval_config.update(num_examples=8, batch_size=8, attacks="clean,pgd2",
                     joint_attacks="joint-pgd2")
  from jaxdef.restored import load_run
  main, adaptive = evaluate.run_targets(load_run(str(tmp_path)), config, eval_config, data=None)
  assert adaptive is None and main.joint_loss is not None
  out = main.outputs(x)
  np.testing.assert_allclose(main.joint_loss(out, jnp.arange(3)),
                             cas_joint_attack_loss(out, jnp.arange(3), beta=2.0), rtol=1e-6)
  r = evaluate.run_suite(main, np.asarray(x[:1].repeat(8, 0)), np.zeros(8, np.int32),
                         suite_config=eval_config, key=jax.random.key(0), progress=False)
  assert set(r["attacks"]) == {"pgd2", "joint-pgd2"}
  assert r["attacks"]["joint-pgd2"] <= r["clean"]


def test_cas_host_objective_set_by_hand_must_match_the_objective(tiny):
  from jaxdef.config import validate
  # A hand-written config without the shipped configs' field references.
  config = tiny(**{"objective.name": "trades", "objective.kwargs": {"beta": 6.0},
                   "defense.name": "cas", "defense.kwargs": {"objective": "trades",
                                                             "objective_beta": 6.0}})
  validate(config, num_devices=1)
  config.defense.kwargs.objective = "at"
  with pytest.raises(ConfigError, match="defense.kwargs.objective='at' but objective.name='trades'"):
    validate(config, num_devices=1)
  config.defense.kwargs.objective = "trades"
  config.defense.kwargs.objective_beta = 1.0
  with pytest.raises(ConfigError, match="objective_beta"):
    validate(config, num_devices=1)
