"""train.select: which checkpoint restore() and --mode eval use (issue 15)."""

import chex
import jax
import numpy as np
import pytest

from conftest import tiny_config
from jaxdef.config import validate
from jaxdef.data import load_dataset, split_validation
from jaxdef.errors import ConfigError
from jaxdef.restored import load_run
from jaxdef.train import loop


def _scripted_scores(monkeypatch, val_pgd, test_pgd):
  """The per-epoch evaluation returns these PGD accuracies by step (no attack
  runs), so the selection's choice is known in advance."""
  def fake(eval_step, state, dataset, *, num_examples, batch_size, sharding, step):
    held_out = len(dataset.y_test) == 16  # the validation split below has 16 examples
    acc = (val_pgd if held_out else test_pgd)[step]
    return {"clean_acc": min(acc + 0.1, 1.0), "pgd_acc": acc, "eval_examples": num_examples}
  monkeypatch.setattr(loop, "evaluate_state", fake)


def _config(select):
  # 64 - 16 held out = 48 training images, batch 16: 3 steps per epoch, 3 epochs;
  # an evaluation and a checkpoint at steps 3, 6 and 9.
  return tiny_config(**{"data.val_size": 16, "train.select": select, "train.epochs": 3,
                        "train.checkpoint_every_steps": 3, "train.max_to_keep": 5})


@pytest.mark.parametrize("select, expected", [("best_val", 3), ("best_test", 6), ("final", 9)])
def test_the_selected_checkpoint_is_restored(tmp_path, monkeypatch, select, expected):
  """Validation accuracy peaks at the first evaluation, test accuracy at the
  second: each rule restores its own step, with that step's weights."""
  _scripted_scores(monkeypatch, val_pgd={3: 0.5, 6: 0.4, 9: 0.3},
                   test_pgd={3: 0.1, 6: 0.4, 9: 0.2})
  summary = loop.train_and_evaluate(_config(select), str(tmp_path), progress=False)
  run = load_run(str(tmp_path))
  assert run.step == expected and run.select == select
  assert f"step {expected}" in run.describe()
  same_step = load_run(str(tmp_path), step=expected)
  chex.assert_trees_all_equal(run.variables, same_step.variables)
  if select != "final":
    assert summary["selected_step"] == expected
    newest = load_run(str(tmp_path), select="final")
    assert newest.step == 9
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(run.variables),
                                                        jax.tree.leaves(newest.variables)))


def test_held_out_examples_leave_the_training_split_and_never_touch_the_test_split():
  data = load_dataset(tiny_config().data)
  train, val = split_validation(data, 16)
  assert len(train.y_train) == len(data.y_train) - 16 and len(val.y_test) == 16
  np.testing.assert_array_equal(train.x_test, data.x_test)
  rows = {x.tobytes() for x in train.x_train}
  assert not any(x.tobytes() in rows for x in val.x_test)
  again_train, _ = split_validation(data, 16)
  np.testing.assert_array_equal(again_train.y_train, train.y_train)  # the same every run


@pytest.mark.parametrize("overrides, words", [
    ({"train.select": "best_val"}, "data.val_size"),
    ({"train.select": "best"}, "train.select"),
    ({"data.val_size": -1}, "data.val_size"),
])
def test_selection_mistakes_are_one_line_errors(overrides, words):
  with pytest.raises(ConfigError, match=words) as err:
    validate(tiny_config(**overrides), 1)
  assert "\n" not in str(err.value)


def _per_epoch_adversarials(config, monkeypatch, change_state=lambda state, run: state):
  """``(run, state, x_advs, result)``: the PGD examples the per-epoch evaluation
  of ``config`` makes on the whole test split (read out of the jitted step, one
  array per batch), the run and state that made them (a fresh state, passed
  through ``change_state``), and the evaluation's result."""
  from jaxdef import attacks
  from jaxdef.train.mesh import batch_sharded
  from jaxdef.train.state import init_train_state
  from jaxdef.train.step import INIT_STREAM, stream_key
  saved, original = [], attacks.pgd

  def recording_pgd(*args, **kwargs):
    x_adv = original(*args, **kwargs)
    jax.debug.callback(lambda a: saved.append(np.asarray(a)), x_adv)
    return x_adv
  monkeypatch.setattr(attacks, "pgd", recording_pgd)
  run = loop.prepare(config)
  _, eval_step = loop.jit_steps(config, model=run.model, objective=run.objective,
                                defense=run.defense, tx=run.tx, mesh=run.mesh,
                                steps_per_epoch=run.steps_per_epoch)
  state = change_state(init_train_state(run.model, run.tx, stream_key(config.seed, INIT_STREAM),
                                        image_shape=run.meta.image_shape), run)
  result = loop.evaluate_state(eval_step, state, run.dataset, num_examples=0,
                               batch_size=config.train.eval_batch_size,
                               sharding=batch_sharded(run.mesh), step=3)
  return run, state, saved, result


def test_the_selection_score_comes_from_the_configured_attack_on_the_whole_split(monkeypatch):
  """train.eval_pgd_*: the CAS authors' checkpoint attack (joint, from the clean
  image) is what the per-epoch evaluation, hence train.select, runs: its examples
  equal that attack's made outside, and differ from the default's (final logits
  only, random start)."""
  from jaxdef import attacks
  from jaxdef.data.augment import to_float
  from jaxdef.train.step import EVAL_STREAM, stream_key
  original = attacks.pgd
  config = tiny_config(**{"defense.name": "cas", "train.eval_pgd_joint": True,
                          "train.eval_pgd_random_start": False, "train.eval_pgd_steps": 3,
                          "train.eval_pgd_step_size": 0.05, "train.eval_examples": 0})
  validate(config, 1)
  run, state, saved, result = _per_epoch_adversarials(config, monkeypatch)
  n, batch = len(run.dataset.y_test), config.train.eval_batch_size
  assert result["eval_examples"] == n == 32 and len(saved) == n // batch
  variables = state.eval_variables(False)
  outputs = lambda z: run.model.apply(variables, z, train=False)
  logits = lambda z: outputs(z)["logits"]
  att = config.attack
  for i, x_adv in enumerate(saved):
    x = to_float(jax.numpy.asarray(run.dataset.x_test[i * batch:(i + 1) * batch]))
    y = jax.numpy.asarray(run.dataset.y_test[i * batch:(i + 1) * batch])
    key = stream_key(config.seed, EVAL_STREAM, 3, i)
    budget = dict(key=key, eps=att.eps, step_size=0.05, steps=3)
    joint = lambda z, k: run.defense.joint_attack_loss(outputs(z), y)
    want = original(logits, x, y, random_start=False, loss_fn=joint, **budget)
    np.testing.assert_allclose(x_adv, np.asarray(want), atol=1e-5)
    default = original(logits, x, y, **budget)  # CE on the final logits, random start
    assert not np.allclose(x_adv, np.asarray(default), atol=1e-3)


def test_a_joint_selection_attack_needs_a_model_with_heads():
  with pytest.raises(ConfigError, match="eval_pgd_joint.*'none' has none") as err:
    validate(tiny_config(**{"train.eval_pgd_joint": True}), 1)
  assert "\n" not in str(err.value)


def _selection_attack_config(**overrides):
  return tiny_config(**{"train.eval_pgd_steps": 3, "train.eval_pgd_step_size": 0.05,
                        "train.eval_examples": 0, **overrides})


def test_the_margin_selection_attack_is_the_capped_cw_margin_not_ce(monkeypatch):
  """train.eval_pgd_loss='margin': the per-epoch PGD ascends min(max_{k!=y} z_k - z_y, 0)
  (Wang et al. 2023's checkpoint attack): its examples equal PGD on that loss made
  outside, and differ from the CE attack's with the same start."""
  from jaxdef import attacks
  original = attacks.pgd
  config = _selection_attack_config(**{"train.eval_pgd_loss": "margin"})
  validate(config, 1)
  run, state, saved, _ = _per_epoch_adversarials(config, monkeypatch)
  variables = state.eval_variables(False)
  logits = lambda z: run.model.apply(variables, z, train=False)["logits"]
  batch, tc = config.train.eval_batch_size, config.train
  moved = 0
  for i, x_adv in enumerate(saved):
    x, y, key = _batch(run, config, i)
    budget = dict(key=key, eps=config.attack.eps, step_size=tc.eval_pgd_step_size,
                  steps=tc.eval_pgd_steps)
    margin = np.asarray(original(logits, x, y, loss="cw", kappa=0.0, **budget))
    ce = np.asarray(original(logits, x, y, **budget))
    np.testing.assert_allclose(x_adv, margin, atol=1e-5)
    moved += int(np.sum(np.abs(x_adv - ce).reshape(batch, -1).max(-1) > 1e-3))
  assert moved > 0, "the margin attack made the CE attack's examples"


def test_every_selection_loss_the_config_accepts_is_one_the_eval_step_attacks_with():
  """The names ``train.eval_pgd_loss`` accepts (config) and the attacks the
  eval step builds for them (step) are one set: a name added to one alone
  would pass validation and fail at the first evaluation, or never be
  reachable."""
  from jaxdef import config as config_module
  from jaxdef.train import step
  assert set(config_module.EVAL_PGD_LOSSES) == set(step.EVAL_PGD_LOSSES)


def _batch(run, config, i):
  from jaxdef.data.augment import to_float
  from jaxdef.train.step import EVAL_STREAM, stream_key
  n = config.train.eval_batch_size
  x = to_float(jax.numpy.asarray(run.dataset.x_test[i * n:(i + 1) * n]))
  y = jax.numpy.asarray(run.dataset.y_test[i * n:(i + 1) * n])
  return x, y, stream_key(config.seed, EVAL_STREAM, 3, i)


def test_with_an_ema_the_selection_scores_the_averaged_weights(monkeypatch):
  """train.ema_decay > 0: the per-epoch evaluation (hence train.select) attacks and
  scores the EMA weights and statistics, not the live ones."""
  from jaxdef import attacks
  from jaxdef.train.state import init_train_state
  from jaxdef.train.step import INIT_STREAM, stream_key
  original = attacks.pgd
  config = _selection_attack_config(**{"train.ema_decay": 0.99})

  def other_ema(state, run):  # an EMA unlike the live weights: another initialisation
    other = init_train_state(run.model, run.tx, stream_key(config.seed + 1, INIT_STREAM),
                             image_shape=run.meta.image_shape)
    return state.replace(ema_params=other.params, ema_batch_stats=other.batch_stats)
  run, state, saved, _ = _per_epoch_adversarials(config, monkeypatch, other_ema)
  tc = config.train
  for i, x_adv in enumerate(saved):
    x, y, key = _batch(run, config, i)
    budget = dict(key=key, eps=config.attack.eps, step_size=tc.eval_pgd_step_size,
                  steps=tc.eval_pgd_steps)
    made = {}
    for name, use_ema in (("ema", True), ("live", False)):
      variables = state.eval_variables(use_ema)
      logits = lambda z, v=variables: run.model.apply(v, z, train=False)["logits"]
      made[name] = np.asarray(original(logits, x, y, **budget))
    np.testing.assert_allclose(x_adv, made["ema"], atol=1e-5)
    assert not np.allclose(x_adv, made["live"], atol=1e-3)


def test_best_val_scores_the_held_out_training_images(tmp_path, monkeypatch):
  """train.select='best_val': every 'select' record is the evaluation of the
  data.val_size held-out training images (split_validation's), never the test split's."""
  import json
  calls = []
  original = loop.evaluate_state

  def recording(eval_step, state, dataset, **kwargs):
    result = original(eval_step, state, dataset, **kwargs)
    calls.append((kwargs["step"], np.array(dataset.x_test), result))
    return result
  monkeypatch.setattr(loop, "evaluate_state", recording)
  config = _config("best_val")
  config.train.eval_pgd_loss = "margin"
  loop.train_and_evaluate(config, str(tmp_path), progress=False)
  _, held_out = split_validation(load_dataset(config.data), 16)
  val_calls = {step: result for step, x, result in calls
               if x.shape == held_out.x_test.shape and np.array_equal(x, held_out.x_test)}
  assert sorted(val_calls) == [3, 6, 9]  # one evaluation of the held-out images per epoch
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  selected = [r for r in records if r.get("split") == "select"]
  assert selected and selected[0]["step"] == 3
  for r in selected:
    assert r["pgd_acc"] == val_calls[r["step"]]["pgd_acc"]
  best = max(val_calls.values(), key=lambda res: res["pgd_acc"])["pgd_acc"]
  assert selected[-1]["pgd_acc"] == best
