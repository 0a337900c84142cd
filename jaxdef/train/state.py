"""Training state (one pytree for jit, sharding and Orbax) and the optimizer."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdef.errors import unknown_name


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

  ``opt.milestones`` are epochs (METHODS.md: 75 and 90 of 100). Warm-up is
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
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled L2 weight decay, as in PyTorch's SGD.

  Weight decay is added to the gradient before momentum, on every parameter,
  which is what ``torch.optim.SGD(weight_decay=...)`` in the reference codes does.
  """
  schedule = learning_rate_schedule(opt, total_steps, steps_per_epoch)
  return optax.chain(
      optax.add_decayed_weights(opt.weight_decay),
      optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
  )


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
