"""Maps ``config.model.name`` to a model constructor (one registry, no if-chains)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdef.models.base import Insert
from jaxdef.registry import Registry

_MODELS: Registry[Callable[..., nn.Module]] = Registry("model", [
    f"jaxdef.models.{m}" for m in ("small_cnn", "resnet", "wide_resnet", "vgg", "pssr")])
# ``@register('resnet18')`` on a constructor or module class.
register = _MODELS.register
model_names = _MODELS.names


def create_model(name: str, *, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], dtype: Any = jnp.float32,
                 insert: Optional[Insert] = None, **kwargs) -> nn.Module:
  """Builds model ``name`` (compute in ``dtype``, parameters always float32)."""
  return _MODELS.create(name, num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                       dtype=dtype, insert=insert, **kwargs)
