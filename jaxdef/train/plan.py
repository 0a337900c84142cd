"""Planning a TPU run on a host without one: ``jaxdef plan --config NAME --topology v5e:4x4``.

libtpu (``pip install 'jax[tpu]'``) describes a TPU slice that this host does
not have (:func:`jax.experimental.topologies.get_topology_desc`) and compiles
for it. The run's own steps, :func:`jaxdef.train.loop.jit_steps` over
:func:`jaxdef.train.mesh.data_mesh` of the slice's devices, are lowered on
abstract inputs (shapes, dtypes and shardings: nothing is allocated) and
compiled by the TPU compiler. From each compiled step, per chip:

* memory: ``memory_analysis()``: arguments, temporaries, outputs (less what
  the outputs reuse of donated arguments), code; fits when it is within the
  chip's HBM. A program that cannot fit is refused by the compiler itself,
  and its message is shown.
* gradient all-reduce: the bytes that the compiled program's all-reduce
  operations carry per step (logical shapes, tiles' padding left out), read
  from its HLO; operations inside a loop are counted apart.
* FLOPs per step: XLA's count of the step with its PGD loops unrolled,
  lowered on this host, divided over the chips, the count
  ``benchmarks/bench.py`` reports MFU with. The TPU program's own
  ``cost_analysis()`` is not used for it: it counts a ``while`` body once,
  whatever its trip count, so it leaves out 9 of PGD-10's 10 iterations.
* step time at the chip's peak: FLOPs / the chip's dense bf16 peak (the
  float32 configs too: TPU matrix units multiply float32 operands in bf16
  passes at JAX's default precision). A lower bound, never a prediction.

Chips (:data:`CHIPS`): dense bf16 peak and HBM per chip from Google's Cloud
TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
v4 275 TFLOP/s, 32 GiB; v5e 197 TFLOP/s, 16 GB; v5p 459 TFLOP/s, 95 GB; v6e
918 TFLOP/s, 32 GB. The table counts HBM in GiB, as the TPU compiler does:
it gives a program 15.75 GiB of a v5e, 95.73 of a v5p, 30.75 of a v4 and
31.24 of a v6e (libtpu 0.0.50), and refuses what needs more.

Tracing happens on this host, so the two choices jaxdef makes by backend
follow the TPU's where they change the program: PGD loops stay rolled
(``attack.unroll`` 0 means 1 here, as :func:`jaxdef.attacks.pgd.loop_unroll`
picks on an accelerator). The evaluation's PGD still goes through the CPU's
convolution-layout rewrite (:mod:`jaxdef.attacks.conv_layout`), which gives
the same values and FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdef.build import DataMeta, build
from jaxdef.config import validate
from jaxdef.errors import ConfigError
from jaxdef.train.free import abstract_state, free_replays
from jaxdef.train.loop import jit_steps
from jaxdef.train.mesh import batch_sharded, data_mesh, replicated
from jaxdef.train.state import init_train_state, make_optimizer
from jaxdef.train.step import INIT_STREAM, stream_key

GIB = 2 ** 30
KINDS = ("train", "eval")
# Only places the learning-rate milestones and the eps warm-up: values, not shapes.
STEPS_PER_EPOCH = 1000


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: its name in topology names, ``device_kind``, HBM and peak."""
  name: str
  device_kind: str
  hbm_bytes: int
  peak_bf16_flops: float


CHIPS = (
    Chip("v4", "TPU v4", 32 * GIB, 275e12),
    Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12),
    Chip("v5p", "TPU v5", 95 * GIB, 459e12),
    Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12),
)


def chip_of(device_kind: str) -> Optional[Chip]:
  """The :class:`Chip` of a device's ``device_kind`` (None for one not in :data:`CHIPS`)."""
  return next((c for c in CHIPS if c.device_kind == device_kind), None)


# ----------------------------------------------------------------------------
# The slice.

def install_hint() -> str:
  """How to get libtpu for the installed jax, in one line."""
  return (f"jaxdef plan compiles with libtpu, which is not installed: pip install "
          f"'jax[tpu]=={jax.__version__}' (about 640 MB; it installs the libtpu this jax "
          f"pairs with)")


def libtpu_version() -> Optional[str]:
  """The installed libtpu's version, or None."""
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


@contextlib.contextmanager
def quiet_stderr():
  """File descriptor 2 sent to /dev/null: libtpu prints warnings there about the
  TPU VM it is not on (accelerator type, worker hostnames) while it starts."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def topology_devices(name: str) -> list:
  """The devices of TPU topology ``name`` (``'v5e:2x4'``, ``'v5p:2x2x1'``), from
  libtpu: one per chip (chips with two cores, v4, as one "megacore" device, as
  JAX meshes want them).

  One-line :class:`ConfigError` without libtpu, for a name it rejects, or
  while another process holds libtpu.
  """
  if libtpu_version() is None:
    raise ConfigError(install_hint())
  from jax.experimental import topologies
  try:
    with quiet_stderr():
      devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
      if any(getattr(d, "core_on_chip", 0) for d in devices):
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                               chip_config_name="megacore").devices
  except Exception as e:  # JaxRuntimeError from libtpu, with its own message
    text = " ".join(str(e).split())
    if "lockfile" in text:
      raise ConfigError("another process is using libtpu (/tmp/libtpu_lockfile): wait for "
                        "it, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 on a host with no TPU in use"
                        ) from None
    raise ConfigError(f"--topology {name}: libtpu does not accept it ({text[:300]}); "
                      f"names look like v5e:2x4, v5p:2x2x1, v4:2x2x2, v6e:4x4") from None
  return list(devices)


# ----------------------------------------------------------------------------
# The data's shape, without reading the data.

def plan_meta(data_config: ml_collections.ConfigDict) -> DataMeta:
  """What the model needs to know of ``config.data``, as cheaply as it can be had.

  TFDS datasets: the image shape from TFDS's description of the dataset
  (nothing read or downloaded) and jaxdef's statistics; an imported folder
  (``arrayrecord``): its metadata file; the rest (the embedded MNIST5k, an
  ``.npz``): loaded. ``data.image_size`` is applied as training applies it.
  """
  from jaxdef.data import load_dataset, records
  from jaxdef.data.streamed import output_shape
  from jaxdef.data.tfds_source import SPECS
  name = data_config.get("name")
  if name in SPECS:
    import tensorflow_datasets as tfds
    spec = SPECS[name]
    features = tfds.builder(name, data_dir=data_config.get("data_dir") or None).info.features
    stored = tuple(int(s) for s in features[spec.image_key].shape)
    return DataMeta(name=name, num_classes=spec.num_classes,
                    image_shape=output_shape(data_config, stored, stored[-1], name),
                    mean=spec.mean, std=spec.std)
  if name == "arrayrecord":
    meta = records.read_metadata(data_config.get("path", ""))
    shape = output_shape(data_config, meta.image_shape, meta.channels, data_config.path)
    return DataMeta(name=name, num_classes=meta.num_classes, image_shape=shape,
                    mean=meta.mean, std=meta.std)
  return DataMeta.from_dataset(load_dataset(data_config))


# ----------------------------------------------------------------------------
# What the compiled program says.

@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per chip of a compiled program (``memory_analysis()``)."""
  arguments: int
  temporaries: int
  outputs: int
  aliased: int  # outputs written into donated arguments' buffers
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.temporaries + self.outputs - self.aliased + self.code

  @classmethod
  def of(cls, stats: Any) -> "Memory":
    return cls(arguments=int(stats.argument_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes),
               outputs=int(stats.output_size_in_bytes),
               aliased=int(stats.alias_size_in_bytes),
               code=int(stats.generated_code_size_in_bytes))


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([^ (]+)")
_ALL_REDUCE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) all-reduce(?:-start)?\(")
_LOOP_BODY = re.compile(r"\bbody=%([^ ,]+)")


def shapes_bytes(hlo_type: str) -> tuple[int, int]:
  """``(bytes, values)`` of the arrays an HLO result type names (a tuple or one array;
  layouts and tiles ignored)."""
  total = values = 0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype not in DTYPE_BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    total += n * DTYPE_BYTES[dtype]
    values += n
  return total, values


@dataclasses.dataclass(frozen=True)
class AllReduce:
  """What a program's all-reduce operations carry per chip: ``bytes``/``values``
  once per call of the program, ``loop_bytes`` per iteration of the loops they sit in."""
  bytes: int
  values: int
  ops: int
  loop_bytes: int


def all_reduce(hlo_text: str) -> AllReduce:
  """The all-reduce operations of a compiled program (``compiled.as_text()``).

  An operation in a ``while`` body (or in a computation only a loop body
  calls) runs once per iteration; it is counted in ``loop_bytes``.
  """
  computations: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = _HEADER.match(line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  bodies = {b for lines in computations.values() for l in lines for b in _LOOP_BODY.findall(l)}
  in_loop = set(bodies)
  grew = True
  while grew:  # what a loop body calls runs in the loop too
    calls = {c for name in in_loop for l in computations.get(name, ())
             for c in re.findall(r"%([\w.\-]+)", l) if c in computations}
    grew = not calls <= in_loop
    in_loop |= calls
  once = loop = values = ops = 0
  for name, lines in computations.items():
    for l in lines:
      m = _ALL_REDUCE.match(l)
      if m:
        size, n = shapes_bytes(m.group(1))
        if name in in_loop:
          loop += size
        else:
          once, values, ops = once + size, values + n, ops + 1
  return AllReduce(bytes=once, values=values, ops=ops, loop_bytes=loop)


# ----------------------------------------------------------------------------
# Compiling the steps.

@dataclasses.dataclass(frozen=True)
class StepPlan:
  """One compiled step on the slice; sizes per chip. ``refused``: the compiler's
  out-of-memory message (then ``memory`` and ``collectives`` are None)."""
  kind: str
  global_batch: int
  chips: int
  compile_s: float
  flops: float
  memory: Optional[Memory] = None
  collectives: Optional[AllReduce] = None
  refused: str = ""


def as_planned(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the PGD loops rolled as on an accelerator (``attack.unroll``
  0 is decided by backend, and this host is not the TPU)."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.attack.unroll = config.attack.unroll or 1
  return out


class Steps:
  """The run's jitted train and eval steps over ``devices`` and their abstract inputs."""

  def __init__(self, config: ml_collections.ConfigDict, meta: DataMeta, devices: Sequence):
    self.config = config
    self.mesh = data_mesh(devices)
    model, objective, defense = build(config, meta)
    tc = config.train
    tx = make_optimizer(tc.optimizer, int(tc.epochs * STEPS_PER_EPOCH), STEPS_PER_EPOCH,
                        trainable=tc.get("trainable", ""))
    smoothing = max(float(config.data.get("extra_label_smoothing", 0.0) or 0.0),
                    float(tc.get("label_smoothing", 0.0) or 0.0))
    # Which rows are smoothed, and by how much, does not change the program's cost.
    rows = np.full(tc.batch_size, smoothing, np.float32) if smoothing else None
    self.train_step, self.eval_step = jit_steps(
        config, model=model, objective=objective, defense=defense, tx=tx, mesh=self.mesh,
        steps_per_epoch=STEPS_PER_EPOCH, label_smoothing=rows)
    rep, shard = replicated(self.mesh), batch_sharded(self.mesh)
    free = free_replays(config.attack) > 1  # Free-m: the state carries a (batch, ...) delta
    state = jax.eval_shape(lambda: init_train_state(
        model, tx, stream_key(config.seed, INIT_STREAM), image_shape=meta.image_shape,
        free_batch=tc.batch_size * free))
    self.state = abstract_state(state, self.mesh)
    self.num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))

    def batch(size):
      return (jax.ShapeDtypeStruct((size, *meta.image_shape), jnp.uint8, sharding=shard),
              jax.ShapeDtypeStruct((size,), jnp.int32, sharding=shard))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    self.args = {
        "train": batch(tc.batch_size),
        "eval": (*batch(tc.eval_batch_size),
                 jax.ShapeDtypeStruct((tc.eval_batch_size,), jnp.bool_, sharding=shard),
                 scalar, scalar)}

  def lower(self, kind: str):
    step = self.train_step if kind == "train" else self.eval_step
    return step.lower(self.state, *self.args[kind])

  def batch_size(self, kind: str) -> int:
    return self.config.train.batch_size if kind == "train" else self.config.train.eval_batch_size


def step_flops(config: ml_collections.ConfigDict, meta: DataMeta, kind: str) -> float:
  """XLA's FLOP count of one ``kind`` step over the global batch, its PGD loops
  unrolled, lowered (not compiled) for this host's CPU."""
  full = ml_collections.ConfigDict(config.to_dict())
  full.attack.unroll = max(config.attack.steps, config.train.eval_pgd_steps)
  steps = Steps(full, meta, jax.devices("cpu")[:1])
  cost = steps.lower(kind).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def out_of_memory(error: Exception) -> str:
  """The compiler's out-of-memory message in one line, or '' for another error."""
  text = " ".join(str(error).split())
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return ""
  found = re.search(r"(Ran out of memory.*?)(?:\. HLO module|$)", text, re.I)
  return (found.group(1) if found else text)[:400]


def compile_step(steps: Steps, kind: str, flops: float) -> StepPlan:
  """Compiles ``kind`` for the slice; an out-of-memory refusal becomes ``refused``."""
  chips = len(steps.mesh.devices.flat)
  t0 = time.perf_counter()
  lowered = steps.lower(kind)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA's JaxRuntimeError; only out-of-memory is an answer
    refused = out_of_memory(e)
    if not refused:
      raise
    return StepPlan(kind, steps.batch_size(kind), chips, time.perf_counter() - t0,
                    flops / chips, refused=refused)
  seconds = time.perf_counter() - t0
  return StepPlan(kind, steps.batch_size(kind), chips, seconds, flops / chips,
                  memory=Memory.of(compiled.memory_analysis()),
                  collectives=all_reduce(compiled.as_text()))


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config compiled for a TPU topology (:func:`plan`)."""
  topology: str
  device_kind: str
  chips: int
  steps: tuple[StepPlan, ...]
  num_params: int

  @property
  def fits(self) -> bool:
    """Every step compiled and, where the chip's HBM is known, is within it."""
    chip = chip_of(self.device_kind)
    return all(not s.refused and fits(s.memory, chip) is not False for s in self.steps)


def plan_steps(config: ml_collections.ConfigDict, topology: str,
               kinds: Sequence[str] = KINDS) -> Iterator[Plan]:
  """Compiles ``config``'s ``kinds`` steps for ``topology`` one after the other,
  yielding the :class:`Plan` so far after each (a step of a large model takes
  minutes). One-line ConfigErrors (no libtpu, a topology libtpu rejects, an
  invalid config) come before any compile."""
  devices = topology_devices(topology)
  validate(config, len(devices))
  meta = plan_meta(config.data)
  planned = as_planned(config)
  steps = Steps(planned, meta, devices)
  done: tuple[StepPlan, ...] = ()
  for kind in kinds:
    done += (compile_step(steps, kind, step_flops(planned, meta, kind)),)
    yield Plan(topology, devices[0].device_kind, len(devices), done, steps.num_params)


def plan(config: ml_collections.ConfigDict, topology: str,
         kinds: Sequence[str] = KINDS) -> Plan:
  """The complete :class:`Plan` of :func:`plan_steps`."""
  return list(plan_steps(config, topology, kinds))[-1]


# ----------------------------------------------------------------------------
# The lines printed.

def size_text(n: float) -> str:
  """Bytes in binary units: ``'512 B'``, ``'1.5 MiB'``, ``'14.90 GiB'``."""
  for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def flops_text(n: float) -> str:
  """``'1.23 TFLOP'``: FLOPs with an SI prefix."""
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.3g} FLOP"


def seconds_text(s: float) -> str:
  """``'7.52 ms'``, ``'1.20 s'``."""
  return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def fits(memory: Memory, chip: Optional[Chip]) -> Optional[bool]:
  """Whether ``memory`` is within the chip's HBM (None: the chip's HBM is not known)."""
  return None if chip is None else memory.total <= chip.hbm_bytes


def memory_line(step: StepPlan, chip: Optional[Chip]) -> str:
  if step.refused:
    return f"memory per chip: does not fit: the TPU compiler refused it: {step.refused}"
  m = step.memory
  parts = (f"arguments {size_text(m.arguments)}, temporaries {size_text(m.temporaries)}, "
           f"outputs {size_text(m.outputs)}"
           + (f" ({size_text(m.aliased)} of them in donated arguments)" if m.aliased else "")
           + f", code {size_text(m.code)}")
  verdict = fits(m, chip)
  if verdict is None:
    return f"memory per chip: {parts}: {size_text(m.total)} (HBM of this chip not known)"
  return (f"memory per chip: {parts}: {size_text(m.total)} of {size_text(chip.hbm_bytes)} "
          f"HBM: {'fits' if verdict else 'DOES NOT FIT'}")


def flops_line(step: StepPlan) -> str:
  return (f"FLOPs per step: {flops_text(step.flops)} per chip, "
          f"{flops_text(step.flops * step.chips)} in all (PGD loops unrolled, XLA's count)")


def peak_time_line(step: StepPlan, chip: Optional[Chip]) -> str:
  if chip is None:
    return "step time at peak: this chip's bf16 peak is not known"
  seconds = step.flops / chip.peak_bf16_flops
  rate = f", {step.global_batch / seconds:,.0f} images/s" if seconds > 0 else ""
  return (f"step time at peak: {seconds_text(seconds)} at {chip.name}'s bf16 peak of "
          f"{chip.peak_bf16_flops / 1e12:g} TFLOP/s per chip{rate} (a lower bound)")


def all_reduce_line(step: StepPlan, num_params: int) -> str:
  c = step.collectives
  if c is None:
    return "all-reduce: not known (not compiled)"
  text = (f"all-reduce per step: {size_text(c.bytes)} per chip in {c.ops} operation(s), "
          f"{c.values:,} values (gradients of {num_params:,} parameters in float32: "
          f"{size_text(4 * num_params)})")
  if c.loop_bytes:
    text += f"; {size_text(c.loop_bytes)} more per iteration inside loops"
  return text


def heading_line(spec: str, planned: Plan) -> str:
  return (f"{spec} on {planned.topology}: {planned.chips} x {planned.device_kind}; "
          f"jax {jax.__version__}, libtpu {libtpu_version()}")


def step_lines(step: StepPlan, planned: Plan) -> list[str]:
  """A step's heading, then one line each for memory, FLOPs, step time at peak
  (and all-reduce, for training)."""
  chip = chip_of(planned.device_kind)
  what = "train step" if step.kind == "train" else "eval step (clean + PGD)"
  lines = [f"{what}: global batch {step.global_batch} ({step.global_batch // step.chips} "
           f"per chip), compiled in {step.compile_s:.1f} s",
           "  " + memory_line(step, chip), "  " + flops_line(step),
           "  " + peak_time_line(step, chip)]
  if step.kind == "train":
    lines.append("  " + all_reduce_line(step, planned.num_params))
  return lines


def verdict_lines(planned: Plan) -> list[str]:
  """Nothing when it fits; one line saying what to change when it does not."""
  if planned.fits:
    return []
  return [f"does not fit on {planned.topology}: lower train.batch_size / "
          f"train.eval_batch_size, or plan a larger slice"]


def plan_lines(spec: str, planned: Plan) -> list[str]:
  """What ``jaxdef plan`` prints (:func:`print_plan`), all at once."""
  return ([heading_line(spec, planned)]
          + [l for step in planned.steps for l in step_lines(step, planned)]
          + verdict_lines(planned))


def print_plan(spec: str, config: ml_collections.ConfigDict, topology: str,
               out: Callable[[str], None]) -> Plan:
  """:func:`plan_lines` given to ``out`` line by line, each step's as soon as it
  is compiled; returns the plan."""
  planned = None
  for planned in plan_steps(config, topology):
    if len(planned.steps) == 1:
      out(heading_line(spec, planned))
    for line in step_lines(planned.steps[-1], planned):
      out(line)
  for line in verdict_lines(planned):
    out(line)
  return planned
