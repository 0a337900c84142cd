"""The GPU kit's parts (issue 14), run by ``benchmarks/gpu/run.sh PART``.

  python -m benchmarks.gpu.kit PART [--smoke] [--out DIR] [--budget_s S] [--data NPZ]

PART is ``throughput``, ``streamed``, ``autoattack``, ``subset_table`` or
``all`` (the four in that order while the budget allows). Every figure is appended to
``OUT/kit.json`` (one list of records) and ``OUT/kit.md`` (Markdown tables)
as soon as it is measured, so a part cut short by the time limit still
returns what it had. ``--smoke`` runs the same code paths at tiny sizes on
whatever backend is there (the CPU test of the kit, ``tests/test_gpu_kit.py``).

* ``throughput``: ``python -m benchmarks.bench`` cases (ResNet-18 PGD-10 AT at
  batch 128 and 512 in bfloat16 and float32 beside the PyTorch twin, the
  PGD-20 eval step, CAS and FSR on ResNet-18, WRN-34-10 in bfloat16), then a
  ``jax.profiler`` trace of one ResNet-18 train step (``OUT/trace.tgz``).
* ``streamed``: the ResNet-18 PGD-10 train step (bfloat16, batch 512, 32 px)
  fed by the streamed source (:class:`jaxdef.data.streamed.TrainData` over a
  generated folder of 50,000 raw ArrayRecord records, read in the training
  process and by 4 Grain worker processes, batches prefetched onto the
  device) against the same step on one synthetic batch already on the device
  (timed before and after each; their mean).
* ``autoattack``: a ResNet-18 briefly PGD-trained by ``launch.py`` on the
  CIFAR-10 subset; AutoAttack standard (L-inf 8/255) on its first 1000 test
  images by jaxdef (one jit) and by pyautoattack on the PyTorch twin holding
  the same weights, both float32, in the same process.
* ``subset_table``: ResNet-18 on the CIFAR-10 subset with AT, AT+CAS, AT+FSR
  and TRADES (``configs/cifar10_resnet18_defenses.py`` with the short recipe
  of :data:`SUBSET_RECIPE`), trained and then evaluated by ``launch.py --mode
  eval`` (clean, PGD-20, joint PGD-20 for the aux-head defenses, AutoAttack)
  on all 1017 test images. The four runs share the GPU as four processes
  (their train times are therefore not standalone figures). A run whose
  workdir already holds results is not repeated, and one stopped by the
  budget resumes from its checkpoint when the part is run again on the same
  machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("throughput", "streamed", "autoattack", "subset_table")
EPS = 8 / 255

# name -> (model, defense, batch, dtype, kinds, compare, model_kwargs), most wanted first.
THROUGHPUT_CASES = {
    "r18_b512_bf16": ("resnet18", "none", 512, "bfloat16", "train,eval", "torch", {}),
    "r18_b128_bf16": ("resnet18", "none", 128, "bfloat16", "train", "torch", {}),
    "r18_b128_f32": ("resnet18", "none", 128, "float32", "train", "torch", {}),
    "r18_b512_f32": ("resnet18", "none", 512, "float32", "train", "torch", {}),
    "r18_defenses_bf16": ("resnet18", "cas,fsr", 128, "bfloat16", "train", "none", {}),
    "wrn34_b128_bf16": ("wide_resnet", "none", 128, "bfloat16", "train", "none",
                        {"depth": 34, "width": 10}),
}
TRACE_CASE = "r18_b128_bf16"  # the step the profiler traces ('trace' in --cases)
TRACE_RESERVE_S = 25  # kept for the profiler trace after the cases
SMOKE_CASES = {
    "small": ("small_cnn", "none", 8, "float32", "train,eval", "torch", {"width": 0.25}),
    "small_cas": ("small_cnn", "cas", 8, "bfloat16", "train", "none", {"width": 0.25}),
}
SMOKE_TRACE_CASE = "small_cas"

# name -> (variant of configs/cifar10_resnet18_defenses.py, extra overrides).
# The first four are the table's rows; the at_fsr_* rows test why AT+FSR did not
# train on the first H200 run (bf16 compute? the common lr 0.1?).
SUBSET_VARIANTS = {
    "at": ("at", ()),
    "at_cas": ("at_cas", ()),
    "at_fsr": ("at_fsr", ()),
    "trades": ("trades", ()),
    "at_fsr_f32": ("at_fsr", ("--config.train.dtype=float32",)),
    "at_fsr_lr01": ("at_fsr", ("--config.train.optimizer.lr=0.01",)),
}
DEFAULT_SUBSET = ("at", "at_cas", "at_fsr", "trades")
# The short recipe: 24 epochs of PGD-10 (eps 8/255, step 2/255), SGD 0.9, lr 0.1
# x0.1 at epochs 18 and 22 (the 100-epoch recipe's 75/90 milestones scaled), batch
# 128, bfloat16 compute. 24 epochs = 960 steps on the 5085 images: the small-CNN
# runs of configs/subset_cifar10.py stopped gaining test robustness well before
# their lr decay, and PGD-AT on a few thousand images overfits robustly soon after
# the decay, so a longer schedule buys nothing here. The per-4-epoch PGD-20 test
# accuracy in metrics.jsonl shows where the curve flattens.
SUBSET_RECIPE = (
    "--config.train.epochs=24", "--config.train.optimizer.milestones=(18, 22)",
    "--config.train.dtype=bfloat16", "--config.train.eval_every_epochs=4",
    "--config.train.eval_examples=1017", "--config.train.eval_batch_size=339",
    "--config.train.checkpoint_every_steps=200", "--config.train.log_every_steps=40",
)
# One batch of all 1017 images: AutoAttack compiles once and runs once (in the
# first H200 run, three batches of 339 took 217 s with four runs sharing the GPU,
# where 1000 images in one batch took 12 s alone).
SUBSET_EVAL = (
    "--config.eval.num_examples=1017", "--config.eval.batch_size=1017",
    "--config.eval.attacks=clean,pgd20,autoattack", "--config.eval.joint_attacks=joint-pgd20",
    "--config.eval.masking_checks=False",
)
# Tiny sizes for --smoke: the model and step (every launch.py run of the kit),
# then the subset runs' schedule.
SMOKE_MODEL = (
    "--config.model.name=small_cnn", "--config.model.kwargs={'width': 0.25}",
    "--config.attack.steps=1", "--config.train.batch_size=16",
    "--config.train.checkpoint_every_steps=1000",
)
SMOKE_RECIPE = SMOKE_MODEL + (
    "--config.train.epochs=1", "--config.train.optimizer.milestones=(1,)",
    "--config.train.eval_every_epochs=1",
    "--config.train.eval_examples=16", "--config.train.eval_batch_size=16",
    "--config.train.eval_pgd_steps=1",
)
SMOKE_EVAL = (
    "--config.eval.num_examples=16", "--config.eval.batch_size=16",
    "--config.eval.attacks=clean,pgd20,autoattack", "--config.eval.joint_attacks=joint-pgd20",
    "--config.eval.masking_checks=False", "--config.eval.aa_steps=2",
    "--config.eval.aa_fab_steps=2", "--config.eval.aa_queries=5",
)


# ----------------------------------------------------------------------------
# Output: records and Markdown, rewritten after every figure.

@dataclasses.dataclass
class Kit:
  out: Path
  work: Path
  data: Optional[Path]
  smoke: bool
  deadline: float  # time.monotonic() by which the running part must have ended
  variants: tuple[str, ...] = ()  # subset_table rows to run (default: DEFAULT_SUBSET)
  cases: tuple[str, ...] = ()  # throughput cases to run (default: all)

  @property
  def logs(self) -> Path:
    """The runs' own logs (packed into OUT/logs.tgz after each part: the device
    machine returns at most 8 files)."""
    path = self.work / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path

  def pack_logs(self) -> None:
    with tarfile.open(self.out / "logs.tgz", "w:gz") as tar:
      tar.add(self.logs, arcname="logs")

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def record(self, part: str, rec: dict[str, Any]) -> dict[str, Any]:
    rec = {"part": part, **rec}
    path = self.out / "kit.json"
    records = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(records + [rec], indent=1, default=str))
    print(json.dumps(rec, default=str), flush=True)
    return rec

  def markdown(self, text: str) -> None:
    with open(self.out / "kit.md", "a") as f:
      f.write(text.rstrip() + "\n\n")
    print(text, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  cell = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  """Versions and the device, for the top of the report."""
  import importlib.metadata as md
  import jax
  versions = {}
  for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
               "orbax-checkpoint", "chex", "ml-collections", "numpy", "torch", "pyautoattack",
               "torchattacks"):
    try:
      versions[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  device = jax.devices()[0]
  return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "python": sys.version.split()[0], "backend": device.platform,
          "device_kind": device.device_kind, "devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "versions": versions}


# ----------------------------------------------------------------------------
# throughput

def bench_argv(case: tuple, smoke: bool) -> list[str]:
  model, defense, batch, dtype, kinds, compare, kwargs = case
  steps = ("1", "1", "1") if smoke else ("10", "20", "5")
  return ["--model", model, "--model_kwargs", json.dumps(kwargs), "--defense", defense,
          "--batch", str(batch), "--dtype", dtype, "--kind", kinds, "--compare", compare,
          "--pgd_steps", steps[0], "--eval_steps", steps[1], "--iters", steps[2]]


def throughput(kit: Kit) -> None:
  from benchmarks import bench
  cases = SMOKE_CASES if kit.smoke else THROUGHPUT_CASES
  rows = []
  for name, case in cases.items():
    if kit.cases and name not in kit.cases:
      continue
    argv = bench_argv(case, kit.smoke)
    command = "python -m benchmarks.bench " + " ".join(argv)
    if kit.left() < (0 if kit.smoke else 40 + TRACE_RESERVE_S):
      kit.record("throughput", {"command": command, "skipped": "time budget spent"})
      continue
    try:
      for rec in bench.main(argv):
        rec = kit.record("throughput", {"command": command, **rec})
        rows.append(throughput_row(rec))
    except Exception as e:  # one failing case must not cost the others
      kit.record("throughput", {"command": command, "error": f"{type(e).__name__}: {e}"})
  kit.markdown("### Throughput (`python -m benchmarks.bench`, synthetic CIFAR-shaped batches)\n\n"
               + table(("step", "model", "defense", "dtype", "batch", "jaxdef img/s",
                        "step ms", "compile s", "MFU", "PyTorch img/s", "ratio",
                        "peak mem GiB"), rows))
  if kit.cases and "trace" not in kit.cases:
    return
  if kit.left() < (0 if kit.smoke else TRACE_RESERVE_S):
    kit.record("throughput", {"trace": None, "trace_note": "time budget spent"})
    return
  try:
    kit.record("throughput", profile_step(kit))
  except Exception as e:
    kit.record("throughput", {"trace": None, "trace_error": f"{type(e).__name__}: {e}"})


def throughput_row(rec: dict[str, Any]) -> tuple:
  steps = f"PGD-{rec['steps']} " + ("AT" if rec["kind"] == "train" else "eval")
  return (steps, rec["model"], rec["defense"], rec["dtype"], rec["batch"],
          round(rec["images_per_s"]), rec["step_ms"], rec["compile_s"],
          None if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%",
          None if "torch_images_per_s" not in rec else round(rec["torch_images_per_s"]),
          rec.get("ratio"), rec["peak_memory_bytes"] / 2**30)


def profile_step(kit: Kit) -> dict[str, Any]:
  """A ``jax.profiler`` trace of one train step (ResNet-18 bf16 batch 128; the
  smoke run: small CNN), packed as ``OUT/trace.tgz`` (TensorBoard / XProf)."""
  import jax
  from benchmarks import bench
  model, defense, batch, dtype, _, _, kwargs = (
      SMOKE_CASES[SMOKE_TRACE_CASE] if kit.smoke else THROUGHPUT_CASES[TRACE_CASE])
  config = bench.bench_config(model=model, defense=defense, batch=batch,
                              pgd_steps=1 if kit.smoke else 10, eval_steps=1, dtype=dtype,
                              augment="crop_flip", model_kwargs=kwargs)
  prepared = bench.Prepared(config, bench.synthetic_meta((32, 32, 3), 10))
  step = prepared.jitted("train")
  x, y = prepared.args("train")
  for _ in range(2):  # compile and warm up outside the trace
    prepared.state, metrics = step(prepared.state, x, y)
  jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      prepared.state, metrics = step(prepared.state, x, y)
      jax.block_until_ready(metrics)
    target = kit.out / "trace.tgz"
    with tarfile.open(target, "w:gz") as tar:
      tar.add(tmp, arcname="trace")
  size = target.stat().st_size
  if size > 15 * 2**20:  # over what comes back from the device machine
    target.unlink()
    return {"trace": None, "trace_note": f"trace of {size} bytes dropped (over 15 MiB)"}
  return {"trace": "trace.tgz", "trace_bytes": size, "trace_step": f"{model} {dtype} b{batch}"}


# ----------------------------------------------------------------------------
# streamed: the train step fed from disk vs from one batch on the device

def streamed_part(kit: Kit) -> None:
  import jax
  from benchmarks import bench
  from benchmarks.bench_data import data_config, random_raw, write_generated
  from jaxdef.data.streamed import train_data
  from jaxdef.train.mesh import batch_sharded, data_mesh
  model, batch, dtype, kwargs, pgd, images, iters = (
      ("small_cnn", 16, "float32", {"width": 0.25}, 1, 256, 3) if kit.smoke else
      ("resnet18", 512, "bfloat16", {}, 10, 50000, 60))
  # In the training process, and in worker processes (Grain's mp_prefetch).
  worker_counts = (0, 1) if kit.smoke else (0, min(4, max(1, (os.cpu_count() or 2) - 2)))
  folder = kit.work / "streamed32"
  if not (folder / "jaxdef_dataset.json").exists():
    write_generated(folder, {"train": (images, random_raw(0)), "test": (256, random_raw(1))},
                    num_classes=10, encoding="raw", image_shape=(32, 32, 3), channels=3,
                    shards=8)
  config = bench.bench_config(model=model, defense="none", batch=batch, pgd_steps=pgd,
                              eval_steps=1, dtype=dtype, augment="crop_flip",
                              model_kwargs=kwargs)
  prepared = bench.Prepared(config, bench.synthetic_meta((32, 32, 3), 10))
  step = prepared.train_step
  x, y = prepared.args("train")

  def run(batches) -> float:
    """Images/s of ``iters`` steps on ``batches`` (waited for at the end)."""
    t0 = time.perf_counter()
    for _ in range(iters):
      prepared.state, metrics = step(prepared.state, *next(batches))
    jax.block_until_ready(metrics)
    return iters * batch / (time.perf_counter() - t0)

  synthetic = lambda: iter(lambda: (x, y), None)
  run(synthetic())  # compile and warm up
  rows = []
  for workers in worker_counts:
    before = run(synthetic())
    data, _ = train_data(data_config(str(folder), workers=workers), seed=0,
                         global_batch=batch)
    batches = data.batches(0, iters + workers + 1, batch_sharded(data_mesh()))
    for _ in range(workers + 1):  # every worker started, the prefetch filled
      jax.block_until_ready(next(batches))
    streamed = run(batches)
    batches.close()
    after = run(synthetic())
    rec = kit.record("streamed", {
        "model": model, "dtype": dtype, "batch": batch, "pgd_steps": pgd, "steps": iters,
        "workers": workers, "images_on_disk": images,
        "synthetic_images_per_s": (before + after) / 2, "synthetic_before": before,
        "synthetic_after": after, "streamed_images_per_s": streamed,
        "ratio": streamed / ((before + after) / 2)})
    rows.append((model, dtype, batch, workers, round(rec["synthetic_images_per_s"]),
                 round(streamed), rec["ratio"]))
  kit.markdown("### The train step fed by the streamed source (32 px, raw ArrayRecord)\n\n"
               + table(("model", "dtype", "batch", "workers", "synthetic img/s",
                        "streamed img/s", "streamed / synthetic"), rows))


# ----------------------------------------------------------------------------
# Subprocesses of launch.py, stopped cleanly (SIGTERM: checkpoint, exit) at the budget.

def spawn(command: Sequence[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
  """``command`` from the repository root, output appended to ``log``, in a
  process group of its own (so a shell chain is stopped with its children)."""
  with open(log, "a") as f:
    return subprocess.Popen(list(command), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wait_or_stop(procs: dict[str, subprocess.Popen], kit: Kit,
                 margin: float) -> dict[str, int]:
  """Waits for every process until ``margin`` seconds before the deadline, then
  sends SIGTERM to each group (launch.py saves a checkpoint and exits) and
  SIGKILL to what is left 20 s later; returns the exit codes."""
  while any(p.poll() is None for p in procs.values()) and kit.left() > margin:
    time.sleep(1.0)
  for p in procs.values():
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGTERM)
  for p in procs.values():
    try:
      p.wait(timeout=20)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()
  return {name: p.returncode for name, p in procs.items()}


def smoke_npz(path: Path, seed: int = 0) -> Path:
  """A tiny CIFAR-shaped uint8 set (64 train / 32 test) for ``--smoke`` runs,
  so the kit's test never needs the real subset."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", 64), ("test", 32)):
    y = rng.integers(0, 10, n)
    # Class-dependent mean colour, so training has something to learn.
    x = rng.normal(40 + 20 * y[:, None, None, None], 30, (n, 32, 32, 3))
    arrays[f"x_{split}"] = np.clip(x, 0, 255).astype(np.uint8)
    arrays[f"y_{split}"] = y.astype(np.int64)
  np.savez(path, **arrays)
  return path


# ----------------------------------------------------------------------------
# autoattack

def autoattack_part(kit: Kit) -> None:
  import jax
  import jax.numpy as jnp
  import torch
  from benchmarks.compare_torch_attacks import jax_attack_fn, torch_attack
  from benchmarks import bench_torch
  from jaxdef.restored import load_run
  from jaxdef.data import to_float

  workdir = kit.work / "autoattack_model"
  epochs = 1 if kit.smoke else 5
  args = ["--config", "configs/pgd_at.py:cifar10_resnet18", "--workdir", str(workdir),
          "--config.data.name=npz", f"--config.data.path={kit.data}",
          f"--config.train.epochs={epochs}", "--config.train.optimizer.milestones=(100,)",
          f"--config.train.eval_every_epochs={epochs}", "--config.train.eval_examples=200",
          "--config.train.eval_batch_size=200"]
  if kit.smoke:
    args += SMOKE_MODEL
  t0 = time.perf_counter()
  train = spawn([sys.executable, "launch.py", *args], kit.logs / "autoattack_train.log")
  rc = wait_or_stop({"train": train}, kit, margin=0 if kit.smoke else 100)["train"]
  if rc not in (0, 128 + signal.SIGTERM):  # stopped by the budget: evaluate what it has
    kit.record("autoattack", {"error": f"training exited {rc}", "log": "autoattack_train.log"})
    return
  train_s = time.perf_counter() - t0
  run = load_run(str(workdir))
  model, variables, meta = run.model, run.variables, run.meta
  d = np.load(kit.data)
  n = 16 if kit.smoke else 1000
  x = np.asarray(to_float(d["x_test"][:n]))
  y = np.asarray(d["y_test"][:n]).astype(np.int32)
  budget = dict(eps=EPS, norm="linf", steps=2 if kit.smoke else 100,
                fab_steps=2 if kit.smoke else 100, queries=5 if kit.smoke else 5000)

  # jaxdef, float32 (the model trained in float32: train.dtype's default).
  logits_fn = lambda v: model.apply(variables, v, train=False)["logits"]
  logits = jax.jit(logits_fn)
  run = jax_attack_fn("autoattack", logits_fn, chunks=5, **budget)
  xj, yj, key = jnp.asarray(x), jnp.asarray(y), jax.random.key(0)
  t0 = time.perf_counter()
  x_adv = jax.block_until_ready(run(xj, yj, key))
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  x_adv = jax.block_until_ready(run(xj, yj, key))
  jax_s = time.perf_counter() - t0
  clean = np.asarray(jnp.argmax(logits(xj), -1) == yj)
  jax_robust = clean & np.asarray(jnp.argmax(logits(x_adv), -1) == yj)
  linf = float(jnp.max(jnp.abs(x_adv - xj)))

  # pyautoattack on the PyTorch twin holding the same weights, float32.
  device = "cuda" if torch.cuda.is_available() else "cpu"
  settings = bench_torch.TorchSettings(device, None, False)
  twin = bench_torch.prepare(model, jax.device_get(variables), meta.image_shape, settings)
  twin.eval()
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  attack = torch_attack("autoattack", twin, seed=0, device=device, **budget)
  bench_torch.synchronize(settings)
  t0 = time.perf_counter()
  xt_adv = attack(xt, yt)
  bench_torch.synchronize(settings)
  torch_s = time.perf_counter() - t0
  with torch.no_grad():
    torch_clean = (twin(xt).argmax(1) == yt).cpu().numpy()
    torch_robust = torch_clean & (twin(xt_adv).argmax(1) == yt).cpu().numpy()
  rec = kit.record("autoattack", {
      "n": n, "train_epochs": epochs, "train_s": train_s, "budget": budget,
      "jaxdef_clean_acc": float(clean.mean()), "jaxdef_robust_acc": float(jax_robust.mean()),
      "jaxdef_s_with_compile": first_s, "jaxdef_s": jax_s, "jaxdef_max_linf": linf,
      "pyautoattack_clean_acc": float(torch_clean.mean()),
      "pyautoattack_robust_acc": float(torch_robust.mean()), "pyautoattack_s": torch_s,
      "speedup": torch_s / jax_s, "torch_device": device,
      "torch_tf32_conv": bool(torch.backends.cudnn.allow_tf32)})
  del twin, xt, xt_adv, attack
  if device == "cuda":
    torch.cuda.empty_cache()  # the subset runs that follow need the memory
  kit.markdown(
      f"### AutoAttack standard, L-inf 8/255, {n} CIFAR-subset test images "
      f"(ResNet-18, {epochs} epochs PGD-AT, float32 in both)\n\n" + table(
          ("", "clean", "robust (AA)", "seconds", "seconds incl. compile"),
          [("jaxdef", 100 * rec["jaxdef_clean_acc"], 100 * rec["jaxdef_robust_acc"],
            jax_s, first_s),
           ("pyautoattack (PyTorch twin)", 100 * rec["pyautoattack_clean_acc"],
            100 * rec["pyautoattack_robust_acc"], torch_s, None)])
      + f"\n\nSpeed-up (warm jaxdef vs pyautoattack): {rec['speedup']:.2f}x")


# ----------------------------------------------------------------------------
# subset_table

def subset_commands(kit: Kit, variant: str) -> tuple[list[str], list[str]]:
  """The launch.py arguments that train and then evaluate one variant."""
  workdir = kit.work / "subset" / variant
  config_variant, extra = SUBSET_VARIANTS[variant]
  common = ["--config", f"configs/cifar10_resnet18_defenses.py:{config_variant}",
            "--workdir", str(workdir), "--config.data.name=npz",
            f"--config.data.path={kit.data}",
            *(SMOKE_RECIPE if kit.smoke else SUBSET_RECIPE),
            *(SMOKE_EVAL if kit.smoke else SUBSET_EVAL), *extra]
  return common, common + ["--mode", "eval"]


def metrics(workdir: Path) -> list[dict[str, Any]]:
  """The run's metrics.jsonl records ([] before training wrote any)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summaries(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The 'summary' records (one per finished training)."""
  return [r for r in records if r.get("split") == "summary"]


def subset_row(workdir: Path) -> Optional[dict[str, Any]]:
  """The variant's figures from its newest results.json and training summary, or None."""
  from jaxdef.evaluate.report import latest_results
  found = latest_results(str(workdir))
  if found is None:
    return None
  results = Path(found)
  records = metrics(workdir)
  done = summaries(records)
  curve = [(r.get("epoch"), r.get("clean_acc"), r.get("pgd_acc")) for r in records
           if r.get("split") != "summary" and "pgd_acc" in r]
  return {"results": json.loads(results.read_text()), "summary": done[0] if done else {},
          "curve": curve}


def subset_table(kit: Kit) -> None:
  procs = {}
  # Up to four processes share the GPU beside the kit's own (capped at 40%,
  # run.sh): each allocates as it goes, capped at 14%.
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.14"}
  variants = kit.variants or (DEFAULT_SUBSET[:2] if kit.smoke else DEFAULT_SUBSET)
  for variant in variants:
    workdir = kit.work / "subset" / variant
    if subset_row(workdir) is not None:
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    train, evaluate = subset_commands(kit, variant)
    log = kit.logs / f"subset_{variant}.log"
    # One shell chain per variant: train (or resume) unless trained, then evaluate.
    chain = ('"$0" launch.py "$@" --mode eval' if summaries(metrics(workdir)) else
             '"$0" launch.py "$@" && "$0" launch.py "$@" --mode eval')
    procs[variant] = spawn(["bash", "-c", chain, sys.executable, *train], log, env)
  t0 = time.perf_counter()
  returncodes = wait_or_stop(procs, kit, margin=25)  # a stopped run resumes next time
  wall = time.perf_counter() - t0
  rows = []
  for variant in variants:
    workdir = kit.work / "subset" / variant
    train, evaluate = subset_commands(kit, variant)
    row = subset_row(workdir)
    base = {"variant": variant, "command": "python launch.py " + " ".join(train),
            "eval_command": "python launch.py " + " ".join(evaluate)}
    if row is None:
      kit.record("subset_table", {**base, "finished": False,
                                  "returncode": returncodes.get(variant),
                                  "log": f"subset_{variant}.log"})
      rows.append((variant, "not finished", None, None, None, None, None, None))
      continue
    kit.record("subset_table", {**base, "finished": True, "parallel_wall_s": wall, **row})
    rows.append(subset_markdown_row(variant, row))
  kit.markdown("### ResNet-18 on the CIFAR-10 subset (1017 test images, L-inf 8/255)\n\n"
               + table(("variant", "clean", "PGD-20", "joint PGD-20", "AutoAttack",
                        "train s", "eval s", "epochs"), rows)
               + "\n\nThe runs shared the device as parallel processes: their seconds are not "
               "standalone figures.")


def accuracy(results: dict[str, Any], name: str) -> Optional[float]:
  """Accuracy (%) of ``name`` ('clean' or an attack) in a ``results.json``."""
  value = results.get("clean") if name == "clean" else results.get("attacks", {}).get(name)
  return None if value is None else 100 * float(value)


def subset_markdown_row(variant: str, row: dict[str, Any]) -> tuple:
  res, summary = row["results"], row["summary"]
  return (variant, accuracy(res, "clean"), accuracy(res, "pgd20"),
          accuracy(res, "joint-pgd20"), accuracy(res, "autoattack"),
          summary.get("train_seconds"), sum(res.get("seconds", {}).values()),
          summary.get("epochs"))


# ----------------------------------------------------------------------------

# Cumulative fractions of the budget by which each part of 'all' must end.
ALL_SHARES = {"throughput": 0.30, "streamed": 0.38, "autoattack": 0.66, "subset_table": 1.0}
RUNNERS: dict[str, Callable[[Kit], None]] = {
    "throughput": throughput, "streamed": streamed_part, "autoattack": autoattack_part,
    "subset_table": subset_table}


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.kit")
  p.add_argument("part", choices=PARTS + ("all",))
  p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU test)")
  p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
  p.add_argument("--work", default=str(ROOT / "gpu_work"),
                 help="run directories (git-ignored, kept between calls on a warm machine)")
  p.add_argument("--data", default=str(ROOT / ".gpu/data/cifar10_subset.npz"))
  p.add_argument("--budget_s", type=float, default=520.0,
                 help="every part ends by then (seconds from the start)")
  p.add_argument("--variants", default="",
                 help=f"subset_table rows, comma-separated (of {', '.join(SUBSET_VARIANTS)}; "
                      f"default {','.join(DEFAULT_SUBSET)})")
  p.add_argument("--cases", default="",
                 help=f"throughput cases, comma-separated (of {', '.join(THROUGHPUT_CASES)}, "
                      "trace; default all)")
  args = p.parse_args(argv)
  variants = tuple(v for v in args.variants.split(",") if v)
  cases = tuple(c for c in args.cases.split(",") if c)
  known = {*THROUGHPUT_CASES, *SMOKE_CASES, "trace"}
  for name, given, allowed in (("variant", variants, SUBSET_VARIANTS), ("case", cases, known)):
    unknown = [v for v in given if v not in allowed]
    if unknown:
      p.error(f"unknown {name} {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
  out = Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  work = Path(args.work).resolve()
  work.mkdir(parents=True, exist_ok=True)
  data = Path(args.data)
  if args.smoke:
    data = smoke_npz(work / "smoke.npz")
  start = time.monotonic()
  kit = Kit(out=out, work=work, data=data if data.exists() else None, smoke=args.smoke,
            deadline=start + args.budget_s, variants=variants, cases=cases)
  env = kit.record("environment", environment())
  kit.markdown(f"## {env['device_kind']} ({env['backend']}), {env['date']}\n\n"
               f"python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in
                                                      env["versions"].items()))
  parts = PARTS if args.part == "all" else (args.part,)
  failed = 0
  for part in parts:
    # 'all' shares the budget: each part must end by its cumulative share
    # (time a part leaves unused goes to the next).
    share = ALL_SHARES[part] if args.part == "all" else 1.0
    kit.deadline = start + share * args.budget_s
    if kit.left() <= 0:
      kit.record(part, {"skipped": "time budget spent"})
      continue
    if part not in ("throughput", "streamed") and kit.data is None:
      kit.record(part, {"skipped": f"no data at {args.data} (run prepare.sh)"})
      continue
    t0 = time.perf_counter()
    try:
      RUNNERS[part](kit)
    except Exception as e:
      failed += 1
      kit.record(part, {"error": f"{type(e).__name__}: {e}"})
    kit.record(part, {"part_seconds": time.perf_counter() - t0})
    kit.pack_logs()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
