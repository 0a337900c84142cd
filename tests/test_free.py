"""Free adversarial training, Free-m (Shafahi et al. 2019): the replay, the carried
perturbation, the step's update count and backward passes, the checkpointed
perturbation and the refusals."""

import dataclasses
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import latest_checkpoint, primitive_count, tiny_config

from jaxdef import checkpoint as ckpt
from jaxdef.config import base_config, validate
from jaxdef.defenses.base import make_none
from jaxdef.errors import ConfigError
from jaxdef.models import create_model
from jaxdef.objectives import create_objective
from jaxdef.train.free import replay, total_batches
from jaxdef.train.loop import train_and_evaluate
from jaxdef.train.state import TrainState, init_train_state
from jaxdef.train.step import AttackBudget, make_train_step

EPS = 0.1
SHAPE = (2, 3, 3, 1)


def linear_toy():
  """A 'model' with one scalar weight a: loss(a, z) = a * sum(w * z). Its input
  gradient is a * w, so with a > 0 every ascent step moves along sign(w)."""
  w = jnp.asarray(np.where(np.arange(np.prod(SHAPE)) % 3 == 0, -1.0, 1.0)
                  .reshape(SHAPE).astype(np.float32))
  loss_fn = lambda params, z: (params["a"] * jnp.sum(w * z), None)
  return loss_fn, {"a": jnp.float32(2.0)}, np.asarray(w)


def expected_delta(delta, x, w, step):
  """One Free ascent step written out: clip to the eps-ball, then to [-x, 1 - x]."""
  return np.clip(np.clip(delta + step * np.sign(w), -EPS, EPS), -x, 1.0 - x)


def test_the_perturbation_a_batch_ends_with_starts_the_next_batch():
  loss_fn, params, w = linear_toy()
  x1 = np.linspace(0.0, 1.0, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
  x2 = x1[::-1].copy()
  delta = jnp.zeros(SHAPE, jnp.float32)
  # Batch 1, two replays, then batch 2: each replay starts where the last one left delta.
  reference = np.zeros(SHAPE, np.float32)
  for x in (x1, x1, x2):
    (loss, _), grads, x_adv, delta = replay(loss_fn, params, jnp.asarray(x), delta, eps=EPS,
                                            step_size=0.06, norm="linf")
    seen = np.clip(x + reference, 0.0, 1.0)
    # The one pass is at the carried perturbation: loss and the weight's gradient there.
    chex.assert_trees_all_close(x_adv, jnp.asarray(seen), atol=1e-6)
    chex.assert_trees_all_close(loss, 2.0 * np.sum(w * seen), rtol=1e-5)
    chex.assert_trees_all_close(grads["a"], np.sum(w * seen), rtol=1e-5)
    reference = expected_delta(reference, x, w, 0.06)
    chex.assert_trees_all_close(delta, jnp.asarray(reference), atol=1e-6)
  # Batch 2 started from batch 1's delta: it differs from a fresh start's step.
  assert not np.allclose(reference, expected_delta(np.zeros(SHAPE), x2, w, 0.06))
  assert float(jnp.max(jnp.abs(delta))) <= EPS + 1e-6
  assert float(jnp.min(x2 + delta)) >= -1e-6 and float(jnp.max(x2 + delta)) <= 1.0 + 1e-6


def test_a_smaller_last_batch_moves_only_its_rows_of_the_perturbation():
  loss_fn, params, w = linear_toy()
  delta = jnp.full((4, *SHAPE[1:]), 0.05, jnp.float32)
  x = np.full(SHAPE, 0.5, np.float32)
  _, _, _, new = replay(loss_fn, params, jnp.asarray(x), delta, eps=EPS, step_size=0.06,
                        norm="linf")
  chex.assert_shape(new, delta.shape)
  chex.assert_trees_all_close(new[:2], jnp.asarray(expected_delta(0.05, x, w, 0.06)),
                              atol=1e-6)
  chex.assert_trees_all_equal(new[2:], delta[2:])


def tiny_step(replays, **budget):
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.25,), width=0.25)
  tx = optax.sgd(optax.linear_schedule(0.1, 0.0, 100), momentum=0.9)
  budget = AttackBudget(**{"eps": EPS, "step_size": EPS, "steps": 1, **budget})
  step = make_train_step(model=model, tx=tx, objective=create_objective("at"),
                         defense=make_none(), budget=budget, augment="none", ema_decay=0.0,
                         seed=0, free_replays=replays)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(28, 28, 1),
                           free_batch=4 if replays > 1 else 0)
  return model, step, state


def batch(seed):
  images = jax.random.randint(jax.random.key(seed), (4, 28, 28, 1), 0, 256).astype(jnp.uint8)
  return images, jnp.arange(4, dtype=jnp.int32)


def test_train_step_makes_m_updates_per_batch_and_keeps_the_perturbation_in_range():
  _, step, state = tiny_step(3)
  step = jax.jit(step)
  for k in range(2):
    state, metrics = step(state, *batch(k + 1))
  assert int(state.step) == 2  # the data position: batches
  counts = [int(c) for p, c in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if getattr(p[-1], "name", None) == "count"]
  assert counts == [6]  # the schedule: one count per replay
  assert bool(metrics["finite"])
  chex.assert_shape(state.free_delta, (4, 28, 28, 1))
  assert float(jnp.max(jnp.abs(state.free_delta))) <= EPS + 1e-6
  assert float(jnp.abs(state.free_delta).sum()) > 0
  last = batch(2)[0].astype(jnp.float32) / 255.0
  assert float(jnp.min(last + state.free_delta)) >= -1e-6
  assert float(jnp.max(last + state.free_delta)) <= 1.0 + 1e-6


def _convolutions(jaxpr) -> int:
  """conv_general_dilated equations in ``jaxpr`` and every sub-jaxpr (a scan
  body counted once)."""
  return primitive_count(jaxpr, "conv_general_dilated")


def test_a_replay_is_one_forward_and_one_backward_pass():
  """The convolutions of a Free step are those of one forward pass (L) and its
  backward pass to the weights and the input (2L): 3L, where an FGSM-RS step
  (a clean pass, an attack's forward-backward, the update's) has 6L."""
  model, free_step, state = tiny_step(2)
  images, labels = batch(1)
  forward = jax.make_jaxpr(lambda v, z: model.apply(v, z, train=False))(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.zeros((4, 28, 28, 1))).jaxpr
  per_pass = _convolutions(forward)
  assert per_pass >= 2
  assert _convolutions(jax.make_jaxpr(free_step)(state, images, labels).jaxpr) == 3 * per_pass
  _, fgsm_step, plain = tiny_step(1, step_size=1.25 * EPS, init="uniform")
  assert _convolutions(jax.make_jaxpr(fgsm_step)(plain, images, labels).jaxpr) > 3 * per_pass


def test_free_epochs_count_updates_so_the_data_are_read_epochs_over_m_times():
  assert total_batches(205, 390, 8) == 9993  # the paper's 80,000 updates at batch 128
  assert total_batches(2, 4, 1) == 8 and total_batches(2, 4, 2) == 4


def test_free_run_resumed_after_a_crash_ends_as_the_uninterrupted_one(tmp_path):
  """A tiny Free-2 run: 2 epochs of updates = 1 pass over the data = 4 batches,
  checkpoints at 3 and 4. Its copy without the last checkpoint (a crash after
  batch 3's save) resumes from batch 3 and ends with the uninterrupted run's
  weights and perturbation."""
  config = tiny_config(**{"attack.free_replays": 2, "attack.steps": 1,
                          "attack.step_size": 0.3, "train.eval_pgd_steps": 1})
  whole = train_and_evaluate(config, str(tmp_path / "a"), progress=False)
  assert whole["steps"] == 4 and whole["free_replays"] == 2 and whole["data_passes"] == 1.0
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / ckpt.CHECKPOINTS / "4")
  step, saved = latest_checkpoint(tmp_path / "b")
  assert step == 3 and saved["free_delta"].shape == (16, 28, 28, 1)
  train_and_evaluate(config, str(tmp_path / "b"), progress=False)
  (_, ref), (_, resumed) = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
  chex.assert_trees_all_close(resumed["params"], ref["params"], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(resumed["free_delta"], ref["free_delta"], atol=1e-7)
  assert not np.array_equal(saved["free_delta"], ref["free_delta"])  # batch 4 moved it


def test_a_checkpoint_written_without_the_perturbation_field_still_restores(tmp_path):
  """Checkpoints saved before TrainState had ``free_delta`` hold no such entry."""
  state = TrainState(step=jnp.int32(5), params={"w": jnp.arange(3.0)}, batch_stats={},
                     opt_state={"m": jnp.ones(3)}, ema_params={"w": jnp.zeros(3)},
                     ema_batch_stats={})
  old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
         if f.name != "free_delta"}
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=3)
  ckpt.save(manager, 5, old)
  manager.wait_until_finished()
  target = jax.tree.map(jnp.zeros_like, state)
  step, restored = ckpt.restore_latest(manager, target)
  assert step == 5 and restored.free_delta is None
  chex.assert_trees_all_equal(restored.params, state.params)
  # With Free on, the missing perturbation starts as a fresh run's.
  fresh = target.replace(free_delta=jnp.zeros((2, 2), jnp.float32))
  _, restored = ckpt.restore_latest(manager, fresh)
  chex.assert_trees_all_equal(restored.free_delta, fresh.free_delta)
  chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
  manager.close()


@pytest.mark.parametrize("saved_free, target_free", [(False, False), (True, True),
                                                     (False, True), (True, False)])
def test_a_train_state_restores_with_free_on_or_off_either_side(tmp_path, saved_free,
                                                                  target_free):
  """A checkpoint of a run with or without Free restores into a state with or
  without it: the perturbation comes back when both hold one, a fresh one is
  kept when only the target does, and none is read into a Free-off state."""
  fields = dict(step=jnp.int32(5), params={"w": jnp.arange(3.0)}, batch_stats={},
                opt_state={"m": jnp.ones(3)}, ema_params={"w": jnp.zeros(3)},
                ema_batch_stats={})
  delta = {"free_delta": jnp.full((2, 2), 0.5)}
  saved = TrainState(**fields, **(delta if saved_free else {}))
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=2)
  ckpt.save(manager, 1, saved)
  manager.wait_until_finished()
  target = jax.tree.map(jnp.zeros_like, TrainState(**fields, **(delta if target_free else {})))
  step, restored = ckpt.restore_latest(manager, target, warn=pytest.fail)
  manager.close()
  assert step == 1
  chex.assert_trees_all_equal(restored.params, saved.params)
  if not target_free:
    assert restored.free_delta is None
  else:
    chex.assert_trees_all_equal(restored.free_delta,
                                saved.free_delta if saved_free else target.free_delta)


def free_config(**fields):
  config = base_config()
  config.attack.update(free_replays=8, steps=1, step_size=8 / 255)
  for key, value in fields.items():
    section, name = key.split(".", 1)
    config[section][name] = value
  return config


@pytest.mark.parametrize("fields, words", [
    ({"objective.name": "trades"}, "objective.name='trades' do not go together"),
    ({"objective.name": "mart"}, "objective.name='mart' do not go together"),
    ({"defense.name": "aad"}, "defense.name='aad' do not go together: the defense replaces"),
    ({"defense.name": "pssr"}, "defense.name='pssr' do not go together"),
    ({"attack.steps": 10}, "attack.steps=10: set attack.steps=1"),
    ({"attack.project": False}, "attack.project=False"),
    ({"attack.free_replays": -1}, "attack.free_replays must be an integer >= 0"),
])
def test_free_with_what_it_cannot_compose_with_is_a_one_line_refusal(fields, words):
  with pytest.raises(ConfigError, match=words) as error:
    validate(free_config(**fields), 1)
  assert "\n" not in str(error.value)
  if "free_replays" not in words:
    assert "attack.free_replays=8 (Free-m)" in str(error.value)


def test_free_composes_with_defenses_that_only_add_loss_terms_on_the_adversarial_pass():
  validate(free_config(), 1)
  validate(free_config(**{"defense.name": "fsr"}), 1)
  config = free_config(**{"defense.name": "cas"})
  config.defense.kwargs = ml_collections.ConfigDict({"objective": "at"})
  validate(config, 1)
  # Free off: any objective, any number of steps.
  validate(free_config(**{"attack.free_replays": 1, "objective.name": "trades",
                          "attack.steps": 10}), 1)


def test_fast_recipes_carry_their_scripts_settings():
  from jaxdef.configs.fast import get_config
  fgsm, noise, free = (get_config(v) for v in ("cifar10_preact18_fgsm_rs",
                                               "cifar10_preact18_n_fgsm",
                                               "cifar10_preact18_free"))
  for config in (fgsm, noise, free):
    validate(config, 1)
    assert config.model.name == "preact_resnet18" and config.train.batch_size == 128
  assert fgsm.attack.step_size == pytest.approx(10 / 255) and fgsm.attack.init == "uniform"
  assert fgsm.train.epochs == 15 and fgsm.train.optimizer.schedule == "triangle"
  assert fgsm.train.optimizer.warmup_epochs == 7.5 and fgsm.train.optimizer.lr == 0.2
  assert noise.attack.init_scale == 2.0 and not noise.attack.project
  assert noise.attack.step_size == pytest.approx(8 / 255) and noise.train.epochs == 30
  assert free.attack.free_replays == 8 and free.attack.steps == 1
  # 205 epochs of updates at 390 batches per epoch: about the paper's 80,000 updates.
  assert total_batches(free.train.epochs, 50_000 // 128, 8) * 8 == pytest.approx(80_000,
                                                                                   rel=1e-3)


def test_show_config_summary_says_a_free_step_makes_m_updates():
  from jaxdef.train.plan import Memory
  from jaxdef.train.summary import RunSize, summary_lines
  memory = Memory(arguments=1, temporaries=1, outputs=1, aliased=0, code=1)
  size = RunSize(parameters=10, forward_flops=1e6, train_step_flops=3e6, batch_size=128,
                 memory_bytes=1e6, small_memory=(memory, memory), platform="cpu",
                 free_replays=8)
  lines = summary_lines(size)
  assert lines[0] == "parameters: 10"
  assert "Free-8: a train step replays its batch 8 times" in lines[-1]
  assert "24 MFLOP per example per batch" in lines[-1]
  assert "train.epochs / 8" in lines[-1]
  assert not any("Free" in line for line in summary_lines(
      dataclasses.replace(size, free_replays=1)))
