"""Multi-host data parallelism: 2 processes on localhost == 1 process with both shards;
a signal sent to one of them stops both after the same step. Both hold from
memory and from a streamed (imported) dataset, where each process reads its
own half of every batch."""

import json
import os
import signal
import socket
import subprocess
import sys

import chex
import numpy as np
import pytest
from conftest import latest_checkpoint, tiny_config
from test_faults import wait_for_step

from jaxdef.config import validate
from jaxdef.data.mixing import EXTRA, REAL
from jaxdef.data.streamed import LocalBatches
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


def _job(argv: list[str], devices: int = 1) -> list[subprocess.Popen]:
  """``python *argv`` as processes 0 and 1 of a job on localhost (with
  ``--coordinator``, ``--num_processes`` and ``--process_id`` appended)."""
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, *argv, f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"],
      cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]


def _two_processes(workdir, args=QUICK) -> list[subprocess.Popen]:
  """The same training command as processes 0 and 1 of a job on localhost."""
  return _job(["launch.py", *args, "--workdir", str(workdir)])


def _one_process(workdir, args=QUICK) -> None:
  """The training command as one process holding both processes' devices."""
  ref = subprocess.run([sys.executable, "launch.py", *args, "--workdir", str(workdir)],
                       cwd=ROOT, env=_env(2), capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]


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


def _assert_same_end(workdir, reference, steps: int, **tolerance) -> None:
  """Both runs ended at ``steps`` with the same parameters (up to ``tolerance``)."""
  (step, saved), (ref_step, ref) = latest_checkpoint(workdir), latest_checkpoint(reference)
  assert step == ref_step == steps
  chex.assert_trees_all_close(saved["params"], ref["params"], **tolerance)


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
  _one_process(tmp_path)
  _assert_same_end(multi, tmp_path, STEPS, rtol=1e-5, atol=1e-6)
  summaries = [json.loads(l) for l in (multi / "metrics.jsonl").read_text().splitlines()
               if '"summary"' in l]
  assert len(summaries) == 1, "logs are written once"


def _stop_one_and_resume(workdir, args, steps: int, reference, **tolerance) -> None:
  """SIGTERM to process 1 of a two-process run of ``args`` after step 3: both stop
  after the same step and save it; the same command resumes to ``steps``, whose
  parameters equal (up to ``tolerance``) those of the finished run in ``reference``."""
  procs = _two_processes(workdir, args)
  wait_for_step(workdir, 3, procs[0])
  procs[1].send_signal(signal.SIGTERM)  # process 1 only, as a preempted host
  stopped = _outputs(procs, timeout=300)
  for status, _, err in stopped:
    assert status == 128 + signal.SIGTERM, err[-3000:]
  lines = [next(l for l in out.splitlines() if l.startswith("SIGTERM at step"))
           for _, out, _ in stopped]
  assert lines[0] == lines[1], "both processes stopped after the same step"
  step = int(lines[0].split()[3])
  assert 3 <= step < steps and "(sent to process 1 of 2)" in lines[0]
  assert latest_checkpoint(workdir)[0] == step, "saved there, together"
  for status, _, err in _outputs(_two_processes(workdir, args)):
    assert status == 0, err[-3000:]
  _assert_same_end(workdir, reference, steps, **tolerance)


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_resumed_run_matches(
    two_process_run, tmp_path):
  _stop_one_and_resume(tmp_path, QUICK, STEPS, two_process_run[0], rtol=1e-6, atol=1e-7)


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


# Streamed data on two processes: an imported dataset (64 train + 32 test
# random 28x28 images) mixed half and half with an imported extra source, so
# 8 real + 8 extra rows per batch of 16 and 8 steps per epoch; 4 epochs.
STREAMED_STEPS = 32


@pytest.fixture(scope="module")
def streamed_fields(tmp_path_factory) -> dict:
  """Config overrides ('a.b': value) that train on two folders made by
  ``jaxdef data import`` from .npz files."""
  from jaxdef.data.importer import import_dataset
  root = tmp_path_factory.mktemp("imported")
  rng = np.random.default_rng(0)
  x, y = rng.integers(0, 256, (136, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 136)
  np.savez(root / "real.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:96],
           y_test=y[64:96])
  np.savez(root / "extra.npz", image=x[96:], label=y[96:])
  for name in ("real", "extra"):
    import_dataset(str(root / f"{name}.npz"), str(root / name), shards=2, progress=False)
  return {"data.name": "arrayrecord", "data.path": str(root / "real"), "data.max_train": 0,
          "data.max_test": 0, "data.extra.path": str(root / "extra"),
          "data.extra_fraction": 0.5, "data.workers": 0, "train.epochs": 4}


def _streamed_args(fields: dict) -> list[str]:
  """:data:`QUICK` with ``fields`` as command-line overrides."""
  kept = [a for a in QUICK if a.split("=")[0] not in {f"--config.{k}" for k in fields}]
  return kept + [f"--config.{k}={v}" for k, v in fields.items()]


def local_batches(fields: dict) -> LocalBatches:
  """This process's ``step -> (x, y)`` rows of the global batches of a run with
  ``fields``, on the training mesh (:meth:`TrainData.local_batches`)."""
  from jaxdef.data.streamed import train_data
  from jaxdef.train.mesh import batch_sharded, data_mesh
  config = tiny_config(**fields)
  data, _ = train_data(config.data, seed=config.seed, global_batch=config.train.batch_size)
  return data.local_batches(batch_sharded(data_mesh()))


# Process i of a two-process job writes its rows of steps 0 .. STEPS - 1 to OUT.i.npz
# (argv: OUT FIELDS-JSON STEPS, then the job's flags).
_DUMP_LOCAL_BATCHES = """
import json, sys
sys.path.insert(0, "tests")
from jaxdef.train.distributed import initialize
out, fields, steps, *job = sys.argv[1:]
flags = dict(a[2:].split("=", 1) for a in job)
initialize(flags["coordinator"], int(flags["num_processes"]), int(flags["process_id"]))
import numpy as np
from test_distributed import local_batches
local = local_batches(json.loads(fields))
batches = [local(step) for step in range(int(steps))]
np.savez(f"{out}.{flags['process_id']}.npz", rows=list(local.rows.values()),
         x=[x for x, _ in batches], y=[y for _, y in batches])
"""


def test_two_processes_read_disjoint_halves_of_the_streamed_global_batch(streamed_fields,
                                                                          tmp_path):
  steps = 17  # two epochs and a step
  out = str(tmp_path / "local")
  for status, _, err in _outputs(_job(["-c", _DUMP_LOCAL_BATCHES, out,
                                       json.dumps(streamed_fields), str(steps)]), timeout=300):
    assert status == 0, err[-3000:]
  parts = [np.load(f"{out}.{i}.npz") for i in range(2)]
  whole = local_batches(streamed_fields)  # one process: every row of the batch
  plan = whole.plan
  assert (plan.global_batch, plan.extra_per_batch, plan.steps_per_epoch) == (16, 8, 8)
  assert list(whole.rows.values()) == [(0, 16)]
  assert [p["rows"].tolist() for p in parts] == [[[0, 8]], [[8, 16]]], "disjoint halves"
  batches = [whole(step) for step in range(steps)]
  np.testing.assert_array_equal(np.concatenate([p["x"] for p in parts], axis=1),
                                np.stack([x for x, _ in batches]))
  np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts], axis=1),
                                np.stack([y for _, y in batches]))
  epoch = [set(), set()]
  for step in range(steps):
    source, index = plan.batch(step)
    halves = [(source[:8], index[:8]), (source[8:], index[8:])]
    assert [int((s == EXTRA).sum()) for s, _ in halves] == [4, 4], "the same mix per process"
    real = [set(i[s == REAL].tolist()) for s, i in halves]
    assert len(real[0]) == len(real[1]) == 4 and not real[0] & real[1]
    if step < plan.steps_per_epoch:
      for seen, mine in zip(epoch, real):
        assert not seen & mine
        seen |= mine
  assert not epoch[0] & epoch[1] and epoch[0] | epoch[1] == set(range(64)), \
      "over an epoch the processes read disjoint halves of the training split"


def test_a_streamed_two_process_run_stopped_on_one_host_resumes_to_the_one_process_result(
    streamed_fields, tmp_path):
  """Two processes reading their halves of the streamed batches, stopped by a
  SIGTERM to one of them and resumed, end where one process reading whole
  batches does, up to float summation order (two steps apart, the parameters
  differ by about a thousand times the tolerance)."""
  args = _streamed_args(streamed_fields)
  _one_process(tmp_path / "one", args)
  _stop_one_and_resume(tmp_path / "two", args, STREAMED_STEPS, tmp_path / "one",
                       rtol=1e-5, atol=1e-6)
