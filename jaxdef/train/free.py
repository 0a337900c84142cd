"""Free adversarial training, Free-m (Shafahi et al. 2019, "Adversarial Training for Free!").

One perturbation ``delta`` (global batch, H, W, C) lives in the train state
(:attr:`jaxdef.train.state.TrainState.free_delta`): it starts at zero and is
never reset, so the perturbation a batch ends with is where the next batch's
starts. Each batch is replayed ``m`` times (``attack.free_replays``); a replay
is ONE forward-backward pass at ``clip(x + delta, 0, 1)`` that gives both the
parameter gradient (one optimizer step) and the input gradient ``g``, with
which ``delta <- clip(delta + step_size * sign(g), -eps, eps)``, then cut to
the current batch's image range [-x, 1 - x] (Wong et al. 2020's CIFAR-10
version; the authors' TensorFlow and PyTorch codes clip the input instead,
which the forward pass here also does, so a new batch's first replay is in
range too). The batch's gradient is that of the whole training loss, so
Free composes only with objectives and defenses whose loss needs nothing but
the adversarial pass (:func:`jaxdef.config.validate` refuses the others).

Lengths, as in the authors' codes (PyTorch ``main_free.py``: epochs divided
by m; TensorFlow ``free_train.py``: the learning rate by global step, which
counts replays): ``train.epochs`` counts epochs of optimizer updates, so a
run reads its data ``epochs / m`` times, and every epoch-denominated field
(learning-rate milestones and warm-up, ``attack.warmup_epochs``,
``train.ema_warmup_epochs``) counts the same updates. A smaller last batch
(``data.keep_last_batch``) uses and updates the first rows of ``delta``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxdef.attacks.pgd import ascent_direction, loop_unroll, project
from jaxdef.train.mesh import batch_sharded, replicated
from jaxdef.train.state import TrainState

Array = jax.Array


def free_replays(attack: ml_collections.ConfigDict) -> int:
  """``attack.free_replays`` as a count of updates per batch: 1 when Free is off
  (the field absent, 0 or 1)."""
  return max(int(attack.get("free_replays", 0) or 0), 1)


def total_batches(epochs: float, steps_per_epoch: int, replays: int) -> int:
  """The batches a run of ``epochs`` epochs of updates reads: ``epochs x
  steps_per_epoch / replays`` (the paper's 205 epochs at m = 8 read CIFAR-10
  25.6 times)."""
  if replays <= 1:
    return int(epochs * steps_per_epoch)
  return int(epochs * steps_per_epoch / replays)


def state_sharding(mesh: jax.sharding.Mesh, free: bool) -> Any:
  """The train state's sharding (a prefix of :class:`TrainState`): replicated,
  with ``free_delta`` split over ``data`` like the batch it perturbs."""
  rep = replicated(mesh)
  if not free:
    return rep
  fields = {f.name: rep for f in dataclasses.fields(TrainState)}
  return TrainState(**{**fields, "free_delta": batch_sharded(mesh)})


def abstract_state(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """``state``'s shapes and dtypes (``jax.eval_shape``) with the shardings of
  :func:`state_sharding`, for lowering without running anything."""
  rep = replicated(mesh)
  spec = lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
  out = jax.tree.map(lambda s: spec(s, rep), state)
  if state.free_delta is None:
    return out
  return out.replace(free_delta=spec(state.free_delta, batch_sharded(mesh)))


def replay(loss_fn: Callable[[Any, Array], tuple[Array, Any]], params: Any, x: Array,
           delta: Array, *, eps: Array, step_size: Array, norm: str
           ) -> tuple[tuple[Array, Any], Any, Array, Array]:
  """One Free replay: ``((loss, aux), param_grads, x_adv, delta')``.

  ``loss_fn(params, x_adv) -> (scalar loss, aux)`` is the training loss;
  ``x`` the batch (N, H, W, C) in [0, 1]; ``delta`` (B, H, W, C), B >= N, the
  persistent perturbation, whose first N rows perturb this batch. One
  ``value_and_grad`` with respect to (params, delta[:N]) gives both
  gradients; delta[:N] then takes one ascent step of ``step_size`` (the sign
  of the gradient for L-inf, its unit L2 direction for L2), is projected onto
  the ``norm`` eps-ball and cut to [-x, 1 - x] (:func:`jaxdef.attacks.pgd.project`);
  rows N.. are left as they are.
  """
  n = x.shape[0]
  start = delta[:n]

  def at_perturbation(p, d):
    return loss_fn(p, jnp.clip(x + d, 0.0, 1.0))

  (loss, aux), (grads, g_delta) = jax.value_and_grad(at_perturbation, argnums=(0, 1),
                                                      has_aux=True)(params, start)
  x_adv = jnp.clip(x + start, 0.0, 1.0)
  moved = project(x + start + step_size * ascent_direction(g_delta, norm), x, eps, norm) - x
  new_delta = moved if n == delta.shape[0] else delta.at[:n].set(moved)
  return (loss, aux), grads, jax.lax.stop_gradient(x_adv), jax.lax.stop_gradient(new_delta)


def replay_batch(update: Callable[[TrainState, Array], tuple[TrainState, dict]],
                 state: TrainState, replays: int, unroll: Any = None
                 ) -> tuple[TrainState, list[dict]]:
  """``update(state, u) -> (state, metrics)`` for u = 0 .. replays - 1 in a
  ``lax.scan``: the state after the last replay and each replay's metrics.

  The scan unrolls as the attacks' loops do (:func:`jaxdef.attacks.pgd.loop_unroll`,
  ``attack.unroll``; None: by backend): rolled, XLA:CPU runs the replays'
  convolution input gradients about 15x slower (small CNN, Free-2: 3.5 s a
  step rolled, 0.23 s unrolled, on the loaded 2-core machine).
  """
  state, stacked = jax.lax.scan(update, state, jnp.arange(replays),
                                unroll=loop_unroll(unroll, replays))
  return state, [jax.tree.map(lambda v, u=u: v[u], stacked) for u in range(replays)]
