"""Sizing a run before starting it: ``jaxdef show-config --config NAME --summary``.

What one example costs, read from XLA on this host, without any data or
training: the model's parameter count; the FLOPs of one forward pass and of
one training step per example (XLA's cost analysis of the lowered programs at
a small batch, PGD loops unrolled, divided by that batch: the count
:func:`jaxdef.train.plan.step_flops` gives); and an estimate of the device
memory of the train step at the configured batch, from ``memory_analysis()``
of the train step compiled at two small batches on this host and extrapolated
linearly in the batch (the weights, optimizer state and code do not grow with
it, activations do). The programs are the run's own
(:class:`jaxdef.train.plan.Steps`, the steps :func:`jaxdef.train.loop.jit_steps`
builds), with the PGD loops rolled as on an accelerator; an accelerator's
compiler lays memory out differently, hence an estimate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from jaxdef.build import DataMeta, build
from jaxdef.config import validate
from jaxdef.train.free import free_replays
from jaxdef.train.plan import (Memory, Steps, as_planned, flops_text, plan_meta, size_text,
                               step_flops)

# The two batches the train step is compiled at to extrapolate its memory.
SMALL_BATCHES = (2, 4)


@dataclasses.dataclass(frozen=True)
class RunSize:
  """Per-example cost of a config's model and train step on this host."""
  parameters: int
  forward_flops: float      # one forward pass (inference mode), per example
  train_step_flops: float   # one training step (attack + update), per example
  batch_size: int
  memory_bytes: float       # train step at batch_size (extrapolated)
  small_memory: tuple[Memory, Memory]  # at SMALL_BATCHES
  platform: str
  free_replays: int = 1     # Free-m: updates per batch (train_step_flops is one replay's)


def with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose train and eval batches are ``batch``."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.train.batch_size = out.train.eval_batch_size = batch
  return out


def forward_flops(config: ml_collections.ConfigDict, meta: DataMeta, batch: int) -> float:
  """XLA's FLOP count of one inference-mode forward pass of ``batch`` images."""
  model, _, _ = build(config, meta)
  x = jax.ShapeDtypeStruct((batch, *meta.image_shape), jnp.float32)
  variables = jax.eval_shape(lambda z: model.init(jax.random.key(0), z, train=False), x)
  lowered = jax.jit(lambda v, z: model.apply(v, z, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def train_step_memory(config: ml_collections.ConfigDict, meta: DataMeta,
                      batch: int) -> tuple[Memory, int]:
  """``memory_analysis()`` of the train step compiled for this host at ``batch``,
  and the parameter count."""
  steps = Steps(as_planned(with_batch(config, batch)), meta, jax.devices()[:1])
  return Memory.of(steps.lower("train").compile().memory_analysis()), steps.num_params


def run_size(config: ml_collections.ConfigDict) -> RunSize:
  """The sizes of :class:`RunSize` for ``config`` (one-line ConfigErrors first)."""
  validate(config, 1)
  meta = plan_meta(config.data)
  small, large = SMALL_BATCHES
  (m_small, parameters), (m_large, _) = (train_step_memory(config, meta, b)
                                         for b in SMALL_BATCHES)
  per_example = (m_large.total - m_small.total) / (large - small)
  batch = config.train.batch_size
  return RunSize(
      parameters=parameters,
      forward_flops=forward_flops(config, meta, small) / small,
      train_step_flops=step_flops(with_batch(config, small), meta, "train") / small,
      batch_size=batch,
      memory_bytes=m_small.total + per_example * (batch - small),
      small_memory=(m_small, m_large),
      platform=jax.devices()[0].platform,
      free_replays=free_replays(config.attack))


def summary_lines(size: RunSize) -> list[str]:
  """What ``show-config --summary`` prints; the first line is ``parameters: N``."""
  m_small, m_large = size.small_memory
  small, large = SMALL_BATCHES
  ratio = size.train_step_flops / size.forward_flops if size.forward_flops else float("nan")
  m = size.free_replays
  free = [] if m <= 1 else [
      f"Free-{m}: a train step replays its batch {m} times ({m} optimizer updates, one "
      f"forward-backward pass each); the step FLOPs above are one replay's, "
      f"{flops_text(m * size.train_step_flops)} per example per batch; train.epochs counts "
      f"epochs of updates, so the data are read train.epochs / {m} times"]
  return [
      f"parameters: {size.parameters}",
      f"forward FLOPs per example: {flops_text(size.forward_flops)} (XLA's count on "
      f"{size.platform})",
      f"train step FLOPs per example: {flops_text(size.train_step_flops)} (attack and "
      f"update, PGD loops unrolled: {ratio:.1f} forward passes)",
      f"train step memory at batch {size.batch_size}: {size_text(size.memory_bytes)} "
      f"(estimate: {size_text(m_small.total)} at batch {small} and "
      f"{size_text(m_large.total)} at batch {large} on {size.platform}, extrapolated)",
  ] + free
