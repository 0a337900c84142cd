"""Adversarial Weight Perturbation (AWP) as small pure functions on parameter trees.

Wu, Xia & Wang 2020, "Adversarial Weight Perturbation Helps Robust
Generalization" (NeurIPS; Algorithm 1), as the authors' code does it
(csdongxian/AWP, ``AT_AWP/utils_awp.py``, ``trades_AWP/utils_awp.py`` and
their training scripts). After the batch's adversarial examples are made, on
the weights theta of the step:

1. a proxy copy of theta takes one plain SGD step (learning rate
   ``proxy_lr``, no momentum, no weight decay) on the *negated* training loss,
   so it moves towards a higher loss: AT ascends CE(f(x_adv), y), TRADES
   CE(f(x), y) + beta KL(f(x) || f(x_adv)); the step reuses the objective's
   ``outer_loss``, so every objective composes the same way;
2. for every weight tensor with more than one dimension (convolution and
   dense kernels; biases and normalisation scales are left alone), the
   proxy's difference Delta is rescaled layer by layer to
   v = Delta * ||theta|| / (||Delta|| + 1e-20) (Frobenius norms per tensor);
3. the training loss and its gradient are computed at theta + gamma v and
   the optimizer's update is taken there (so coupled weight decay sees the
   perturbed weights, as the PyTorch code's ``optimizer.step()`` does);
4. the perturbation is taken back: theta_new = (theta + gamma v + update) - gamma v.

The proxy runs the model in training mode, BatchNorm normalising with the
statistics of the batch it is given, and its running-statistics updates are
discarded: the authors' proxy is a separate network reloaded from the model
before every step (``load_state_dict`` then ``train()``), so its statistics
never reach the model. Loss terms a defense adds (CAS or FSR heads) are not
part of the proxy's ascent; parameters that ``train.trainable`` freezes get
no perturbation (their proxy gradient is zero).

AWP starts after ``warmup_steps`` training steps (the scripts' ``--awp-warmup``
epochs: 0 for AT, 10 for TRADES, which counts epochs from 1, so 9 epochs run
without AWP). Its cost: one more forward-backward pass per step (two forward
passes for objectives that read the clean outputs, as TRADES).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.models.base import apply_fn
from jaxdef.objectives.base import Objective
from jaxdef.train.state import stop_frozen_gradients

Array = jax.Array
# Added to ||Delta|| in the layer-wise scale (the authors' ``EPS = 1E-20``).
NORM_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class WeightPerturbation:
  """AWP's settings (``train.awp``): size ``gamma`` (relative to each layer's
  norm; 0 turns AWP off), the proxy's SGD learning rate ``proxy_lr`` (AT 0.01,
  TRADES 0.1 in the authors' scripts) and the training steps without AWP first.

  The layer-wise rescaling cancels ``proxy_lr`` except through ``NORM_EPS``
  (a layer whose proxy step is 0 gets no perturbation at any rate); it is kept
  so the recipes read as the authors wrote them.
  """
  gamma: float
  proxy_lr: float
  warmup_steps: int = 0


def is_perturbed(leaf: Array) -> bool:
  """Whether AWP perturbs a parameter: tensors of more than one dimension (the
  authors skip every ``state_dict`` entry of one dimension or less)."""
  return jnp.ndim(leaf) > 1


def layerwise_scaled(delta: Any, params: Any) -> Any:
  """v = Delta * ||theta|| / (||Delta|| + 1e-20) per tensor with ndim > 1, zeros
  elsewhere (Wu et al. 2020, eq. 9's layer-wise relative size; ``diff_in_weights``).

  ``delta`` and ``params`` are trees of one structure; norms are Frobenius
  norms of whole tensors, taken in float32; ``v`` has ``params``' dtypes.
  """
  def scale(d, p):
    if not is_perturbed(p):
      return jnp.zeros_like(p)
    d32, p32 = d.astype(jnp.float32), p.astype(jnp.float32)
    ratio = jnp.linalg.norm(p32.ravel()) / (jnp.linalg.norm(d32.ravel()) + NORM_EPS)
    return (d32 * ratio).astype(p.dtype)
  return jax.tree.map(scale, delta, params)


def proxy_ascent(loss: Callable[[Any], Array], params: Any, lr: float) -> Any:
  """Delta = proxy - theta after one SGD step of rate ``lr`` on ``-loss``:
  ``lr * grad loss(theta)`` (the authors' ``calc_awp``: a plain SGD step on the
  negated loss, from a proxy loaded with the model's weights).

  Computed as the step itself rather than as a difference of two weight
  tensors, so no rounding of theta enters Delta.
  """
  grads = jax.grad(lambda p: -loss(p))(params)
  return jax.tree.map(lambda g: -lr * g, grads)


def shifted(params: Any, v: Any, coeff: float | Array) -> Any:
  """theta + coeff * v, leaf by leaf, in ``params``' dtypes."""
  return jax.tree.map(lambda p, d: (p + coeff * d).astype(p.dtype), params, v)


def perturb(params: Any, v: Any, gamma: float) -> Any:
  """theta + gamma v: the weights at which AWP computes the loss and the update."""
  return shifted(params, v, gamma)


def restore(params: Any, v: Any, gamma: float) -> Any:
  """theta - gamma v: takes AWP's perturbation back after the optimizer step."""
  return shifted(params, v, -gamma)


def weight_perturbation(loss: Callable[[Any], Array], params: Any, step: Array,
                        awp: WeightPerturbation) -> Any:
  """AWP's direction v at training step ``step``: :func:`layerwise_scaled` of
  :func:`proxy_ascent`, or zeros while ``step < awp.warmup_steps`` (then the
  proxy's forward-backward is not run: ``lax.cond``)."""
  def direction(p):
    return layerwise_scaled(proxy_ascent(loss, p, awp.proxy_lr), p)
  if awp.warmup_steps <= 0:
    return direction(params)
  return jax.lax.cond(step >= awp.warmup_steps, direction,
                      lambda p: jax.tree.map(jnp.zeros_like, p), params)


def objective_loss(model: nn.Module, objective: Objective, *, batch_stats: Any, x: Array,
                   x_adv: Array, labels: Array, rngs: Optional[dict] = None,
                   smoothing: Optional[np.ndarray] = None,
                   trainable: str = "") -> Callable[[Any], Array]:
  """``params -> mean objective.outer_loss`` on the batch: the loss the proxy
  ascends. The model runs in training mode (batch statistics; the running
  statistics' update is discarded), reading the clean batch only when the
  objective needs it; ``smoothing`` and ``trainable`` as in the train step."""
  def loss(params):
    params = stop_frozen_gradients(params, trainable)
    apply = apply_fn(model, {"params": params, "batch_stats": batch_stats}, train=True,
                     labels=labels, rngs=rngs)
    out_clean = apply(x) if objective.needs_clean_pass else None
    return jnp.mean(objective.outer_loss(out_clean, apply(x_adv), labels, smoothing))
  return loss
