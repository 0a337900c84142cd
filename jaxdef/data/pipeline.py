"""Deterministic batches: which examples a step sees, and how they are sharded.

The batch of global step ``step`` is a pure function of
``(num_examples, global_batch, seed, step)``, so a run resumed from a
checkpoint at step k sees exactly the batches an uninterrupted run would.
Images stay uint8 on the host; each process gathers only the rows its own
devices hold and ``jax.make_array_from_process_local_data`` assembles the
global ``jax.Array`` (batch dimension sharded over the mesh's ``data`` axis).
"""

from __future__ import annotations

import functools
import math
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdef.errors import ConfigError


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the ``num_examples`` training examples in ``epoch``: (num_examples,) int64.

  Drawn from a numpy Generator seeded with ``(seed, epoch)``; the same on
  every process, run and machine.
  """
  return _cached_permutation(int(num_examples), int(seed), int(epoch)).copy()


@functools.lru_cache(maxsize=2)
def _cached_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  # Every step of an epoch needs the same permutation; compute it once.
  if seed < 0 or epoch < 0:
    raise ConfigError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.setflags(write=False)
  return perm


def steps_per_epoch(num_examples: int, global_batch: int, *, keep_last: bool = False) -> int:
  """Batches per epoch: full ones only, the last partial batch dropped (the
  default), or with ``keep_last`` ceil(num_examples / global_batch), the last
  one holding the remainder (``data.keep_last_batch``)."""
  steps = num_examples // global_batch
  if steps < 1:
    raise ConfigError(f"global batch {global_batch} is larger than the "
                      f"{num_examples} training examples")
  return steps + int(bool(keep_last) and num_examples % global_batch > 0)


def check_last_batch(num_examples: int, global_batch: int, num_shards: int) -> None:
  """One-line ConfigError when ``data.keep_last_batch``'s smaller last batch
  (``num_examples % global_batch`` examples) cannot be split evenly over
  ``num_shards`` devices."""
  last = num_examples % global_batch
  if last and last % num_shards:
    raise ConfigError(f"data.keep_last_batch: the last batch of each epoch holds "
                      f"{num_examples} % {global_batch} = {last} examples, which do not "
                      f"split over {num_shards} devices; choose a batch size that leaves a "
                      f"multiple of {num_shards}, or set data.keep_last_batch=False")


def train_batch_indices(num_examples: int, global_batch: int, seed: int,
                        step: int, *, keep_last: bool = False) -> np.ndarray:
  """Example indices of global step ``step``: (global_batch,) int64, or the
  remainder's size for the last step of an epoch with ``keep_last``.

  ``epoch = step // steps_per_epoch``; the step takes the next
  ``global_batch`` entries of that epoch's permutation.
  """
  per_epoch = steps_per_epoch(num_examples, global_batch, keep_last=keep_last)
  epoch, within = divmod(int(step), per_epoch)
  perm = _cached_permutation(int(num_examples), int(seed), epoch)
  return perm[within * global_batch:(within + 1) * global_batch].copy()


def shard_batch(x_np: np.ndarray, y_np: np.ndarray, indices: np.ndarray,
                sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
  """Global arrays ``x[indices]`` (B, H, W, C) and ``y[indices]`` (B,), sharded.

  The batch dimension is split as ``sharding.spec[0]`` says (the ``data``
  axis); each process reads only the rows of ``indices`` that its devices
  hold. Dtypes are kept (uint8 images: convert to float on device).
  """
  local = np.asarray(indices)[local_rows(sharding, len(indices))]
  return global_arrays(x_np[local], y_np[local], len(indices), sharding)


def local_rows(sharding: NamedSharding, global_batch: int) -> slice:
  """The rows of a ``global_batch``-row batch that this process's devices hold."""
  return _process_rows(_rows_sharding(sharding), (global_batch,))


def global_arrays(x: np.ndarray, y: np.ndarray, global_batch: int,
                  sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
  """This process's rows ``x`` (b, H, W, C) and ``y`` (b,) (its :func:`local_rows`)
  as the global batch arrays, sharded like :func:`shard_batch`."""
  x_sharding, y_sharding = _batch_shardings(sharding, x.ndim)
  return (jax.make_array_from_process_local_data(x_sharding, x, (global_batch,) + x.shape[1:]),
          jax.make_array_from_process_local_data(y_sharding, y, (global_batch,)))


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                 sharding: NamedSharding) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
  """Yields ``(x, y, mask)`` over all of ``x`` in order, sharded like :func:`shard_batch`.

  Every batch has ``batch_size`` rows; the last is padded with copies of
  example 0 and ``mask`` (B,) bool is False on the padding, so
  ``sum(correct * mask) / sum(mask)`` is the exact accuracy.
  """
  num = len(x)
  _, mask_sharding = _batch_shardings(sharding, x.ndim)
  _check_divisible(batch_size, sharding)
  for start in range(0, num, batch_size):
    positions = np.arange(start, start + batch_size)
    mask = positions < num
    xb, yb = shard_batch(x, y, np.where(mask, positions, 0), sharding)
    rows = _process_rows(mask_sharding, (batch_size,))
    mask_global = jax.make_array_from_process_local_data(mask_sharding, mask[rows], (batch_size,))
    yield xb, yb, mask_global


def batch_axis_size(sharding: NamedSharding) -> int:
  """How many shards the batch dimension (``spec[0]``) is split into."""
  spec = tuple(sharding.spec)
  axes = spec[0] if spec else None
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def _check_divisible(global_batch: int, sharding: NamedSharding):
  shards = batch_axis_size(sharding)
  if global_batch % shards:
    raise ConfigError(f"global batch {global_batch} is not divisible by the {shards} devices "
                      f"of the mesh's batch axis {sharding.spec[0]!r}")


def _batch_shardings(sharding: NamedSharding, image_ndim: int):
  """(sharding of images, sharding of labels/masks): only the batch dim is split."""
  if not isinstance(sharding, NamedSharding):
    raise ConfigError(f"expected a jax.sharding.NamedSharding, got {type(sharding).__name__}")
  spec = tuple(sharding.spec)
  if len(spec) > image_ndim or any(axes is not None for axes in spec[1:]):
    raise ConfigError(f"batch sharding must split only the batch dimension, e.g. "
                      f"PartitionSpec('data'); got {sharding.spec}")
  return sharding, _rows_sharding(sharding)


def _rows_sharding(sharding: NamedSharding) -> NamedSharding:
  """The sharding of a (B,) array (labels, masks) split like ``sharding``'s batch dim."""
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if spec else None))


def _process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
  """The contiguous rows of the global batch held by this process's devices."""
  _check_divisible(global_shape[0], sharding)
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(global_shape[0])
    starts.append(start)
    stops.append(stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(hi - lo, bool)
  for start, stop in zip(starts, stops):
    covered[start - lo:stop - lo] = True
  if not covered.all():
    raise ConfigError("this process's devices hold non-contiguous rows of the batch; "
                      "order the mesh devices by process (jax.make_mesh does)")
  return slice(lo, hi)
