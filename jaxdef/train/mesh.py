"""The device mesh: one ``data`` axis over every device of every process."""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def data_mesh() -> Mesh:
  """All devices on one ``data`` axis (Auto axes: jit decides the collectives)."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Training state: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Batches: split along the leading (example) axis over ``data``."""
  return NamedSharding(mesh, P("data"))
