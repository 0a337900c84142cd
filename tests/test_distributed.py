"""Multi-host data parallelism: 2 processes on localhost == 1 process with both shards."""

import json
import os
import socket
import subprocess
import sys

import chex
import pytest
from conftest import latest_checkpoint

from jaxdef.errors import ConfigError
from jaxdef.train.distributed import cluster_detected, initialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config", "configs/default.py", "--config.data.max_train=64",
         "--config.data.max_test=32", "--config.train.batch_size=16",
         "--config.train.epochs=1", "--config.attack.steps=2",
         "--config.attack.warmup_epochs=0.0", "--config.model.kwargs.width=0.25",
         "--config.train.eval_examples=32", "--config.train.eval_batch_size=16",
         "--config.train.eval_pgd_steps=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")}
  return env | {"JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def test_two_processes_train_like_one_process_with_both_shards(tmp_path):
  port = _free_port()
  multi, single = tmp_path / "multi", tmp_path / "single"
  procs = [subprocess.Popen(
      [sys.executable, "launch.py", *QUICK, "--workdir", str(multi),
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "clean_acc" in outs[0][0] and "clean_acc" not in outs[1][0], "one summary, by process 0"
  ref = subprocess.run([sys.executable, "launch.py", *QUICK, "--workdir", str(single)],
                       cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  step_m, saved_m = latest_checkpoint(multi)
  step_s, saved_s = latest_checkpoint(single)
  assert step_m == step_s == 4
  chex.assert_trees_all_close(saved_m["params"], saved_s["params"], rtol=1e-5, atol=1e-6)
  summaries = [json.loads(l) for l in (multi / "metrics.jsonl").read_text().splitlines()
               if '"summary"' in l]
  assert len(summaries) == 1, "logs are written once"


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
