"""Throughput of adversarial training and PGD evaluation: ``python -m benchmarks.bench``.

For each model x defense (issue 7) it times, after compilation, the step that
training runs (PGD-``pgd_steps`` AT + one SGD update, docs/methods.md section 0;
with CAS or FSR their variant, sections 1-2) and the evaluation step
(clean + PGD-``eval_steps``), and prints one JSON line per case::

  python -m benchmarks.bench --model resnet18 --batch 64 --defense none,cas,fsr --iters 5
  python -m benchmarks.bench --model small_cnn --batch 128 --compare torch

(from the repository root: ``benchmarks`` is not part of the installed
``jaxdef`` package, which never imports PyTorch or this folder.)

The steps are built by the real code path: a config (``base_config()`` with
the flags set, validated) -> :func:`jaxdef.build.build` ->
:func:`jaxdef.train.loop.jit_steps` (``make_train_step`` / ``make_eval_step``
jitted over the ``data`` mesh, the state replicated and donated), on
synthetic uint8 images and labels (same batch every iteration; the step
counter, hence augmentation and attack randomness, advances).

Fields of a line:

* case: ``kind`` (train | eval), ``model``, ``defense``, ``dtype``, ``batch``,
  ``steps`` (PGD iterations), ``image_shape``, ``unroll`` (of the PGD loop
  as compiled), ``backend``, ``device_kind``, ``devices``, ``iters``.
* ``images_per_s`` = batch / ``step_ms``; ``step_ms`` is the median wall
  time of ``iters`` calls, each waited for (``block_until_ready``), after one
  untimed warm-up call.
* ``compile_s``: ``lower(...).compile()`` wall time (tracing included).
* ``peak_memory_bytes``: the device's ``peak_bytes_in_use`` where
  ``memory_stats()`` has it (GPU/TPU; since process start, so cumulative over
  the cases of one run); on CPU the process peak RSS (``ru_maxrss``: also
  cumulative, and includes PyTorch when comparing). ``peak_memory_source``
  says which. ``xla_memory_bytes`` is the compiled program's own footprint
  (arguments + outputs + temporaries - aliased, ``memory_analysis()``).
* ``flops_per_example``: XLA's cost analysis of the step / batch. XLA counts
  a ``while`` body once whatever its trip count, so when the PGD loop is
  compiled rolled (accelerators) the count comes from the same step with the
  loop fully unrolled and lowered (``flops_source`` 'lowered_unrolled'); on an
  accelerator always from XLA:CPU's count in a CPU-only subprocess
  ('cpu_lowered_unrolled', see :func:`unrolled_flops`); otherwise from the
  compiled program ('compiled').
* ``mfu``: flops_per_example x images_per_s / (devices x peak FLOP/s). Peaks
  (:data:`PEAK_TFLOPS`) are the vendors' dense tensor-core figures; float32
  uses the TF32 figure, the precision JAX's default gives float32 matmuls
  and convolutions on these GPUs. On CPU ``mfu`` is null unless
  ``--cpu_peak_gflops`` is given (no reliable peak for a shared VM).
* with ``--compare torch`` (defense none and objective at only; others have
  no twin and get ``torch_note``): ``torch_modes``, per PyTorch mode of
  ``--torch_modes`` (eager, and ``torch.compile``'s default, reduce-overhead,
  max-autotune) its ``images_per_s``, ``step_ms`` and ``compile_s`` (the
  first call, which compiles, less a compiled call); ``torch_best_mode``,
  ``torch_images_per_s`` and ``torch_step_ms`` of the fastest, ``ratio`` =
  jaxdef images/s over that best PyTorch figure, ``torch_settings``; see
  :mod:`benchmarks.bench_torch` for the PyTorch step. A mode that fails is
  recorded with its ``error``, a compiled mode whose attack gradient differs
  from eager's (``gradient_check``) is recorded; both are left out of the best.
* ``flops_per_example`` counts the model's FLOPs: with ``remat`` in the model
  kwargs the count is the plain model's (recomputation is not useful work).

Printed ratios only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from jaxdef.attacks.pgd import loop_unroll
from jaxdef.build import DataMeta, build
from jaxdef.config import DTYPES, validate
from jaxdef.config import base_config
from jaxdef.errors import ConfigError, unknown_name

# The repository root (this file is benchmarks/bench.py).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KINDS = ("train", "eval")
COMPARE = ("none", "torch")
# The PyTorch twin's modes (benchmarks/bench_torch.py, which imports torch: named here
# so that a bad --torch_modes is refused without PyTorch installed).
TORCH_MODES = ("eager", "default", "reduce-overhead", "max-autotune")
# Dense peak TFLOP/s per GPU (NVIDIA datasheets), by a substring of
# ``device.device_kind``, first match wins; float32 = TF32 tensor cores.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("H100 PCIe", {"bfloat16": 756.5, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
)


# ----------------------------------------------------------------------------
# Config and set-up: the real code path on synthetic data.

def bench_config(*, model: str, defense: str, batch: int, pgd_steps: int, eval_steps: int,
                 dtype: str, augment: str, unroll: int = 0,
                 model_kwargs: Optional[dict] = None, objective: str = "at",
                 eps: Optional[float] = None, step_size: Optional[float] = None,
                 cast_params_once: bool = False,
                 image_size: int = 0) -> ml_collections.ConfigDict:
  """``base_config()`` (CIFAR PGD-AT recipe: eps 8/255, step 2/255, SGD) with
  the benchmark's choices; validated, so a bad value is one ConfigError line.
  ``eps`` / ``step_size`` None keep the recipe's (FGSM-RS: ``pgd_steps`` 1,
  ``step_size`` 1.25 eps). ``augment`` 'rrc_flip' (the host crops ImageNet-size
  images; the step augments nothing) declares ``image_size`` px images."""
  c = base_config()
  c.model.name = model
  c.model.kwargs = dict(model_kwargs or {})
  c.defense.name = defense
  c.objective.name = objective
  if eps is not None:
    c.attack.eps = eps
  if step_size is not None:
    c.attack.step_size = step_size
  c.train.cast_params_once = cast_params_once
  c.data.augment = augment
  if augment == "rrc_flip":
    c.data.image_size = image_size
  c.attack.steps = pgd_steps
  c.attack.unroll = unroll
  c.train.batch_size = c.train.eval_batch_size = batch
  c.train.eval_pgd_steps = eval_steps
  c.train.dtype = dtype
  validate(c, jax.device_count())
  return c


def synthetic_meta(image_shape: Sequence[int], num_classes: int) -> DataMeta:
  """Data metadata of the synthetic set (CIFAR-like statistics; values do not
  change the cost)."""
  channels = int(image_shape[-1])
  return DataMeta(name="synthetic", num_classes=num_classes,
                  image_shape=tuple(int(s) for s in image_shape),
                  mean=(0.5,) * channels, std=(0.25,) * channels)


def synthetic_batch(batch: int, meta: DataMeta, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(batch, H, W, C) uint8 images and (batch,) int32 labels."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (batch, *meta.image_shape), dtype=np.uint8)
  return x, rng.integers(0, meta.num_classes, (batch,)).astype(np.int32)


class Prepared:
  """A built run: model, jitted steps, initial state and one sharded batch.

  ``abstract``: the state is only shapes and dtypes (``jax.eval_shape``), for
  lowering without compiling or running anything.
  """

  def __init__(self, config: ml_collections.ConfigDict, meta: DataMeta, *,
               abstract: bool = False):
    from jaxdef.train.loop import jit_steps
    from jaxdef.train.mesh import batch_sharded, data_mesh
    from jaxdef.train.state import init_train_state, make_optimizer
    from jaxdef.train.step import INIT_STREAM, stream_key
    self.config, self.meta = config, meta
    mesh = data_mesh()
    self.model, objective, defense = build(config, meta)
    steps_per_epoch = 1000  # only places the (unreached) learning-rate milestones
    tx = make_optimizer(config.train.optimizer, 100 * steps_per_epoch, steps_per_epoch)
    self.train_step, self.eval_step = jit_steps(
        config, model=self.model, objective=objective, defense=defense, tx=tx, mesh=mesh,
        steps_per_epoch=steps_per_epoch)
    # LLVM's optimisation of the init program (run once, not timed) takes most
    # of its compile time on XLA:CPU (small CNN: 18 s -> 3 s under load at level 0).
    fast = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    from jaxdef.train.free import free_replays, state_sharding
    free = free_replays(config.attack) > 1  # Free-m: the state carries its perturbation
    init = jax.jit(lambda: init_train_state(
        self.model, tx, stream_key(config.seed, INIT_STREAM), image_shape=meta.image_shape,
        free_batch=config.train.batch_size * free),
        out_shardings=state_sharding(mesh, free), compiler_options=fast)
    self.state = jax.eval_shape(init) if abstract else init()
    self.images, self.labels = synthetic_batch(config.train.batch_size, meta)
    shard = batch_sharded(mesh)
    mask = np.ones(config.train.batch_size, bool)
    self.batch = tuple(jax.device_put(a, shard) for a in (self.images, self.labels, mask))

  def args(self, kind: str) -> tuple:
    x, y, mask = self.batch
    return (x, y) if kind == "train" else (x, y, mask, np.int32(0), np.int32(0))

  def jitted(self, kind: str) -> Callable:
    return self.train_step if kind == "train" else self.eval_step


# ----------------------------------------------------------------------------
# Measurements.

def cost_flops(cost: Any) -> float:
  """FLOPs from ``cost_analysis()`` (a dict, or a one-element list of dicts)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def loop_is_unrolled(unroll: int, steps: int) -> bool:
  """Whether a PGD loop of ``steps`` compiles without a ``while`` (config
  ``attack.unroll``; 0 = by backend)."""
  u = loop_unroll(unroll or None, steps)
  return u is True or (not isinstance(u, bool) and u >= steps)


def peak_memory() -> tuple[int, str]:
  """(bytes, source): device ``peak_bytes_in_use`` if reported, else process peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  # Linux reports ru_maxrss in KiB.
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def peak_flops(device_kind: str, dtype: str, backend: str,
               cpu_peak_gflops: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one device for ``dtype`` (None when unknown)."""
  if backend == "cpu":
    return cpu_peak_gflops * 1e9 if cpu_peak_gflops > 0 else None
  for needle, peaks in PEAK_TFLOPS:
    if needle.lower() in device_kind.lower():
      return peaks[dtype] * 1e12
  return None


def median_seconds(call: Callable[[], Any], iters: int) -> float:
  """Median wall time of ``iters`` calls (each result waited for) after one warm-up."""
  jax.block_until_ready(call())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_jax(prepared: Prepared, kind: str, iters: int) -> dict[str, Any]:
  """Compiles and times ``kind`` ('train' | 'eval'); returns the case's figures."""
  args = prepared.args(kind)
  t0 = time.perf_counter()
  compiled = prepared.jitted(kind).lower(prepared.state, *args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  xla_bytes = None if mem is None else int(
      mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes)
  flops = cost_flops(compiled.cost_analysis())
  if kind == "train":
    def call():
      prepared.state, metrics = compiled(prepared.state, *args)
      return metrics
  else:
    def call():
      return compiled(prepared.state, *args)
  seconds = median_seconds(call, iters)
  return {"compile_s": compile_s, "seconds": seconds, "flops": flops,
          "xla_memory_bytes": xla_bytes}


def unrolled_flops(config: ml_collections.ConfigDict, meta: DataMeta,
                   kind: str) -> tuple[float, str]:
  """(FLOPs, source) of the step with its PGD loop fully unrolled, as XLA:CPU
  counts the lowered program (nothing compiled).

  On CPU the count is taken in this process ('lowered_unrolled'). On an
  accelerator it is taken in a CPU-only subprocess (``--flops_only`` under
  ``JAX_PLATFORMS=cpu``; 'cpu_lowered_unrolled'): jax 0.11's CUDA plugin
  returns no count for a lowered program, and its count of the compiled one
  leaves out the cuDNN convolutions (H200: 0.58 GFLOP per example for a
  WRN-34-10 PGD-10 step that XLA:CPU counts in the hundreds).
  """
  if jax.default_backend() != "cpu":
    return cached_cpu_flops(tuple(case_argv(config, meta, kind))), "cpu_lowered_unrolled"
  full = config.copy_and_resolve_references()
  full.attack.unroll = max(config.attack.steps, config.train.eval_pgd_steps)
  prepared = Prepared(full, meta, abstract=True)
  lowered = prepared.jitted(kind).lower(prepared.state, *prepared.args(kind))
  return cost_flops(lowered.cost_analysis()), "lowered_unrolled"


def case_argv(config: ml_collections.ConfigDict, meta: DataMeta, kind: str) -> list[str]:
  """The command-line flags that rebuild ``config`` / ``meta`` (one ``kind``)."""
  height, _, channels = meta.image_shape
  return ["--model", config.model.name, "--model_kwargs", json.dumps(config.model.kwargs.to_dict()),
          "--defense", config.defense.name, "--objective", config.objective.name,
          "--kind", kind, "--batch", str(config.train.batch_size),
          "--pgd_steps", str(config.attack.steps), "--eps", repr(config.attack.eps),
          "--step_size", repr(config.attack.step_size),
          "--eval_steps", str(config.train.eval_pgd_steps), "--dtype", config.train.dtype,
          "--image_size", str(height), "--channels", str(channels),
          "--num_classes", str(meta.num_classes), "--augment", config.data.augment]


# The batch at which an accelerator's FLOPs per example are counted: every
# term of the step but the optimizer update (a few FLOPs per parameter, under
# 0.1% here) grows with the batch, so the count per example is the same.
FLOPS_BATCH = 16


def model_flops_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` as its model FLOPs are counted: at :data:`FLOPS_BATCH` (at most
  the batch) and without rematerialisation (recomputation is not useful work)."""
  counted = config.copy_and_resolve_references()
  counted.train.batch_size = counted.train.eval_batch_size = min(
      FLOPS_BATCH, config.train.batch_size)
  counted.model.kwargs = {k: v for k, v in config.model.kwargs.items() if k != "remat"}
  return counted


@functools.lru_cache(maxsize=None)
def cached_cpu_flops(argv: tuple[str, ...]) -> float:
  """:func:`cpu_flops_in_subprocess` of one flag list, counted once per process
  (the kit's cases share a model at several batch sizes and with remedies)."""
  return count_in_subprocess(list(argv))


def cpu_flops_in_subprocess(config: ml_collections.ConfigDict, meta: DataMeta,
                            kind: str) -> float:
  """:func:`unrolled_flops` of the same case, counted by a CPU-only process."""
  return count_in_subprocess(case_argv(config, meta, kind))


def count_in_subprocess(argv: list[str]) -> float:
  """FLOPs of the case ``argv`` (:func:`case_argv`) by ``--flops_only`` under
  ``JAX_PLATFORMS=cpu``."""
  import subprocess
  # ``-m benchmarks.bench`` resolves from the repository root, whatever the
  # caller's working directory.
  command = [sys.executable, "-m", "benchmarks.bench", "--flops_only", *argv]
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path})
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"FLOP count on CPU failed: {done.stderr.strip().splitlines()[-1:]}")
  return float(json.loads(lines[-1])["flops"])


def time_torch(prepared: Prepared, kind: str, iters: int, layout: str,
               mode: str = "eager") -> dict[str, Any]:
  """The PyTorch twin of the same step on the same batch (defense 'none'),
  run as ``mode`` (:data:`benchmarks.bench_torch.TORCH_MODES`). ``compile_s``:
  the first call (torch.compile compiles then) less the median call."""
  from benchmarks import bench_torch as bt
  config = prepared.config
  settings = bt.default_settings(config.train.dtype, layout, mode)
  variables = {"params": prepared.state.params, "batch_stats": prepared.state.batch_stats}
  net = bt.prepare(prepared.model, jax.device_get(variables), prepared.meta.image_shape,
                   settings)
  x, y = bt.to_device(prepared.images, prepared.labels, settings)
  att, opt = config.attack, config.train.optimizer
  if kind == "train":
    step = bt.make_train_step(net, eps=att.eps, step_size=att.step_size, steps=att.steps,
                              lr=opt.lr, momentum=opt.momentum,
                              weight_decay=opt.weight_decay, augment=config.data.augment,
                              settings=settings)
  else:
    step = bt.make_eval_step(net, eps=att.eps, step_size=config.train.eval_pgd_step_size,
                             steps=config.train.eval_pgd_steps, settings=settings)

  def call():
    step(x, y)
    bt.synchronize(settings)
  t0 = time.perf_counter()
  call()
  first = time.perf_counter() - t0
  if mode != "eager":  # CUDA graph trees record on a later call than the first
    call()
  seconds = median_seconds(call, iters)
  compile_s = None if mode == "eager" else max(0.0, first - seconds)
  out = {"seconds": seconds, "compile_s": compile_s, "settings": settings.describe(),
         "version": bt.torch.__version__}
  if mode != "eager":  # the compiled network must compute the eager one's attack
    out["gradient_check"] = bt.gradient_check(net, net._orig_mod, bt._to_input(x, settings),
                                              y, settings)
  return out


def compare_torch(prepared: Prepared, kind: str, iters: int, layout: str,
                  modes: Sequence[str]) -> dict[str, Any]:
  """The record's PyTorch fields: every mode of ``modes``, then the best."""
  batch = prepared.config.train.batch_size
  per_mode: dict[str, dict[str, Any]] = {}
  for mode in modes:
    try:
      th = time_torch(prepared, kind, iters, layout, mode)
    except Exception as e:  # one failing mode (a compiler error) must not cost the others
      per_mode[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
      continue
    per_mode[mode] = {"images_per_s": batch / th["seconds"], "step_ms": 1e3 * th["seconds"],
                      "compile_s": th["compile_s"], "settings": th["settings"],
                      "version": th["version"]}
    if "gradient_check" in th:
      per_mode[mode]["gradient_check"] = th["gradient_check"]
  # A mode whose attack gradient differs from eager's does not run the same step.
  timed = {m: r for m, r in per_mode.items() if "images_per_s" in r
           and r.get("gradient_check", {}).get("matches_eager", True)}
  out: dict[str, Any] = {"torch_modes": per_mode}
  if timed:
    best = max(timed, key=lambda m: timed[m]["images_per_s"])
    out.update(torch_best_mode=best, torch_images_per_s=timed[best]["images_per_s"],
               torch_step_ms=timed[best]["step_ms"], torch_compile_s=timed[best]["compile_s"],
               torch_settings=timed[best]["settings"], torch_version=timed[best]["version"])
  return out


def run_case(prepared: Prepared, kind: str, *, iters: int, compare: str,
             cpu_peak_gflops: float, torch_layout: str,
             torch_modes: Sequence[str] = ("eager",),
             flops_per_example: float = 0.0) -> dict[str, Any]:
  """One JSON record: the case, the jaxdef figures and (optionally) PyTorch's.
  ``flops_per_example`` > 0: taken as given (counted by an earlier run of the
  same model and attack) instead of counted."""
  config, meta = prepared.config, prepared.meta
  batch = config.train.batch_size
  steps = config.attack.steps if kind == "train" else config.train.eval_pgd_steps
  unrolled = loop_is_unrolled(config.attack.unroll, steps)
  device = jax.devices()[0]
  jx = time_jax(prepared, kind, iters)
  remat = bool(config.model.kwargs.get("remat", False))
  if flops_per_example > 0:
    flops_source = "given"
  elif unrolled and device.platform == "cpu" and not remat:
    flops_per_example, flops_source = jx["flops"] / batch, "compiled"
  else:
    counted = model_flops_config(config)
    flops, flops_source = unrolled_flops(counted, meta, kind)
    flops_per_example = flops / counted.train.batch_size
  peak = peak_flops(device.device_kind, config.train.dtype, device.platform, cpu_peak_gflops)
  images_per_s = batch / jx["seconds"]
  memory, memory_source = peak_memory()
  record = {
      "kind": kind, "model": config.model.name, "model_kwargs": config.model.kwargs.to_dict(),
      "defense": config.defense.name, "objective": config.objective.name,
      "eps": config.attack.eps, "step_size": config.attack.step_size,
      "cast_params_once": bool(config.train.cast_params_once),
      "dtype": config.train.dtype, "batch": batch, "steps": steps,
      "image_shape": list(meta.image_shape), "augment": config.data.augment,
      "unroll": loop_unroll(config.attack.unroll or None, steps),
      "backend": device.platform, "device_kind": device.device_kind,
      "devices": jax.device_count(), "iters": iters,
      "images_per_s": images_per_s, "step_ms": 1e3 * jx["seconds"],
      "compile_s": jx["compile_s"],
      "peak_memory_bytes": memory, "peak_memory_source": memory_source,
      "xla_memory_bytes": jx["xla_memory_bytes"],
      "flops_per_example": flops_per_example,
      "flops_source": flops_source,
      "peak_flops": peak,
      "mfu": None if peak is None else flops_per_example * images_per_s / (
          peak * jax.device_count()),
      "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_avg_1min": os.getloadavg()[0],
  }
  if compare == "torch":
    note = torch_missing(prepared)
    if note:
      record["torch_note"] = note
    else:
      record.update(compare_torch(prepared, kind, iters, torch_layout, torch_modes))
      if "torch_images_per_s" in record:
        record["ratio"] = images_per_s / record["torch_images_per_s"]
  return record


def torch_missing(prepared: Prepared) -> str:
  """Why the case has no PyTorch twin ('' when it has one)."""
  from benchmarks import bench_torch as bt
  config = prepared.config
  if config.defense.name != "none":
    return f"no PyTorch twin of defense {config.defense.name!r}"
  if config.objective.name != "at":
    return f"no PyTorch twin of objective {config.objective.name!r}"
  if config.model.kwargs.get("remat"):
    return "no PyTorch twin with rematerialisation"
  from jaxdef.models.resnet import ResNet50
  if isinstance(prepared.model, ResNet50):
    from benchmarks.torch_references import MissingReference, definitions
    try:
      definitions("torchvision.models.resnet")
    except MissingReference:
      return "no torchvision installed for the ResNet-50 twin"
    return ""
  try:
    bt.torch_twin(prepared.model, prepared.meta.image_shape)
  except NotImplementedError as e:
    return str(e)
  return ""


# ----------------------------------------------------------------------------
# Command line.

def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  for n in names:
    if n not in valid:
      raise unknown_name(what, n, valid)
  if not names:
    raise ConfigError(f"--{what}: give at least one of {', '.join(valid)}")
  return names


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                              description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet18",
                 help="comma list: small_cnn, resnet18, wrn34_10, ... (the model registry)")
  p.add_argument("--model_kwargs", default="{}", help="JSON, e.g. '{\"width\": 0.25}'")
  p.add_argument("--defense", default="none", help="comma list: none, cas, fsr")
  p.add_argument("--objective", default="at", help="at | trades | mart (the training objective)")
  p.add_argument("--kind", default="train,eval", help="comma list: train, eval")
  p.add_argument("--batch", type=int, default=128, help="global batch size")
  p.add_argument("--pgd_steps", type=int, default=10, help="training attack iterations")
  p.add_argument("--eps", type=float, default=None, help="attack radius (default 8/255)")
  p.add_argument("--step_size", type=float, default=None,
                 help="training attack step (default 2/255; FGSM-RS: --pgd_steps 1 and 1.25 eps)")
  p.add_argument("--cast_params_once", action="store_true",
                 help="train.cast_params_once: the attacks read weights cast once per step")
  p.add_argument("--eval_steps", type=int, default=20, help="evaluation PGD iterations")
  p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (compute dtype)")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--num_classes", type=int, default=10)
  p.add_argument("--augment", default="crop_flip",
                 help="none | crop_flip (in the step) | rrc_flip (on the host: none in the step)")
  p.add_argument("--unroll", type=int, default=0,
                 help="attack.unroll: PGD loop unrolling (0 = by backend)")
  p.add_argument("--iters", type=int, default=5, help="timed calls per case (median)")
  p.add_argument("--compare", default="none", help="none | torch")
  p.add_argument("--torch_layout", default="auto",
                 help="auto (channels_last on CUDA) | nchw | nhwc")
  p.add_argument("--torch_modes", default="eager",
                 help="comma list of eager, default, reduce-overhead, max-autotune "
                      "(torch.compile modes of the twin; the ratio is against the fastest)")
  p.add_argument("--cpu_peak_gflops", type=float, default=0.0,
                 help="peak of the whole CPU, to report mfu on CPU (0: mfu null)")
  p.add_argument("--flops_per_example", type=float, default=0.0,
                 help="the step's FLOPs per example when already counted (0: count them)")
  p.add_argument("--flops_only", action="store_true",
                 help="print each case's unrolled FLOP count (no timing; how an "
                      "accelerator run counts FLOPs, under JAX_PLATFORMS=cpu)")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  """Runs every case; prints and returns one record per case."""
  from jaxdef.models.registry import model_names
  from jaxdef.defenses import defense_names
  args = parse_args(argv)
  models = _names(args.model, model_names(), "model")
  defenses = _names(args.defense, defense_names(), "defense")
  kinds = _names(args.kind, KINDS, "kind")
  if args.dtype not in DTYPES:
    raise unknown_name("dtype", args.dtype, DTYPES)
  if args.compare not in COMPARE:
    raise unknown_name("compare", args.compare, COMPARE)
  torch_modes = _names(args.torch_modes, TORCH_MODES, "torch_modes")
  if args.torch_layout not in ("auto", "nchw", "nhwc"):
    raise unknown_name("torch_layout", args.torch_layout, ("auto", "nchw", "nhwc"))
  for flag in ("iters", "image_size", "channels", "num_classes", "eval_steps"):
    if getattr(args, flag) < 1:
      raise ConfigError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
  try:
    model_kwargs = json.loads(args.model_kwargs)
  except json.JSONDecodeError as e:
    raise ConfigError(f"--model_kwargs is not JSON ({e})") from None
  meta = synthetic_meta((args.image_size, args.image_size, args.channels), args.num_classes)
  records = []
  for model in models:
    for defense in defenses:
      config = bench_config(model=model, defense=defense, batch=args.batch,
                            pgd_steps=args.pgd_steps, eval_steps=args.eval_steps,
                            dtype=args.dtype, augment=args.augment, unroll=args.unroll,
                            model_kwargs=model_kwargs, objective=args.objective,
                            eps=args.eps, step_size=args.step_size,
                            cast_params_once=args.cast_params_once,
                            image_size=args.image_size)
      if args.flops_only:
        for kind in kinds:
          flops, source = unrolled_flops(config, meta, kind)
          record = {"model": model, "defense": defense, "kind": kind, "flops": flops,
                    "flops_source": source}
          print(json.dumps(record), flush=True)
          records.append(record)
        continue
      prepared = Prepared(config, meta)
      for kind in kinds:
        record = run_case(prepared, kind, iters=args.iters, compare=args.compare,
                          cpu_peak_gflops=args.cpu_peak_gflops,
                          torch_layout=args.torch_layout, torch_modes=torch_modes,
                          flops_per_example=args.flops_per_example)
        print(json.dumps(record), flush=True)
        records.append(record)
  return records


if __name__ == "__main__":
  try:
    main()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
