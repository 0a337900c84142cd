"""Maps ``config.model.name`` to a model constructor (one registry, no if-chains)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxdef.errors import unknown_name
from jaxdef.models.base import Insert

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator: ``@register('resnet18')`` on a constructor or module class."""
  def wrap(fn):
    _MODELS[name] = fn
    return fn
  return wrap


def model_names() -> list[str]:
  _load_all()
  return sorted(_MODELS)


def create_model(name: str, *, num_classes: int, mean: Sequence[float],
                 std: Sequence[float], dtype: Any = jnp.float32,
                 insert: Optional[Insert] = None, **kwargs) -> nn.Module:
  """Builds model ``name`` (compute in ``dtype``, parameters always float32)."""
  _load_all()
  if name not in _MODELS:
    raise unknown_name("model", name, _MODELS)
  return _MODELS[name](num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                       dtype=dtype, insert=insert, **kwargs)


def _load_all():
  # Importing the modules runs their @register decorators.
  from jaxdef.models import small_cnn, resnet, wide_resnet, vgg  # noqa: F401
