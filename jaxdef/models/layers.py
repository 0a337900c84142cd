"""Pieces every jaxdef architecture is built from.

:class:`Classifier` holds the fields that ``create_model`` passes to every
model; :func:`conv`, :func:`batch_norm` and :func:`classify` fix the
initialisation, BatchNorm statistics and logits dtype in one place so that
all models agree on them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdef.errors import unknown_name
from jaxdef.models.base import Array, Insert, ModelOutput, Taps

# Kaiming-normal with fan_out (He et al. 2015), untruncated, as in the reference
# PyTorch CIFAR models: the published training recipes were tuned with it.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Classifier(nn.Module):
  """Fields shared by all models (what ``create_model`` passes).

  Attributes:
    num_classes: number of logits.
    mean, std: per-channel dataset statistics; inputs are in [0, 1] and the
      model normalises them itself. The defaults leave inputs unchanged.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters and BatchNorm
      statistics stay float32 and logits are always float32.
    insert: defense modules to plug in at named tap points (or None).
  """
  num_classes: int = 10
  mean: Sequence[float] = (0.0,)
  std: Sequence[float] = (1.0,)
  dtype: Any = jnp.float32
  insert: Optional[Insert] = None


# Activations by config name: 'swish' is SiLU, x * sigmoid(x) (the DeepMind WRNs).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": nn.relu, "swish": nn.swish}


def activation(name: str) -> Callable[[Array], Array]:
  """The activation function called ``name``; a one-line ConfigError otherwise."""
  if name not in ACTIVATIONS:
    raise unknown_name("activation", name, ACTIVATIONS)
  return ACTIVATIONS[name]


def conv(features: int, kernel: int, strides: int = 1, *, dtype: Any,
         padding: str | int | Sequence[tuple[int, int]] | None = None,
         use_bias: bool = False) -> nn.Conv:
  """A square convolution with He init, no bias by default (BN follows).

  The default padding is ``kernel // 2`` on every side, as in PyTorch: with
  stride 2 ``'SAME'`` would pad only the bottom/right and shift the sampling
  grid relative to the reference models. Explicit ``((top, bottom), (left,
  right))`` pairs are passed through.
  """
  if padding is None:
    padding = kernel // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, use_bias=use_bias, kernel_init=he_normal,
                 dtype=dtype)


def batch_norm(train: bool, dtype: Any, decay: float = 0.9) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults: ``decay`` is the running statistics'
  decay (Flax's ``momentum``), PyTorch's momentum 0.1 as 0.9; the DeepMind and
  Wang et al. 2023 WRNs use 0.99 (PyTorch momentum 0.01)."""
  return nn.BatchNorm(use_running_average=not train, momentum=decay, epsilon=1e-5,
                      dtype=dtype)


def tap_names(name: str, alias: str, is_last: bool) -> str | tuple[str, str]:
  """``name``, plus ``alias`` when this is the last layer of its group."""
  return (name, alias) if is_last else name


def classify(taps: Taps, features: Array, num_classes: int, dtype: Any,
             names: str | Sequence[str] = "penultimate",
             zero_init: bool = False) -> ModelOutput:
  """Taps (N, D) ``features`` as ``names``; applies the linear layer ``head``
  (its weights initialised to zero with ``zero_init``, Flax's default otherwise;
  the bias starts at zero either way).

  Logits are cast to float32 so that losses and attacks see the same dtype
  whatever the compute dtype.
  """
  features = taps(names, features)
  init = {"kernel_init": nn.initializers.zeros} if zero_init else {}
  logits = nn.Dense(num_classes, dtype=dtype, name="head", **init)(features)
  return taps.output(logits.astype(jnp.float32))
