"""The trainer: sharded == single device, checkpoints, resumption, restore()."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import latest_checkpoint

import jaxdef
from jaxdef import attacks
from jaxdef.objectives import create_objective
from jaxdef import checkpoint as ckpt
from jaxdef.train.loop import train_and_evaluate
from jaxdef.train.metrics import MetricsLog

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_one_step(tmp_path, devices: int) -> dict:
  out = tmp_path / f"step_{devices}.npz"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, os.path.join(HERE, "helpers", "one_step.py"), str(out)],
                 check=True, env=env, capture_output=True, timeout=600)
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


def test_training_step_on_8_devices_equals_1_device(tmp_path):
  one = _run_one_step(tmp_path, 1)
  eight = _run_one_step(tmp_path, 8)
  assert int(one.pop("devices")) == 1 and int(eight.pop("devices")) == 8
  assert one.keys() == eight.keys()
  # Same math, different reduction order across devices: float32 noise only.
  chex.assert_trees_all_close(one, eight, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One uninterrupted tiny run (8 steps, checkpoints at 3, 6 and 8)."""
  from conftest import tiny_config
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(**{"train.ema_decay": 0.9})
  summary = train_and_evaluate(config, str(workdir), progress=False)
  return config, workdir, summary


def test_run_writes_summary_metrics_and_final_checkpoint(trained):
  config, workdir, summary = trained
  assert summary["steps"] == 8
  assert 0.0 <= summary["pgd_acc"] <= summary["clean_acc"] <= 1.0
  records = MetricsLog(str(workdir)).read()
  splits = [r["split"] for r in records]
  assert splits.count("test") == 2  # one evaluation per epoch
  assert "summary" in splits and "train" in splits
  step, saved = latest_checkpoint(workdir)
  assert step == 8 and int(saved["step"]) == 8


def test_checkpoint_save_restore_round_trip(tmp_path):
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7),
           "nested": {"b": jnp.ones((4,), jnp.bfloat16)}}
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=2)
  for s in (1, 2, 3):
    ckpt.save(manager, s, jax.tree.map(lambda v: v * s, state))
  manager.wait_until_finished()
  step, restored = ckpt.restore_latest(manager, state)
  manager.close()
  assert step == 3 and manager.all_steps() == [2, 3]
  chex.assert_trees_all_equal(restored, jax.tree.map(lambda v: v * 3, state))


def test_killed_and_resumed_run_ends_with_the_uninterrupted_parameters(trained, tmp_path):
  config, reference_dir, _ = trained
  # Dies after step 5: the checkpoint at step 3 survives, steps 4-5 are lost.
  partial = train_and_evaluate(config, str(tmp_path), stop_after_steps=5, progress=False)
  assert partial == {"stopped_at": 5}
  assert latest_checkpoint(tmp_path)[0] == 3
  train_and_evaluate(config, str(tmp_path), progress=False)
  step_a, ref = latest_checkpoint(reference_dir)
  step_b, resumed = latest_checkpoint(tmp_path)
  assert step_a == step_b == 8
  chex.assert_trees_all_close(resumed["params"], ref["params"], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(resumed["ema_params"], ref["ema_params"], rtol=1e-6, atol=1e-7)


def test_restore_returns_a_jittable_differentiable_logits_fn(trained):
  config, workdir, _ = trained
  restored_config, logits_fn = jaxdef.restore(str(workdir))
  assert restored_config.model.name == config.model.name
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  logits = jax.jit(logits_fn)(x)
  chex.assert_shape(logits, (4, 10))
  chex.assert_tree_all_finite(logits)
  y = jnp.argmax(logits, -1)
  grad = jax.grad(lambda z: attacks.cross_entropy(logits_fn(z), y).sum())(x)
  chex.assert_shape(grad, x.shape)
  assert float(jnp.abs(grad).sum()) > 0
  # EMA weights by default, raw weights on request: they differ after training.
  _, raw_fn = jaxdef.restore(str(workdir), use_ema=False)
  assert not np.allclose(np.asarray(raw_fn(x)), np.asarray(logits))


def test_restore_rejects_wrong_image_shapes(trained):
  _, logits_fn = jaxdef.restore(str(trained[1]))
  with pytest.raises(ValueError, match="NHWC"):
    logits_fn(jnp.zeros((2, 32, 32, 3)))


def test_restore_of_an_empty_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(jaxdef.ConfigError, match="config.json"):
    jaxdef.restore(str(tmp_path))


def test_at_objective_is_cross_entropy_on_adversarial_logits():
  at = create_objective("at")
  logits_adv = jnp.array([[2.0, 0.0], [0.0, 1.0]])
  y = jnp.array([0, 0])
  expected = -jax.nn.log_softmax(logits_adv)[jnp.arange(2), y]
  chex.assert_trees_all_close(at.outer_loss(None, {"logits": logits_adv}, y), expected)
  chex.assert_trees_all_close(at.inner_loss(logits_adv, logits_adv * 0, y), expected)


def test_bfloat16_batchnorm_model_with_batch_stat_attack_trains(tmp_path):
  """bf16 compute keeps float32 parameters; BatchNorm statistics move in training."""
  from conftest import tiny_config
  config = tiny_config(**{"model.name": "wide_resnet", "model.kwargs": {"depth": 10, "width": 1},
                          "train.dtype": "bfloat16", "attack.bn": "train_no_update",
                          "data.max_train": 32, "train.epochs": 1})
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary["steps"] == 2
  _, saved = latest_checkpoint(tmp_path)
  for leaf in jax.tree.leaves(saved["params"]):
    assert leaf.dtype == jnp.float32
  means = [v for p, v in jax.tree_util.tree_leaves_with_path(saved["batch_stats"])
           if "mean" in jax.tree_util.keystr(p)]
  assert means and any(float(jnp.abs(m).max()) > 0 for m in means)


def test_opening_checkpoints_read_only_logs_no_orbax_notices(tmp_path, caplog):
  """restore() and --mode eval open the run read-only: Orbax's notices about it
  (one per manager, four per restore before) stay out of the user's terminal."""
  import logging
  import jax.numpy as jnp
  from jaxdef import checkpoint as ckpt
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=1, async_save=False)
  ckpt.save(manager, 1, {"w": jnp.ones(3)})
  ckpt.finish(manager, 1, close=True)
  with caplog.at_level(logging.WARNING, logger="absl"):
    reader = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=1, read_only=True)
    assert reader.latest_step() == 1
    reader.close()
  assert not [r for r in caplog.records if "read only" in r.getMessage()
              or "read_only" in r.getMessage()], [r.getMessage() for r in caplog.records]
  # The filter is gone afterwards: other absl warnings still reach the log.
  assert not logging.getLogger("absl").filters


def test_a_finished_run_refuses_a_config_that_trains_otherwise_and_names_the_fields(trained):
  from jaxdef.build import DataMeta
  from jaxdef.data import load_dataset
  from jaxdef.errors import ConfigError
  from conftest import tiny_config
  config, workdir, _ = trained
  meta = DataMeta.from_dataset(load_dataset(config.data)).to_dict()
  changed = tiny_config(**{"train.ema_decay": 0.9, "attack.eps": 0.2,
                           "train.optimizer.lr": 0.5})
  with pytest.raises(ConfigError) as err:
    ckpt.check_same_run(str(workdir), changed, meta)
  message = str(err.value)
  assert "\n" not in message and "another --workdir" in message
  assert "attack.eps (0.3 -> 0.2)" in message and "train.optimizer.lr" in message
  # Run-time fields and a longer run are allowed, and returned to be recorded.
  later = tiny_config(**{"train.ema_decay": 0.9, "train.epochs": config.train.epochs + 2,
                         "eval.num_examples": 7, "train.log_every_steps": 1})
  allowed = ckpt.check_same_run(str(workdir), later, meta)
  assert allowed == {"eval.num_examples": [config.eval.num_examples, 7],
                     "train.epochs": [config.train.epochs, config.train.epochs + 2],
                     "train.log_every_steps": [config.train.log_every_steps, 1]}
  shorter = tiny_config(**{"train.ema_decay": 0.9, "train.epochs": 1})
  with pytest.raises(ConfigError, match="train.epochs"):
    ckpt.check_same_run(str(workdir), shorter, meta)
  assert ckpt.config_hash(later) == ckpt.config_hash(config) != ckpt.config_hash(changed)


def test_an_extended_run_resumes_and_records_the_change(trained, tmp_path):
  import shutil
  from conftest import tiny_config
  config, workdir, summary = trained
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  longer = tiny_config(**{"train.ema_decay": 0.9, "train.epochs": config.train.epochs + 1})
  extended = train_and_evaluate(longer, str(run), progress=False)
  assert extended["steps"] > summary["steps"]
  records = MetricsLog(str(run)).read()
  resume = [r for r in records if r["split"] == "resume"]
  assert resume == [{"step": summary["steps"], "split": "resume",
                     "changed": {"train.epochs": [config.train.epochs,
                                                  config.train.epochs + 1]}}]
  assert ckpt.read_run_config(str(run))[0].train.epochs == config.train.epochs + 1


def test_training_writes_tensorboard_scalars_beside_metrics_jsonl(trained):
  _, workdir, summary = trained
  from conftest import read_scalars
  scalars = read_scalars(workdir / "tensorboard")
  assert {"train/loss", "train/adv_acc", "test/clean_acc", "test/pgd_acc"} <= set(scalars)
  records = MetricsLog(str(workdir)).read()
  logged = [(r["step"], r["loss"]) for r in records if r["split"] == "train" and "loss" in r]
  assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in logged]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in logged],
                             rtol=1e-6)
  assert scalars["test/pgd_acc"][-1] == (summary["steps"], pytest.approx(summary["pgd_acc"]))


def test_metrics_log_writes_strict_json_and_skips_missing_values(tmp_path):
  """A value not measured yet (NaN throughput) is null in metrics.jsonl (strict
  JSON readers refuse NaN) and is not sent to TensorBoard."""
  from conftest import read_scalars
  from jaxdef.train.metrics import MetricsLog
  log = MetricsLog(str(tmp_path))
  log.write({"step": 1, "split": "train", "images_per_s": float("nan"), "loss": np.float32(2.5)})
  log.close()
  line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
  record = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
  assert record["images_per_s"] is None and record["loss"] == 2.5
  scalars = read_scalars(tmp_path / "tensorboard")
  assert "train/loss" in scalars and "train/images_per_s" not in scalars
