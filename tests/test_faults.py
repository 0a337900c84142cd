"""Faults: preemption, kills, corrupt checkpoints, divergence, a full disk, bad input.

Each test really does the thing (signals a training subprocess, garbles files
on disk, fills a small filesystem, makes the optimizer diverge) and asserts
the outcome: parameters equal to an uninterrupted run, the previous
checkpoint used, the exit code and the message.
"""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import latest_checkpoint

import jaxdef
from jaxdef import attacks
from jaxdef import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 60 steps of the quarter-width small CNN: long enough to be interrupted.
RUN = ["--config", "configs/default.py",
       "--config.data.max_train=960", "--config.data.max_test=32",
       "--config.train.batch_size=16", "--config.train.epochs=1",
       "--config.attack.steps=2", "--config.attack.warmup_epochs=0.0",
       "--config.model.kwargs.width=0.25", "--config.train.eval_examples=32",
       "--config.train.eval_batch_size=16", "--config.train.eval_pgd_steps=2",
       "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=10"]
TOTAL_STEPS = 60


def launch(workdir, *extra, wait=True, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *RUN, "--workdir", str(workdir),
         *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_step(workdir, step, proc, timeout=300):
  """Blocks until metrics.jsonl reports a training step >= ``step``."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(l).get("step", 0) for l in f if l.strip()]
      if steps and max(steps) >= step:
        return max(steps)
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} in {timeout}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every interrupted one must end equal to."""
  workdir = tmp_path_factory.mktemp("reference")
  run = launch(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  step, saved = latest_checkpoint(workdir)
  assert step == TOTAL_STEPS
  return workdir, saved


def assert_same_parameters(saved, reference_saved):
  chex.assert_trees_all_close(saved["params"], reference_saved["params"], rtol=1e-6, atol=1e-7)
  assert int(saved["step"]) == int(reference_saved["step"])


def test_sigterm_saves_at_the_current_step_and_the_resumed_run_matches(reference, tmp_path):
  proc = launch(tmp_path, wait=False)
  wait_for_step(tmp_path, 13, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  # Not 0: a scheduler must read "stopped", not "done" (issue 17): 128 + SIGTERM.
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  line = next(l for l in out.splitlines() if l.startswith("SIGTERM at step"))
  step = int(line.split()[3].rstrip(":"))
  assert 13 <= step < TOTAL_STEPS and "run the same command again to resume" in line
  assert os.path.isdir(tmp_path / "checkpoints" / str(step)), "saved at the current step"
  resumed = launch(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_parameters(latest_checkpoint(tmp_path)[1], reference[1])


@pytest.mark.parametrize("kill_after", [5, 24])
def test_sigkill_resumes_from_the_last_complete_checkpoint(reference, tmp_path, kill_after):
  proc = launch(tmp_path, wait=False)
  wait_for_step(tmp_path, kill_after, proc)
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  resumed = launch(tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert_same_parameters(latest_checkpoint(tmp_path)[1], reference[1])


def _garble(step_dir):
  """Overwrites every array data file of a checkpoint with junk of the same size."""
  data_files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
                if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep]
  assert data_files
  for path in data_files:
    size = os.path.getsize(path)
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).bytes(size))


def test_a_garbled_latest_checkpoint_is_set_aside_and_the_previous_used(reference, tmp_path):
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  _garble(workdir / "checkpoints" / str(TOTAL_STEPS))
  messages = []
  manager = ckpt.checkpoint_manager(str(workdir), max_to_keep=3, async_save=False, read_only=True)
  step, _ = ckpt.restore_latest(manager, reference[1], warn=messages.append)
  manager.close()
  assert step == 50, "the previous checkpoint is used"
  assert len(messages) == 1 and f"step {TOTAL_STEPS} is unusable" in messages[0]
  moved = [d for d in os.listdir(workdir / "corrupt_checkpoints")]
  assert len(moved) == 1 and moved[0].startswith(f"{TOTAL_STEPS}-"), "moved aside, not deleted"
  # The launcher does the same on resume and then finishes the run again.
  shutil.rmtree(workdir / "corrupt_checkpoints")
  _garble(workdir / "checkpoints" / "50")
  run = launch(workdir)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "checkpoint at step 50 is unusable" in run.stdout
  assert_same_parameters(latest_checkpoint(workdir)[1], reference[1])


def test_a_truncated_checkpoint_is_detected(reference, tmp_path):
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  for d, _, files in os.walk(workdir / "checkpoints" / str(TOTAL_STEPS)):
    for f in files:
      if "manifest" in f or os.sep + "d" in d:
        with open(os.path.join(d, f), "r+b") as fh:
          fh.truncate(max(os.path.getsize(os.path.join(d, f)) // 3, 1))
  messages = []
  manager = ckpt.checkpoint_manager(str(workdir), max_to_keep=3, async_save=False, read_only=True)
  step, _ = ckpt.restore_latest(manager, reference[1], warn=messages.append)
  manager.close()
  assert step == 50 and len(messages) == 1


def test_resuming_with_a_different_model_is_refused_naming_the_field(reference, tmp_path):
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  run = launch(workdir, "--config.model.name=wide_resnet", "--config.model.kwargs.width=1")
  assert run.returncode == 2
  error = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "model.name='small_cnn'" in error[0] and "wide_resnet" in error[0]


def test_divergence_stops_with_the_step_and_never_writes_nan(tmp_path):
  run = launch(tmp_path, "--config.train.optimizer.lr=1e30",
               "--config.train.checkpoint_every_steps=1")
  assert run.returncode == 3, run.stderr[-3000:]
  error = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "non-finite loss or gradient at step" in error[0]
  assert "last good checkpoint: step" in error[0]
  manager = ckpt.checkpoint_manager(str(tmp_path), max_to_keep=3, async_save=False, read_only=True)
  steps = manager.all_steps()
  assert steps, "checkpoints before the divergence exist"
  for s in steps:
    assert ckpt.all_finite(manager.restore(s, args=ocp.args.StandardRestore()))
  manager.close()


def test_divergence_in_skip_mode_skips_batches_and_finishes(tmp_path):
  run = launch(tmp_path, "--config.train.optimizer.lr=1e30",
               "--config.train.on_nonfinite=skip")
  assert run.returncode == 0, run.stderr[-3000:]
  summary = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert summary["split"] == "summary" and summary["skipped_nonfinite_steps"] > 0
  step, saved = latest_checkpoint(tmp_path)
  assert step == TOTAL_STEPS and ckpt.all_finite(saved)


@pytest.fixture
def small_disk(tmp_path):
  """A real 1.5 MiB filesystem (tmpfs), so a save runs out of space."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mount)],
                        capture_output=True)
  if made.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}): "
                "the full-disk behaviour is untested on this machine")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_and_the_previous_checkpoint_stays_usable(small_disk):
  run = launch(small_disk, "--config.model.kwargs.width=0.5",
               "--config.train.max_to_keep=100")
  assert run.returncode == 3, (run.stdout[-2000:], run.stderr[-3000:])
  error = [l for l in run.stderr.splitlines() if l.startswith("error: ")]
  assert len(error) == 1 and "could not write the checkpoint at step" in error[0]
  assert "is still usable" in error[0]
  usable = int(error[0].split("the checkpoint at step ")[-1].split()[0])
  manager = ckpt.checkpoint_manager(str(small_disk), max_to_keep=100, async_save=False, read_only=True)
  saved = manager.restore(usable, args=ocp.args.StandardRestore())
  manager.close()
  assert int(saved["step"]) == usable and ckpt.all_finite(saved)


def test_public_api_rejects_bad_images_and_labels(reference):
  _, logits_fn = jaxdef.restore(str(reference[0]))
  x = jnp.full((2, 28, 28, 1), 0.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    logits_fn(x * 255)
  with pytest.raises(ValueError, match="NHWC"):
    logits_fn(jnp.zeros((2, 28, 28)))
  with pytest.raises(ValueError, match="floats"):
    logits_fn(jnp.zeros((2, 28, 28, 1), jnp.uint8))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
    attacks.pgd(logits_fn, x, jnp.array([0, 10]), key=jax.random.key(0), eps=0.3,
                step_size=0.1, steps=1)
  with pytest.raises(ValueError, match="labels must be integers"):
    attacks.pgd(logits_fn, x, jnp.array([0.0, 1.0]), key=jax.random.key(0), eps=0.3,
                step_size=0.1, steps=1)
  with pytest.raises(jaxdef.ConfigError, match="eps"):
    attacks.pgd(logits_fn, x, jnp.array([0, 1]), key=jax.random.key(0), eps=0.0,
                step_size=0.1, steps=1)


def test_ctrl_c_during_eval_writes_partial_results_and_exits_130(reference, tmp_path):
  import shutil
  from jaxdef.evaluate.report import latest_results
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  proc = launch(workdir, "--mode", "eval", "--config.eval.attacks=clean,pgd400,pgd500",
                "--config.eval.num_examples=32", "--config.eval.batch_size=1",
                "--config.eval.masking_checks=False",
                wait=False)
  for line in proc.stdout:                  # the suite starts after this line
    if line.startswith("results go to"):
      folder = line.split("results go to", 1)[1].strip()
      break
  time.sleep(3.0)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "Segmentation" not in err, err[-3000:]
  assert "evaluation stopped by SIGINT: partial results written" in err
  saved = json.load(open(os.path.join(folder, "results.json")))
  assert saved["partial"]["stopped_by"] == "SIGINT"
  assert "pgd500" in saved["partial"]["not_run"]
  assert "PARTIAL: stopped by SIGINT" in open(os.path.join(folder, "results.md")).read()
  index = [json.loads(l) for l in open(workdir / "eval" / "index.jsonl")]
  assert index[-1]["partial"] is True
  assert latest_results(str(workdir)) is None   # a partial evaluation is never the latest
