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

from jaxdef.config import DECAY_ON, OPTIMIZERS, SCHEDULES
from jaxdef.errors import ConfigError, unknown_name


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step.

  ``ema_params`` / ``ema_batch_stats`` are the exponential moving average of
  the weights (and of the BatchNorm statistics, so the averaged model is
  evaluated with statistics that match it). With EMA disabled they are the
  current weights. ``free_delta`` is Free adversarial training's persistent
  perturbation, (global batch, H, W, C) float32 (:mod:`jaxdef.train.free`);
  None when Free is off (and in checkpoints written before it existed).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  free_delta: Any = None

  def eval_variables(self, use_ema: bool) -> dict:
    """Variables of the model to evaluate: EMA weights if ``use_ema``."""
    if use_ema:
      return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
    return {"params": self.params, "batch_stats": self.batch_stats}


# A normalisation layer's module name: Flax's BatchNorm_0 / GroupNorm_1 /
# LayerNorm_2, or a name given by hand ('bn1', 'norm').
_NORM_MODULE = re.compile(r"norm|^bn\d*$", re.IGNORECASE)


def peak_lr(opt: ml_collections.ConfigDict, global_batch: int = 0) -> float:
  """``opt.lr``, or ``opt.lr * global_batch / opt.base_batch`` when
  ``opt.base_batch`` is set (the linear scaling rule: DeepMind's recipe is
  0.1 per 256 images, 0.4 at batch 1024)."""
  base = opt.get("base_batch", 0)
  if not base:
    return float(opt.lr)
  if global_batch <= 0:
    raise ConfigError("train.optimizer.base_batch scales the learning rate with the global "
                      "batch, and no batch size was given")
  return float(opt.lr) * global_batch / base


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int, global_batch: int = 0) -> optax.Schedule:
  """The learning rate per step: a linear warm-up from 0 over
  ``opt.warmup_epochs``, then

  * 'piecewise': x0.1 at each of ``opt.milestones`` (epochs; docs/methods.md:
    75 and 90 of 100), which stay at absolute epochs (the warm-up multiplies);
  * 'cosine': cosine decay to 0 at ``total_steps`` (with a warm-up, the
    one-cycle shape of Wang et al. 2023 and Gowal et al. 2020);
  * 'triangle': linear decay to 0 at ``total_steps`` (the cyclic rate of Wong
    et al. 2020's CIFAR-10 script and of N-FGSM, 0 -> peak at half of
    training -> 0, per step: ``warmup_epochs`` = half the epochs);
  * 'constant'.

  The peak is :func:`peak_lr` (scaled with ``global_batch`` when
  ``opt.base_batch`` is set).
  """
  lr = peak_lr(opt, global_batch)
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  if opt.schedule == "piecewise":
    boundaries = {int(m * steps_per_epoch): 0.1 for m in opt.milestones}
    main = optax.piecewise_constant_schedule(lr, boundaries)
  elif opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  elif opt.schedule == "triangle":
    main = optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))
  elif opt.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise unknown_name("lr schedule", opt.schedule, SCHEDULES)
  if warmup == 0:
    return main
  if opt.schedule in ("cosine", "triangle"):
    ramp = optax.linear_schedule(0.0, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])
  return lambda step: main(step) * jnp.minimum(1.0, step / warmup)


def decay_mask(params: Any, on: str) -> Any:
  """True for each leaf of ``params`` that weight decay acts on.

  'all': every parameter (PyTorch's ``SGD(weight_decay=...)`` on
  ``model.parameters()``); 'no_norm': all but the scale and bias of
  normalisation layers (the recipes of Wang et al. 2023, Gowal et al. 2020
  and Wong et al. 2020: "not on BN"); 'kernels': convolution and dense
  kernels only (leaves of 2 or more dimensions: normalisation scales and
  every bias are left out).
  """
  if on == "all":
    return jax.tree.map(lambda _: True, params)
  if on == "kernels":
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  if on != "no_norm":
    raise unknown_name("train.optimizer.weight_decay_on", on, DECAY_ON)

  def decayed(path, _):
    module = parameter_path(path[:-1]).rsplit("/", 1)[-1]
    return not _NORM_MODULE.search(module)
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   steps_per_epoch: int, trainable: str = "",
                   global_batch: int = 0) -> optax.GradientTransformation:
  """The optimizer ``opt.name`` with the schedule of :func:`learning_rate_schedule`.

  'sgd' (the default): SGD with (Nesterov) momentum and coupled L2 weight
  decay, as in PyTorch's SGD: decay is added to the gradient before
  momentum, which is what ``torch.optim.SGD(weight_decay=...)`` in the
  reference codes does. 'adamw': Adam with decoupled weight decay
  (Loshchilov & Hutter 2019, ``torch.optim.AdamW``: p -= lr * wd * p),
  betas ``opt.betas``. Decay acts on the parameters
  ``opt.weight_decay_on`` names (:func:`decay_mask`).
  ``trainable`` (``train.trainable``): a regular expression; when set, only
  parameters whose path (:func:`parameter_path`) it matches (``re.search``)
  are updated, the others get zero updates (no decay, no momentum state).
  """
  schedule = learning_rate_schedule(opt, total_steps, steps_per_epoch, global_batch)
  on = opt.get("weight_decay_on", "all")
  mask = None if on == "all" else (lambda params: decay_mask(params, on))
  name = opt.get("name", "sgd")
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov),
    )
  elif name == "adamw":
    b1, b2 = opt.get("betas", (0.9, 0.999))
    tx = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=opt.weight_decay, mask=mask)
  else:
    raise unknown_name("train.optimizer.name", name, OPTIMIZERS)
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
                     image_shape: tuple[int, ...], free_batch: int = 0) -> TrainState:
  """Initial state from a dummy batch of one image (jit this with out_shardings);
  ``free_batch`` > 0 adds Free training's perturbation, zeros of (free_batch,
  *image_shape)."""
  variables = model.init({"params": key}, jnp.zeros((1, *image_shape), jnp.float32),
                         train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=params,
                    ema_batch_stats=batch_stats,
                    free_delta=jnp.zeros((free_batch, *image_shape), jnp.float32)
                    if free_batch else None)


def ema_decay_at(decay: float, step: jax.Array, warmup_steps: float = 0.0) -> jax.Array:
  """The EMA's decay at training step ``step`` (0-based, counted before the update).

  d = min(decay, (1 + t) / (10 + t)) with t = step - warmup_steps, and d = 0
  (the average is the current weights) while step < warmup_steps: the rule
  of Gowal et al. 2020 (deepmind-research ``utils.ema_update``, called with
  the step before the update) and of Wang et al. 2023 (DM-Improves-AT, whose
  warm-up is 2.5% of training; it counts steps from 1 after the update, one
  step later than here). The ramp keeps the early average from being
  dominated by the random initialisation.
  """
  t = step - warmup_steps
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jnp.where(step >= warmup_steps, d, 0.0)


def ema_update(ema: Any, new: Any, decay: float, step: jax.Array,
               warmup_steps: float = 0.0) -> Any:
  """ema <- d * ema + (1 - d) * new, d = :func:`ema_decay_at` (decay, step, warmup_steps)."""
  d = ema_decay_at(decay, step, warmup_steps)
  return jax.tree.map(lambda e, n: (d * e + (1.0 - d) * n).astype(e.dtype), ema, new)
