"""Training state (one pytree for jit, sharding and Orbax) and the optimizer."""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdef.errors import ConfigError, unknown_name


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step.

  ``ema_params`` / ``ema_batch_stats`` are the exponential moving average of
  the weights (and of the BatchNorm statistics, so the averaged model is
  evaluated with statistics that match it). With EMA disabled they are the
  current weights.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any

  def eval_variables(self, use_ema: bool) -> dict:
    """Variables of the model to evaluate: EMA weights if ``use_ema``."""
    if use_ema:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Piecewise (x0.1 at each milestone epoch) or cosine, both with linear warm-up.

  ``opt.milestones`` are epochs (docs/methods.md: 75 and 90 of 100). Warm-up is
  ``opt.warmup_epochs`` of linear increase from 0.
  """
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  if opt.schedule == "piecewise":
    boundaries = {int(m * steps_per_epoch): 0.1 for m in opt.milestones}
    main = optax.piecewise_constant_schedule(opt.lr, boundaries)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(opt.lr, max(total_steps - warmup, 1))
  elif opt.schedule == "constant":
    main = optax.constant_schedule(opt.lr)
  else:
    raise unknown_name("lr schedule", opt.schedule, ["piecewise", "cosine", "constant"])
  if warmup == 0:
    return main
  if opt.schedule == "cosine":
    ramp = optax.linear_schedule(0.0, opt.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])
  # Piecewise milestones stay at absolute epochs: the warm-up multiplies.
  return lambda step: main(step) * jnp.minimum(1.0, step / warmup)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int, trainable: str = "") -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled L2 weight decay, as in PyTorch's SGD.

  Weight decay is added to the gradient before momentum, on every parameter,
  which is what ``torch.optim.SGD(weight_decay=...)`` in the reference codes does.
  ``trainable`` (``train.trainable``): a regular expression; when set, only
  parameters whose path (:func:`parameter_path`) it matches (``re.search``)
  are updated, the others get zero updates (no decay, no momentum state).
  """
  schedule = learning_rate_schedule(opt, total_steps, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
  )
  if not trainable:
    return tx
  return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()},
                         lambda params: trainable_labels(params, trainable))


def parameter_path(path: tuple) -> str:
  """'classifier/Conv_0/kernel': a pytree key path joined by '/'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_labels(params: Any, pattern: str) -> Any:
  """'trainable' or 'frozen' for each leaf of ``params``, by ``re.search(pattern, path)``.

  Raises :class:`ConfigError` when ``pattern`` matches no parameter (a frozen
  model would train nothing).
  """
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "trainable" if re.search(pattern, parameter_path(p)) else "frozen", params)
  if "trainable" not in jax.tree.leaves(labels):
    example = parameter_path(jax.tree_util.tree_leaves_with_path(params)[0][0])
    raise ConfigError(f"train.trainable={pattern!r} matches no parameter (paths look like "
                      f"{example!r})")
  return labels


def stop_frozen_gradients(params: Any, pattern: str) -> Any:
  """``params`` with ``jax.lax.stop_gradient`` on every leaf that ``pattern``
  (``train.trainable``; '' = all trainable) leaves frozen.

  Applied inside the loss, it makes the frozen leaves' gradients exact zeros
  that XLA never computes (a frozen classifier costs its input gradients
  only, not its weight gradients) and keeps them out of ``grad_norm``.
  """
  if not pattern:
    return params
  return jax.tree.map(lambda p, label: p if label == "trainable" else jax.lax.stop_gradient(p),
                      params, trainable_labels(params, pattern))


def graft_variables(state: TrainState, subtree: str, variables: dict) -> TrainState:
  """``state`` with ``params`` / ``batch_stats`` (and their EMA copies) under the
  top-level key ``subtree`` ('' = the whole tree) replaced by ``variables``
  (``{'params': ..., 'batch_stats': ...}`` of another run, e.g. from
  :func:`jaxdef.restored.load_run`). The optimizer state is kept: at step 0
  it does not depend on the parameter values (SGD momentum starts at zero).

  Raises :class:`ConfigError` when the structures or shapes differ.
  """
  def put(tree: Any, new: Any, what: str) -> Any:
    old = tree.get(subtree, {}) if subtree else tree
    if jax.tree.map(jnp.shape, old) != jax.tree.map(jnp.shape, new):
      raise ConfigError(f"train.init_from.{subtree or '(all)'}: the {what} of that run do not "
                        f"fit this model's (build the same model: same name and kwargs)")
    if not subtree:
      return new
    return {**tree, subtree: new} if new else tree

  params = put(state.params, variables["params"], "parameters")
  stats = put(state.batch_stats, variables.get("batch_stats", {}), "BatchNorm statistics")
  # Copies: the train step donates the state, and no two leaves may share a buffer.
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  return state.replace(params=params, batch_stats=stats, ema_params=copy(params),
                       ema_batch_stats=copy(stats))


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                     image_shape: tuple[int, ...]) -> TrainState:
  """Initial state from a dummy batch of one image (jit this with out_shardings)."""
  variables = model.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=params,
                    ema_batch_stats=batch_stats)


def ema_update(ema: Any, new: Any, decay: float, step: jax.Array) -> Any:
  """ema <- d * ema + (1 - d) * new with d = min(decay, (1 + t) / (10 + t)).

  The ramp on d keeps the early average from being dominated by the random
  initialisation on short runs.
  """
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, n: d * e + (1.0 - d) * n, ema, new)
