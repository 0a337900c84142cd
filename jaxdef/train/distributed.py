"""Multi-host start-up on JAX's own distributed runtime (``jax.distributed``).

Every process runs the same ``jaxdef train`` (or ``launch.py``) command. With ``--coordinator``,
``--num_processes`` and ``--process_id`` the processes meet at the
coordinator; without them, a cluster environment JAX recognises (SLURM, Open
MPI, a TPU VM slice, or ``JAX_COORDINATOR_ADDRESS`` set) is auto-detected.
Afterwards ``jax.devices()`` spans every host: the mesh's ``data`` axis
covers them all, each process loads only its slice of every batch
(:func:`jaxdef.data.shard_batch`), Orbax writes each checkpoint once
(coordinated by the primary process), and only process 0 writes logs.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax

from jaxdef.errors import ConfigError

# Variables whose presence means "launched by a cluster manager with peers".
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def cluster_detected(env: Mapping[str, str]) -> bool:
  """True when the environment says several processes were launched together."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  return any(int(env.get(v, "1") or "1") > 1 for v in _CLUSTER_SIZE_VARS)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               env: Mapping[str, str] = os.environ) -> bool:
  """Joins the multi-process job if one is asked for; returns whether it did.

  Call before anything touches a JAX device. On CPU the cross-process
  collectives go through gloo.
  """
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ConfigError("--coordinator, --num_processes and --process_id go together "
                      f"(got {coordinator!r}, {num_processes!r}, {process_id!r})")
  if coordinator is None and not cluster_detected(env):
    return False
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id must be in [0, {num_processes - 1}], got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  return True
