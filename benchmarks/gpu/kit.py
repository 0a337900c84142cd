"""The GPU kit's parts, run by ``benchmarks/gpu/run.sh PART``.

  python -m benchmarks.gpu.kit PART [--smoke] [--out DIR] [--budget_s S] [--data NPZ]

PART is ``throughput``, ``models``, ``extras``, ``subset_table``,
``autoattack``, ``streamed``, ``imported`` or ``all`` (those in that order,
the most wanted figures first, while the budget lasts). Every figure is appended to ``OUT/kit.json`` (one
list of records) and ``OUT/kit.md`` (Markdown tables) as soon as it is
measured, so a part cut short by the time limit still returns what it had.
What a call finished is kept in ``WORK/kit_state.json``: a second ``all`` on
the same warm machine goes on where the first stopped (``--redo`` repeats).
``--smoke`` runs the same code paths at tiny sizes on whatever backend is
there (the CPU test of the kit, ``tests/test_gpu_kit.py``).

Two calls of ``run.sh all --budget_s 480`` cover the throughput and models
parts on an H200. Estimated from the H200 figures in BENCHMARKS.md (jaxdef
ResNet-18 compile about 21 s, WRN-34-10 23 s, a CPU FLOP count 10-25 s per
model, counted once; torch.compile assumed about a minute per mode): call 1
the throughput part, about 480 s (the batch-512 anchor with three PyTorch
modes 150 s, the cast 25 s, command buffers 50 s and 35 s, batch 1024 with
the best PyTorch mode 90 s and with the cast 25 s, two traces 50 s, WRN-34-10
60 s; what does not fit moves to call 2); call 2 the models part, about 450 s
(WRN-28-10 70 s, two ResNet-50 cases 130 s, WRN-70-16 without and with remat
120 s each, more for each batch that does not fit). The extras part
(batch 128, the unrolled loop, the eval step, max-autotune: about 400 s), the
FSR bf16 subset row (about 200 s), autoattack and streamed need later calls.

* ``throughput``: the anchors and the remedies (:data:`THROUGHPUT_CASES`):
  ResNet-18 PGD-10 AT in bf16 at batch 512 against the PyTorch twin in eager
  and ``torch.compile`` modes (the ratio is to the fastest), each remedy
  (``train.cast_params_once``, XLA command buffers, both), batch 1024 against
  eager and the fastest compiled mode, ``jax.profiler`` traces of the
  batch-512 step with and without the cast remedy (``OUT/trace_*.tgz``),
  WRN-34-10 with and without the cast.
* ``extras``: more ResNet-18 cases (:data:`EXTRA_CASES`): batch 128 against
  eager and the fastest compiled PyTorch mode, with the cast, the fully
  unrolled PGD loop, the PGD-20 eval step, PyTorch's max-autotune.
* ``models``: the recipes' models (:data:`MODEL_CASES`): WRN-28-10 SiLU TRADES
  at batch 512, ResNet-50 at 224 px with PGD-3 and with FGSM-RS beside
  torchvision's ResNet-50, WRN-70-16 at the largest batch that fits, without
  and with rematerialisation; images/s, MFU and peak memory each.
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
* ``imported``: AutoAttack standard (L-inf 8/255) on PyTorch models imported
  into jaxdef (:data:`IMPORTED_CASES`: RobustBench's WRN-28-10 on the 1017
  CIFAR-subset test images, torchvision's ResNet-50 on synthetic 224 px
  images), each briefly trained in PyTorch first so that attacks break it as
  they break a non-robust model: jaxdef's public ``attacks.autoattack`` on
  the import (first and second call) against pyautoattack on the PyTorch
  module (:func:`benchmarks.bench_import_autoattack.compare`).
* ``subset_table``: ResNet-18 on the CIFAR-10 subset with AT, AT+CAS, AT+FSR
  and TRADES (``all``: the bf16 AT+FSR row BENCHMARKS.md owes, alone;
  ``configs/cifar10_resnet18_defenses.py`` with the short recipe
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
# In the order 'all' runs them: the most wanted figures first.
PARTS = ("throughput", "models", "extras", "subset_table", "autoattack", "streamed",
         "imported")
EPS = 8 / 255



@dataclasses.dataclass(frozen=True)
class Case:
  """One ``python -m benchmarks.bench`` case (:func:`bench_argv` gives its flags).

  ``compare`` 'torch' runs the PyTorch twin beside, in ``torch_modes`` (a
  comma list of :data:`benchmarks.bench.TORCH_MODES`, or 'best': eager and
  the fastest compiled mode an earlier case measured). ``command_buffers``:
  XLA command buffers over convolutions and the PGD ``while``
  (:func:`command_buffer_flags`), in a subprocess since ``XLA_FLAGS`` is read
  when the backend starts. ``fit_batches``: tried largest first in
  subprocesses that may use ``FIT_MEMORY_FRACTION`` of the device; the first
  that runs is the case's batch. ``min_s``: not started with less time left.
  """
  model: str
  batch: int
  dtype: str = "bfloat16"
  kinds: str = "train"
  compare: str = "none"
  torch_modes: str = "eager"
  model_kwargs: tuple = ()  # (key, value) pairs
  defense: str = "none"
  objective: str = "at"
  pgd_steps: int = 10
  eps: float = 0.0  # 0: the recipe's 8/255 (step 2/255)
  step_size: float = 0.0
  image_size: int = 32
  num_classes: int = 10
  augment: str = "crop_flip"  # 'rrc_flip' at 224 px: cropped on the host, not in the step
  cast_params_once: bool = False
  unroll: int = 0
  command_buffers: bool = False
  fit_batches: tuple = ()
  min_s: float = 40.0


WRN34 = (("depth", 34), ("width", 10))
WRN28_10 = (("depth", 28), ("width", 10))
WRN70_16 = (("depth", 70), ("width", 16))
COMPILED = "eager,default,reduce-overhead"
# The anchors and the remedies (ResNet-18 PGD-10 AT, bf16 unless named), most
# wanted first: jaxdef against the best PyTorch mode at batch 512 (the target),
# each remedy alone and together, batch 1024, WRN-34-10 (the 50% MFU target).
# 'trace' (jax.profiler traces of TRACE_CASES) comes after batch 1024.
THROUGHPUT_CASES = {
    "r18_b512_bf16": Case("resnet18", 512, compare="torch", torch_modes=COMPILED, min_s=150),
    "r18_b512_bf16_cast": Case("resnet18", 512, cast_params_once=True),
    "r18_b512_bf16_cmdbuf": Case("resnet18", 512, command_buffers=True),
    "r18_b512_bf16_cast_cmdbuf": Case("resnet18", 512, cast_params_once=True,
                                      command_buffers=True),
    "r18_b1024_bf16": Case("resnet18", 1024, compare="torch", torch_modes="best", min_s=90),
    "r18_b1024_bf16_cast": Case("resnet18", 1024, cast_params_once=True),
    "wrn34_b128_bf16": Case("wide_resnet", 128, model_kwargs=WRN34, min_s=60),
    "wrn34_b128_bf16_cast": Case("wide_resnet", 128, model_kwargs=WRN34, cast_params_once=True),
}
# After the recipes' models: batch 128 against the best PyTorch mode, the fully
# unrolled PGD loop, the eval step, and PyTorch's max-autotune (long to compile).
EXTRA_CASES = {
    "r18_b128_bf16": Case("resnet18", 128, compare="torch", torch_modes="best", min_s=90),
    "r18_b128_bf16_cast": Case("resnet18", 128, cast_params_once=True),
    "r18_b512_bf16_unroll": Case("resnet18", 512, unroll=10),
    "r18_b512_eval_bf16": Case("resnet18", 512, kinds="eval", compare="torch"),
    "r18_b512_bf16_autotune": Case("resnet18", 512, compare="torch", torch_modes="max-autotune",
                                   min_s=200),
}
TRACE_CASES = ("r18_b512_bf16", "r18_b512_bf16_cast")  # traced ('trace' in --cases)
TRACE_AFTER = "r18_b1024_bf16_cast"  # the traces are taken after this case
TRACE_RESERVE_S = 30  # kept for each profiler trace
# The recipes' models (bf16): WRN-28-10 SiLU TRADES at the recipe's batch 512,
# ResNet-50 at 224 px with PGD-3 and FGSM-RS (eps 4/255; PGD-3 steps of 2/255,
# FGSM-RS one step of 1.25 eps from a uniform start) beside torchvision's
# ResNet-50, and WRN-70-16 SiLU TRADES at the largest batch that fits, without
# and with rematerialisation.
MODEL_CASES = {
    "wrn28_10_silu_trades_b512": Case("dm_wide_resnet", 512, objective="trades",
                                      model_kwargs=WRN28_10, min_s=70),
    "r50_224_pgd3_b256": Case("resnet50", 256, pgd_steps=3, eps=4 / 255, step_size=2 / 255,
                              image_size=224, num_classes=1000, augment="rrc_flip",
                              compare="torch", min_s=70),
    "r50_224_fgsm_rs_b256": Case("resnet50", 256, pgd_steps=1, eps=4 / 255,
                                 step_size=5 / 255, image_size=224, num_classes=1000,
                                 augment="rrc_flip", compare="torch", min_s=60),
    "wrn70_16_silu_trades_fit": Case("dm_wide_resnet", 0, objective="trades",
                                     model_kwargs=WRN70_16, fit_batches=(512, 256, 128),
                                     min_s=120),
    "wrn70_16_silu_trades_remat_fit": Case(
        "dm_wide_resnet", 0, objective="trades", model_kwargs=WRN70_16 + (("remat", True),),
        fit_batches=(1024, 512), min_s=120),
}
FIT_MEMORY_FRACTION = "0.8"  # of the device, for the fit search's subprocesses
# Tiny versions of every kind of case, for --smoke (the CPU test).
SMALL = (("width", 0.25),)
SMOKE_CASES = {
    "small": Case("small_cnn", 8, dtype="float32", kinds="train,eval", compare="torch",
                  model_kwargs=SMALL, min_s=0),
    "small_cas": Case("small_cnn", 8, defense="cas", model_kwargs=SMALL, min_s=0),
    "small_cast": Case("small_cnn", 8, cast_params_once=True, model_kwargs=SMALL, min_s=0),
    "small_cmdbuf": Case("small_cnn", 8, command_buffers=True, model_kwargs=SMALL, min_s=0),
    "small_best": Case("small_cnn", 8, compare="torch", torch_modes="best", model_kwargs=SMALL,
                       min_s=0),
}
SMOKE_TRACE_CASES = ("small_cas",)
SMOKE_TRACE_AFTER = "small_cmdbuf"
SMOKE_MODEL_CASES = {
    "tiny_wrn_silu_trades": Case("dm_wide_resnet", 8, objective="trades",
                                 model_kwargs=(("depth", 10), ("width", 1)), min_s=0),
    "tiny_r50_fgsm_rs": Case("resnet50", 2, pgd_steps=1, eps=4 / 255, step_size=5 / 255,
                             image_size=64, augment="rrc_flip", compare="torch", min_s=0),
    "tiny_wrn_remat_fit": Case("wide_resnet", 0,
                               model_kwargs=(("depth", 10), ("width", 1), ("remat", True)),
                               fit_batches=(16, 8), min_s=0),
}
# XLA command buffer types added to XLA's defaults by Case.command_buffers:
# convolutions (CONVOLUTION, in newer XLA only) and the PGD loop (WHILE, with
# CONDITIONAL for its condition). Those the installed jax does not know are
# dropped (accepted_command_buffer_types) and the record says which were used.
COMMAND_BUFFER_TYPES = ("CONVOLUTION", "WHILE", "CONDITIONAL")

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
ALL_SUBSET = ("at_fsr",)  # what 'all' runs: the row BENCHMARKS.md owes
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
  cases: tuple[str, ...] = ()  # throughput / models cases to run (default: all)
  redo: bool = False  # repeat what an earlier call on this machine finished

  def state(self) -> dict[str, Any]:
    """What earlier calls with this --work finished and learnt (WORK/kit_state.json):
    ``done`` keys, FLOP counts, the fastest compiled PyTorch mode."""
    path = self.work / "kit_state.json"
    return json.loads(path.read_text()) if path.exists() else {}

  def save_state(self, state: dict[str, Any]) -> None:
    (self.work / "kit_state.json").write_text(json.dumps(state, indent=1))

  def is_done(self, key: str) -> bool:
    return not self.redo and key in self.state().get("done", [])

  def mark_done(self, key: str) -> None:
    state = self.state()
    state["done"] = sorted(set(state.get("done", [])) | {key})
    self.save_state(state)

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

def bench_argv(case: Case, smoke: bool, *, batch: int = 0, torch_modes: str = "",
               flops_per_example: float = 0.0) -> list[str]:
  """``python -m benchmarks.bench`` flags of ``case`` (``batch``, ``torch_modes``
  and a known FLOP count override the case's)."""
  steps = ("1", "1", "1") if smoke else (str(case.pgd_steps), "20", "5")
  argv = ["--model", case.model, "--model_kwargs", json.dumps(dict(case.model_kwargs)),
          "--defense", case.defense, "--objective", case.objective,
          "--batch", str(batch or case.batch), "--dtype", case.dtype, "--kind", case.kinds,
          "--compare", case.compare, "--torch_modes", torch_modes or case.torch_modes,
          "--pgd_steps", steps[0], "--eval_steps", steps[1], "--iters", steps[2],
          "--image_size", str(case.image_size), "--num_classes", str(case.num_classes),
          "--augment", case.augment, "--unroll", str(case.unroll)]
  argv += ["--eps", repr(case.eps)] if case.eps else []
  argv += ["--step_size", repr(case.step_size)] if case.step_size else []
  argv += ["--cast_params_once"] if case.cast_params_once else []
  argv += ["--flops_per_example", repr(flops_per_example)] if flops_per_example else []
  return argv


def command_buffer_flags(backend: str, types: Sequence[str]) -> str:
  """``XLA_FLAGS`` that add ``types`` to XLA:GPU's command buffers (CUDA
  graphs), recorded from the first kernel on; '' for any other backend (CPU
  and TPU are left as they are) or no types."""
  if backend not in ("gpu", "cuda", "rocm") or not types:
    return ""
  return ("--xla_gpu_enable_command_buffer=" + ",".join(f"+{t}" for t in types)
          + " --xla_gpu_graph_min_graph_size=1")


def accepted_command_buffer_types(backend: str, types: Sequence[str]) -> tuple[str, ...]:
  """The command buffer types of ``types`` that this jax's XLA accepts, each
  tried as a compile option of a one-op program in a subprocess of its own
  (an option XLA does not know may end the process); () off GPU."""
  if backend not in ("gpu", "cuda", "rocm"):
    return ()
  probe = ("import jax; jax.jit(lambda v: v + 1, compiler_options="
           "{'xla_gpu_enable_command_buffer': '+%s'}).lower(1.0).compile()")
  accepted = []
  for t in types:
    done = subprocess.run([sys.executable, "-c", probe % t], capture_output=True, text=True,
                          env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    if done.returncode == 0:
      accepted.append(t)
  return tuple(accepted)


class BenchFailed(RuntimeError):
  """A bench subprocess failed; ``out_of_memory`` when the device ran out."""

  def __init__(self, message: str, out_of_memory: bool):
    super().__init__(message)
    self.out_of_memory = out_of_memory


def bench_subprocess(argv: Sequence[str], env: dict[str, str], timeout: float) -> list[dict]:
  """``python -m benchmarks.bench ARGV`` with ``env`` added; its records."""
  done = subprocess.run([sys.executable, "-m", "benchmarks.bench", *argv], cwd=ROOT,
                        env={**os.environ, **env}, capture_output=True, text=True,
                        timeout=max(timeout, 1.0))
  records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode != 0 or not records:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:400]
    oom = any(m in done.stderr for m in ("RESOURCE_EXHAUSTED", "Out of memory",
                                          "out of memory"))
    raise BenchFailed(f"bench exited {done.returncode}: {tail}", oom)
  return records


def first_fitting(batches: Sequence[int],
                  run: Callable[[int], list[dict]]) -> tuple[list[dict], list[int]]:
  """``run`` at each batch of ``batches`` (largest first) until one does not
  run out of device memory: (its records, the batches that did not fit).
  Any other failure is raised."""
  too_big = []
  for batch in sorted(batches, reverse=True):
    try:
      return run(batch), too_big
    except BenchFailed as e:
      if not e.out_of_memory:
        raise
      too_big.append(batch)
  return [], too_big


def run_case(kit: Kit, part: str, name: str, case: Case) -> list[dict]:
  """Runs one case (in this process, or in subprocesses for XLA flags and the
  fit search); records and returns its figures. Done cases are skipped."""
  import jax
  key = f"case:{name}"
  if kit.is_done(key):
    kit.record(part, {"case": name, "skipped": "done in an earlier call (--redo repeats it)"})
    return []
  if kit.left() < case.min_s + (0 if kit.smoke else 20):
    kit.record(part, {"case": name, "skipped": "time budget spent"})
    return []
  modes = case.torch_modes
  if modes == "best":  # eager, and the fastest compiled mode measured so far
    best = kit.state().get("best_compiled_mode")
    modes = "eager" + (f",{best}" if best else "")
  # Same model, attack and image size as an earlier case: its FLOP count.
  flops_key = json.dumps([case.model, sorted(k for k in case.model_kwargs if k[0] != "remat"),
                          case.defense, case.objective, case.pgd_steps, case.image_size,
                          case.num_classes, case.kinds, case.augment, case.unroll > 0])
  # (one count serves one kind of step: a 'train,eval' case counts its own)
  flops = 0.0 if "," in case.kinds else kit.state().get("flops", {}).get(flops_key, 0.0)
  argv = lambda batch: bench_argv(case, kit.smoke, batch=batch, torch_modes=modes,
                                  flops_per_example=flops)
  extra: dict[str, Any] = {}
  env: dict[str, str] = {}
  backend = jax.default_backend()
  if case.command_buffers:
    if "command_buffer_types" not in kit.state():  # probed once per machine
      kit.save_state({**kit.state(), "command_buffer_types": list(
          accepted_command_buffer_types(backend, COMMAND_BUFFER_TYPES))})
    types = tuple(kit.state()["command_buffer_types"])
    flags = command_buffer_flags(backend, types)
    env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flags) if f)
    extra.update(command_buffer_types=list(types), command_buffer_flags=flags)
  try:
    if case.fit_batches:
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = FIT_MEMORY_FRACTION
      records, too_big = first_fitting(
          case.fit_batches, lambda b: bench_subprocess(argv(b), env, kit.left()))
      extra.update(batches_tried=sorted(case.fit_batches, reverse=True),
                   batches_out_of_memory=too_big, memory_fraction=float(FIT_MEMORY_FRACTION))
      if not records:
        raise BenchFailed(f"no batch of {case.fit_batches} fits", True)
    elif env:
      records = bench_subprocess(argv(case.batch), env, kit.left())
    else:
      from benchmarks import bench
      records = bench.main(argv(case.batch))
  except subprocess.TimeoutExpired:
    kit.record(part, {"case": name, "skipped": "time budget spent (stopped)"})
    return []
  except Exception as e:  # one failing case must not cost the others
    kit.record(part, {"case": name, "command": "python -m benchmarks.bench "
                      + " ".join(argv(case.batch or max(case.fit_batches))),
                      "error": f"{type(e).__name__}: {e}"})
    return []
  out = []
  for rec in records:
    command = "python -m benchmarks.bench " + " ".join(argv(rec["batch"]))
    if env:
      command = " ".join(f"{k}='{v}'" for k, v in env.items()) + " " + command
    out.append(kit.record(part, {"case": name, "command": command, **extra, **rec}))
  remember(kit, flops_key, case.kinds, out)
  kit.mark_done(key)
  return out


def remember(kit: Kit, flops_key: str, kind: str, records: Sequence[dict]) -> None:
  """Keeps for later cases (and calls, on a warm machine): the FLOP count of a
  one-kind case (``kind``) and the fastest compiled PyTorch mode."""
  state = kit.state()
  for rec in records:
    if rec.get("flops_per_example") and rec.get("kind") == kind:
      state.setdefault("flops", {})[flops_key] = rec["flops_per_example"]
    compiled = {m: r["images_per_s"] for m, r in rec.get("torch_modes", {}).items()
                if m != "eager" and "images_per_s" in r
                and r.get("gradient_check", {}).get("matches_eager", True)}
    best = state.get("best_compiled_images_per_s", {})
    for mode, ips in compiled.items():  # per mode, its best relative figure
      if rec.get("model") == "resnet18":
        best[mode] = max(best.get(mode, 0.0), ips / max(rec["images_per_s"], 1e-9))
    if best:
      state["best_compiled_images_per_s"] = best
      state["best_compiled_mode"] = max(best, key=best.get)
  kit.save_state(state)


def cases_part(kit: Kit, part: str, cases: dict[str, Case], heading: str,
               traces: tuple[str, ...] = (), trace_after: str = "") -> None:
  """Runs ``cases`` in order (``--cases`` picks some), the profiler traces
  after ``trace_after``; then one Markdown table."""
  rows = []
  for name, case in cases.items():
    if not kit.cases or name in kit.cases:
      rows += [throughput_row(r) for r in run_case(kit, part, name, case)]
    if name == trace_after and traces and (not kit.cases or "trace" in kit.cases):
      for traced in traces:
        trace_case(kit, part, traced, cases[traced])
  kit.markdown(heading + "\n\n" + table(
      ("case", "step", "model", "dtype", "batch", "jaxdef img/s", "step ms", "compile s",
       "MFU", "peak mem GiB", "PyTorch best mode", "PyTorch img/s", "its compile s",
       "ratio"), rows))


def throughput(kit: Kit) -> None:
  smoke = kit.smoke
  cases_part(kit, "throughput", SMOKE_CASES if smoke else THROUGHPUT_CASES,
             "### Throughput, anchors and remedies (`python -m benchmarks.bench`, synthetic "
             "batches)", SMOKE_TRACE_CASES if smoke else TRACE_CASES,
             SMOKE_TRACE_AFTER if smoke else TRACE_AFTER)


def extras_part(kit: Kit) -> None:
  cases_part(kit, "extras", {} if kit.smoke else EXTRA_CASES,
             "### Throughput, more ResNet-18 cases (`python -m benchmarks.bench`, synthetic "
             "batches)")


def models_part(kit: Kit) -> None:
  cases_part(kit, "models", SMOKE_MODEL_CASES if kit.smoke else MODEL_CASES,
             "### Throughput of the recipes' models (`python -m benchmarks.bench`, synthetic "
             "batches)")


def throughput_row(rec: dict[str, Any]) -> tuple:
  steps = f"PGD-{rec['steps']} " + ("AT" if rec["kind"] == "train" else "eval")
  if rec.get("objective", "at") != "at":
    steps = f"PGD-{rec['steps']} {rec['objective'].upper()}"
  mode = rec.get("torch_best_mode")
  return (rec["case"], steps, rec["model"], rec["dtype"], rec["batch"],
          round(rec["images_per_s"]), rec["step_ms"], rec["compile_s"],
          None if rec["mfu"] is None else f"{100 * rec['mfu']:.1f}%",
          rec["peak_memory_bytes"] / 2**30, mode,
          None if "torch_images_per_s" not in rec else round(rec["torch_images_per_s"]),
          rec.get("torch_compile_s"), rec.get("ratio"))


def trace_case(kit: Kit, part: str, name: str, case: Case) -> None:
  """A ``jax.profiler`` trace of one train step of ``case`` (OUT/trace_NAME.tgz)."""
  key = f"trace:{name}"
  if kit.is_done(key):
    kit.record(part, {"trace_case": name, "skipped": "done in an earlier call"})
    return
  if kit.left() < (0 if kit.smoke else TRACE_RESERVE_S):
    kit.record(part, {"trace_case": name, "trace": None, "trace_note": "time budget spent"})
    return
  try:
    kit.record(part, {"trace_case": name, **profile_step(kit, name, case)})
    kit.mark_done(key)
  except Exception as e:
    kit.record(part, {"trace_case": name, "trace": None,
                      "trace_error": f"{type(e).__name__}: {e}"})


def profile_step(kit: Kit, name: str, case: Case) -> dict[str, Any]:
  """A ``jax.profiler`` trace of one train step of ``case``, packed as
  ``OUT/trace_NAME.tgz`` (TensorBoard / XProf)."""
  import jax
  from benchmarks import bench
  config = bench.bench_config(model=case.model, defense=case.defense, batch=case.batch,
                              pgd_steps=1 if kit.smoke else case.pgd_steps, eval_steps=1,
                              dtype=case.dtype, augment=case.augment,
                              image_size=case.image_size,
                              model_kwargs=dict(case.model_kwargs), objective=case.objective,
                              cast_params_once=case.cast_params_once)
  prepared = bench.Prepared(config, bench.synthetic_meta(
      (case.image_size, case.image_size, 3), case.num_classes))
  step = prepared.jitted("train")
  x, y = prepared.args("train")
  for _ in range(2):  # compile and warm up outside the trace
    prepared.state, metrics = step(prepared.state, x, y)
  jax.block_until_ready(metrics)
  target = kit.out / f"trace_{name}.tgz"
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      prepared.state, metrics = step(prepared.state, x, y)
      jax.block_until_ready(metrics)
    with tarfile.open(target, "w:gz") as tar:
      tar.add(tmp, arcname="trace")
  size = target.stat().st_size
  if size > 15 * 2**20:  # over what comes back from the device machine
    target.unlink()
    return {"trace": None, "trace_note": f"trace of {size} bytes dropped (over 15 MiB)"}
  return {"trace": target.name, "trace_bytes": size,
          "trace_step": f"{case.model} {case.dtype} b{case.batch}"
                        + (" cast_params_once" if case.cast_params_once else "")}


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


def coloured_images(n: int, size: int, rng: np.random.Generator, classes: int = 10
                    ) -> tuple[np.ndarray, np.ndarray]:
  """``n`` uint8 (size, size, 3) images and their labels, each image noise
  around a class-dependent grey level, so that a network has something to learn."""
  y = rng.integers(0, classes, n)
  x = rng.normal(40 + 20 * y[:, None, None, None], 30, (n, size, size, 3))
  return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def smoke_npz(path: Path, seed: int = 0) -> Path:
  """A tiny CIFAR-shaped uint8 set (64 train / 32 test) for ``--smoke`` runs,
  so the kit's test never needs the real subset."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", 64), ("test", 32)):
    arrays[f"x_{split}"], arrays[f"y_{split}"] = coloured_images(n, 32, rng)
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
# imported


@dataclasses.dataclass(frozen=True)
class ImportedCase:
  """AutoAttack on one imported PyTorch model (:func:`imported_part`):
  ``images`` 'subset' (the CIFAR subset, 32 px) or 'synthetic' (
  :func:`coloured_images` at ``size``); ``n`` test images attacked;
  ``train_steps`` Adam steps of ``train_batch`` in PyTorch before the import;
  ``batch`` the most images one call of either library takes."""
  arch: str
  images: str
  n: int
  train_steps: int
  train_batch: int
  batch: int
  size: int = 32
  min_s: float = 120.0


IMPORTED_CASES = {
    "wrn28_10_subset": ImportedCase("wrn-28-10", "subset", 1017, 200, 128, 256),
    "resnet50_224": ImportedCase("resnet50", "synthetic", 256, 100, 64, 64, size=224),
}
SMOKE_IMPORTED_CASES = {
    "wrn10_1_smoke": ImportedCase("wrn-10-1", "subset", 4, 3, 8, 4, min_s=0.0),
}


def imported_images(kit: Kit, case: ImportedCase) -> tuple[np.ndarray, ...]:
  """(x_train, y_train, x_test, y_test) of ``case``: float32 NHWC in [0, 1]."""
  if case.images == "subset":
    from benchmarks.compare_torch_attacks import load
    x_train, y_train, x, y = load("cifar", kit.data)
    return x_train, y_train, x[:case.n], y[:case.n]
  rng = np.random.default_rng(0)
  x_train, y_train = coloured_images(4 * case.n, case.size, rng)
  x, y = coloured_images(case.n, case.size, rng)
  return x_train.astype(np.float32) / 255.0, y_train, x.astype(np.float32) / 255.0, y


def imported_part(kit: Kit) -> None:
  import torch
  from benchmarks.bench_import_autoattack import compare
  from benchmarks.torch_references import MissingReference, briefly_trained, torch_module
  device = "cuda" if torch.cuda.is_available() else "cpu"
  rows = []
  for name, case in (SMOKE_IMPORTED_CASES if kit.smoke else IMPORTED_CASES).items():
    if kit.left() < case.min_s:
      kit.record("imported", {"case": name, "skipped": "time budget spent"})
      continue
    try:
      torch.manual_seed(0)
      module = torch_module(case.arch)
    except MissingReference as e:
      kit.record("imported", {"case": name, "skipped": str(e)})
      continue
    x_train, y_train, x, y = imported_images(kit, case)
    t0 = time.perf_counter()
    module = briefly_trained(module, x_train, y_train, steps=case.train_steps,
                             batch=case.train_batch, device=device)
    train_s = time.perf_counter() - t0
    out = compare(module, case.arch, x, y, device=device, batch_size=case.batch)
    (_, first_s, ours), (_, second_s, _), (_, ref_s, theirs) = out["calls"]
    rec = kit.record("imported", {
        "case": name, **dataclasses.asdict(case), "torch_device": device,
        "train_s": train_s, "import_s": out["import_s"], "logit_gap": out["logit_gap"],
        "clean": {k: int(v.sum()) for k, v in out["clean"].items()},
        "jaxdef_s_with_compile": first_s, "jaxdef_s": second_s, "pyautoattack_s": ref_s,
        "jaxdef_robust": int(ours.sum()), "pyautoattack_robust": int(theirs.sum()),
        "robust_on_one_side_only": int(np.sum(ours != theirs)),
        "speedup_with_compile": ref_s / first_s, "speedup": ref_s / second_s})
    rows.append((name, case.arch, f"{case.size} px", rec["n"], rec["clean"]["jaxdef"],
                 rec["jaxdef_robust"], rec["pyautoattack_robust"], first_s, second_s, ref_s,
                 rec["speedup_with_compile"], rec["speedup"]))
    del module
    if device == "cuda":
      torch.cuda.empty_cache()
  kit.markdown("### AutoAttack standard (L-inf 8/255) on imported PyTorch models, jaxdef vs "
               "pyautoattack on the original (`benchmarks/bench_import_autoattack.py`)\n\n"
               + table(("case", "arch", "images", "n", "clean", "robust jaxdef",
                        "robust pyautoattack", "jaxdef s incl. compile", "jaxdef s",
                        "pyautoattack s", "speed-up incl. compile", "speed-up"), rows))


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

RUNNERS: dict[str, Callable[[Kit], None]] = {
    "throughput": throughput, "models": models_part, "extras": extras_part,
    "subset_table": subset_table,
    "autoattack": autoattack_part, "streamed": streamed_part, "imported": imported_part}
# A part of 'all' is not started with less time left (its cases check their own).
PART_MIN_S = {"throughput": 0, "models": 0, "extras": 0, "subset_table": 150, "autoattack": 150,
              "streamed": 60, "imported": 120}
# Parts recorded as done when they finish (subset_table resumes its own runs).
ONCE = ("autoattack", "streamed", "imported")


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.kit")
  p.add_argument("part", choices=PARTS + ("all",))
  p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU test)")
  p.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
  p.add_argument("--work", default=str(ROOT / "gpu_work"),
                 help="run directories (git-ignored, kept between calls on a warm machine)")
  p.add_argument("--data", default=str(ROOT / ".gpu/data/cifar10_subset.npz"))
  p.add_argument("--budget_s", type=float, default=500.0,
                 help="every part ends by then (seconds from the start)")
  p.add_argument("--redo", action="store_true",
                 help="repeat the cases and parts an earlier call with this --work finished "
                      "(by default a second 'all' goes on where the first stopped)")
  p.add_argument("--variants", default="",
                 help=f"subset_table rows, comma-separated (of {', '.join(SUBSET_VARIANTS)}; "
                      f"default {','.join(DEFAULT_SUBSET)})")
  p.add_argument("--cases", default="",
                 help=f"throughput and models cases, comma-separated (of "
                      f"{', '.join([*THROUGHPUT_CASES, *MODEL_CASES, *EXTRA_CASES])}, trace; "
                      "default all)")
  args = p.parse_args(argv)
  variants = tuple(v for v in args.variants.split(",") if v)
  cases = tuple(c for c in args.cases.split(",") if c)
  known = {*THROUGHPUT_CASES, *SMOKE_CASES, *MODEL_CASES, *SMOKE_MODEL_CASES, *EXTRA_CASES,
           "trace"}
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
  if args.part == "all" and not variants and not args.smoke:
    variants = ALL_SUBSET
  start = time.monotonic()
  kit = Kit(out=out, work=work, data=data if data.exists() else None, smoke=args.smoke,
            deadline=start + args.budget_s, variants=variants, cases=cases, redo=args.redo)
  env = kit.record("environment", environment())
  kit.markdown(f"## {env['device_kind']} ({env['backend']}), {env['date']}\n\n"
               f"python {env['python']}, " + ", ".join(f"{k} {v}" for k, v in
                                                      env["versions"].items()))
  parts = PARTS if args.part == "all" else (args.part,)
  failed = 0
  for part in parts:
    # 'all' runs the parts in order while the budget lasts; a second call with
    # the same --work goes on with what the first did not finish.
    if args.part == "all" and kit.is_done(f"part:{part}"):
      kit.record(part, {"skipped": "done in an earlier call (--redo repeats it)"})
      continue
    if kit.left() <= (PART_MIN_S[part] if args.part == "all" and not kit.smoke else 0):
      kit.record(part, {"skipped": "time budget spent"})
      continue
    if part in ("subset_table", "autoattack", "imported") and kit.data is None:
      kit.record(part, {"skipped": f"no data at {args.data} (run prepare.sh)"})
      continue
    t0 = time.perf_counter()
    try:
      RUNNERS[part](kit)
      if part in ONCE:
        kit.mark_done(f"part:{part}")
    except Exception as e:
      failed += 1
      kit.record(part, {"error": f"{type(e).__name__}: {e}"})
    kit.record(part, {"part_seconds": time.perf_counter() - t0})
    kit.pack_logs()
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
