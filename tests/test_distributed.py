"""Multi-host data parallelism: 2 processes on localhost == 1 process with both shards;
a signal sent to one of them stops both after the same step."""

import json
import os
import signal
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest
from conftest import latest_checkpoint
from test_faults import wait_for_step

from jaxdef.config import validate
from jaxdef.errors import ConfigError
from jaxdef.train.distributed import StopDecision, cluster_detected, initialize, tally

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 32  # 512 examples in batches of 16: room to be interrupted
QUICK = ["--config", "configs/default.py", f"--config.data.max_train={16 * STEPS}",
         "--config.data.max_test=32", "--config.train.batch_size=16",
         "--config.train.epochs=1", "--config.attack.steps=2",
         "--config.attack.warmup_epochs=0.0", "--config.model.kwargs.width=0.25",
         "--config.train.eval_examples=32", "--config.train.eval_batch_size=16",
         "--config.train.eval_pgd_steps=2", "--config.train.log_every_steps=1",
         "--config.train.checkpoint_every_steps=10", "--config.train.stop_check_every_steps=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")}
  return env | {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _two_processes(workdir) -> list[subprocess.Popen]:
  """The same training command as processes 0 and 1 of a job on localhost."""
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "launch.py", *QUICK, "--workdir", str(workdir),
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _outputs(procs, timeout=600) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of each process, once all have ended (killed
  after ``timeout`` seconds: processes stuck in a collective never end)."""
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """An uninterrupted two-process run: its workdir and each process's output."""
  workdir = tmp_path_factory.mktemp("multi")
  runs = _outputs(_two_processes(workdir))
  for status, _, err in runs:
    assert status == 0, err[-3000:]
  return workdir, runs


def test_two_processes_train_like_one_process_with_both_shards(two_process_run, tmp_path):
  multi, runs = two_process_run
  assert "clean_acc" in runs[0][1] and "clean_acc" not in runs[1][1], "one summary, by process 0"
  ref = subprocess.run([sys.executable, "launch.py", *QUICK, "--workdir", str(tmp_path)],
                       cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  step_m, saved_m = latest_checkpoint(multi)
  step_s, saved_s = latest_checkpoint(tmp_path)
  assert step_m == step_s == STEPS
  chex.assert_trees_all_close(saved_m["params"], saved_s["params"], rtol=1e-5, atol=1e-6)
  summaries = [json.loads(l) for l in (multi / "metrics.jsonl").read_text().splitlines()
               if '"summary"' in l]
  assert len(summaries) == 1, "logs are written once"


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resumed_run_matches(
    two_process_run, tmp_path):
  procs = _two_processes(tmp_path)
  wait_for_step(tmp_path, 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # process 1 only, as a preempted host
  stopped = _outputs(procs, timeout=300)
  for status, _, err in stopped:
    assert status == 128 + signal.SIGTERM, err[-3000:]
  lines = [next(l for l in out.splitlines() if l.startswith("SIGTERM at step"))
           for _, out, _ in stopped]
  assert lines[0] == lines[1], "both processes stopped after the same step"
  step = int(lines[0].split()[3])
  assert 3 <= step < STEPS and "(sent to process 1 of 2)" in lines[0]
  assert latest_checkpoint(tmp_path)[0] == step, "saved there, together"
  for status, _, err in _outputs(_two_processes(tmp_path)):
    assert status == 0, err[-3000:]
  end, saved = latest_checkpoint(tmp_path)
  assert end == STEPS
  chex.assert_trees_all_close(saved["params"], latest_checkpoint(two_process_run[0])[1]["params"],
                              rtol=1e-6, atol=1e-7)


def test_the_stop_is_the_highest_signal_any_process_asked():
  owners = (0, 0, 1, 1)  # two devices per process
  assert tally(np.zeros(4, np.int32), owners) is None
  sigterm, sigint = int(signal.SIGTERM), int(signal.SIGINT)
  assert tally(np.array([0, 0, sigterm, sigterm]), owners) == StopDecision(sigterm, (1,))
  both = tally(np.array([sigint, sigint, sigterm, sigterm]), owners)
  assert both == StopDecision(sigterm, (0, 1))
  assert both.where(2) == " (sent to processes 0, 1 of 2)" and both.where(1) == ""


def test_a_stop_check_interval_below_one_is_a_config_error(tiny):
  with pytest.raises(ConfigError, match="stop_check_every_steps must be > 0"):
    validate(tiny(**{"train.stop_check_every_steps": 0}), 1)


def test_cluster_environment_detection():
  assert not cluster_detected({})
  assert not cluster_detected({"SLURM_NTASKS": "1"})
  assert cluster_detected({"SLURM_NTASKS": "4"})
  assert cluster_detected({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert initialize(env={}) is False


@pytest.mark.parametrize("args,words", [
    (("127.0.0.1:1", None, 0), "go together"),
    (("127.0.0.1:1", 2, 5), "process_id"),
])
def test_inconsistent_process_flags_are_config_errors(args, words):
  with pytest.raises(ConfigError, match=words):
    initialize(*args, env={})


def test_importing_jaxdef_and_loading_configs_leaves_the_backend_alone():
  """jax.distributed.initialize must run before any backend exists."""
  code = ("import jax._src.xla_bridge as xb, jaxdef, jaxdef.evaluate, jaxdef.train.loop\n"
          "import importlib.util as u\n"
          "s = u.spec_from_file_location('c', 'configs/default.py')\n"
          "m = u.module_from_spec(s); s.loader.exec_module(m); m.get_config()\n"
          "assert not xb._backends, 'a backend was initialised at import'\n")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(1),
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
