"""The device mesh: one ``data`` axis over every device of every process."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """``devices`` (default: all devices) on one ``data`` axis (Auto axes: jit
  decides the collectives). :mod:`jaxdef.train.plan` passes the devices of a
  TPU topology that this host does not have, to compile for it."""
  count = jax.device_count() if devices is None else len(devices)
  return jax.make_mesh((count,), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Training state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Batches: split along the leading (example) axis over ``data``."""
  return NamedSharding(mesh, P("data"))
