"""Multi-host start-up on JAX's own distributed runtime (``jax.distributed``).

Every process runs the same ``jaxdef train`` (or ``launch.py``) command. With ``--coordinator``,
``--num_processes`` and ``--process_id`` the processes meet at the
coordinator; without them, a cluster environment JAX recognises (SLURM, Open
MPI, a TPU VM slice, or ``JAX_COORDINATOR_ADDRESS`` set) is auto-detected.
Afterwards ``jax.devices()`` spans every host: the mesh's ``data`` axis
covers them all, each process loads only its slice of every batch
(:func:`jaxdef.data.shard_batch`), Orbax writes each checkpoint once
(coordinated by the primary process), and only process 0 writes logs.

Stopping on a signal (:class:`StopAgreement`). A preempted VM gets SIGTERM on
its own host; a Ctrl-C reaches one terminal. Each process stopping at the step
where it sees its own signal would leave the others inside the next step's
collectives and Orbax's save waiting for a process that never comes. So the
processes vote: after dispatching a step, each one sends its stop request
(the signal's number, 0 for none) in a tiny jitted all-gather over the mesh,
and reads the votes it sent after the previous step. Every process reads the
same votes after the same step, so all stop after that step, save it together
and exit with the same status (the highest signal asked: SIGTERM over SIGINT).
The read costs no extra host sync: the loop already waits for the previous
step (its deferred ``finite`` flag), and the votes sent right after that step
are ready then. The vote itself is one all-gather of one int32 per device, a
separate program queued behind the step: on CPU, where gloo carries it between
processes, about 2 ms per step; ``train.stop_check_every_steps = k`` votes
after every k-th step instead (a signal then stops the run within k + 1
steps). One process answers from its own flag every step, as it always did.

Why not the runtime's own preemption support. ``jax.distributed.initialize``
starts a preemption sync manager (``jax_enable_preemption_service``, on by
default): a C++ SIGTERM handler that a thread polls once a second, and a
protocol over the coordination service that picks the step after the
furthest process's; ``jax.experimental.multihost_utils
.reached_preemption_sync_point(step)``, and Orbax's
``CheckpointManager.reached_preemption`` built on it, then say True at that
step on every process. It works on CPU on localhost too (jax 0.10.2 and
0.12), but it hears SIGTERM alone, nothing else can notify it from Python,
and Python's ``signal.signal`` replaces its handler: with jaxdef's handler in
place (needed for Ctrl-C, for the exit status, and for a second signal to end
the process at once) it never fires, and without it a Ctrl-C on one host still
stops that host alone. Left on, it would only take a SIGTERM that arrives
between start-up and the training loop and swallow it; :func:`initialize`
turns it off, so such a signal ends the process as it always did.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdef.errors import ConfigError
from jaxdef.signals import StopFlag

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
  # jaxdef's StopAgreement decides where every process stops (module docstring).
  jax.config.update("jax_enable_preemption_service", False)
  if coordinator is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  return True


class StopDecision(NamedTuple):
  """Every process stops after this step: ``signum`` (the highest signal asked),
  ``processes`` (the indices of the processes that were sent one)."""
  signum: int
  processes: tuple[int, ...]

  def where(self, process_count: int) -> str:
    """'' for one process, else which processes were sent the signal."""
    if process_count == 1:
      return ""
    return (f" (sent to process{'es' if len(self.processes) > 1 else ''} "
            f"{', '.join(map(str, self.processes))} of {process_count})")


def tally(votes: np.ndarray, owners: tuple[int, ...]) -> Optional[StopDecision]:
  """The decision of ``votes`` (one signal number per device, 0 for none) cast by
  the devices of processes ``owners`` (the same order); None if nobody asked."""
  asked = tuple(sorted({p for p, v in zip(owners, votes.tolist()) if v}))
  return StopDecision(int(votes.max()), asked) if asked else None


class StopAgreement:
  """Where every process stops on a signal sent to some of them (module docstring).

  ``poll(step)`` is called by every process after dispatching each step; it
  returns the :class:`StopDecision` to stop after that step, or None. With
  several processes the votes go out after every ``every``-th step and are
  read after the next one: a signal stops the run at most ``every + 1`` steps
  after it arrived.
  """

  def __init__(self, stop: StopFlag, mesh: Mesh, every: int = 1):
    self.stop, self.every, self.pending = stop, every, None
    self.alone = jax.process_count() == 1
    self.owners = tuple(d.process_index for d in mesh.devices.flat)
    self.votes = NamedSharding(mesh, P(mesh.axis_names))
    self.gather = jax.jit(lambda v: v, out_shardings=NamedSharding(mesh, P()))

  def own_vote(self) -> int:
    return int(self.stop["signal"] or 0)

  def poll(self, step: int) -> Optional[StopDecision]:
    if self.alone:
      vote = self.own_vote()
      return StopDecision(vote, (0,)) if vote else None
    sent = self.pending
    self.pending = self.send(self.own_vote()) if step % self.every == 0 else None
    return None if sent is None else tally(np.asarray(sent.addressable_data(0)), self.owners)

  def send(self, vote: int) -> jax.Array:
    """The votes of every device, gathered on each (queued, not waited for)."""
    mine = jax.make_array_from_callback((len(self.owners),), self.votes,
                                        lambda _: np.full((1,), vote, np.int32))
    return self.gather(mine)
