"""From a config (and the dataset's metadata) to model, objective and defense.

The trainer, the evaluator and :func:`jaxdef.restore` all build through here,
so a restored model is exactly the trained one, defenses included.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from jaxdef.config import configured_defense, configured_objective, section_kwargs
from jaxdef.defenses import Defense
from jaxdef.models.registry import create_model
from jaxdef.objectives import Objective


@dataclasses.dataclass(frozen=True)
class DataMeta:
  """What a model needs to know of its data; saved beside every checkpoint."""
  name: str
  num_classes: int
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dataset(cls, dataset: Any) -> "DataMeta":
    """The metadata of a loaded :class:`jaxdef.data.Dataset`."""
    return cls(name=dataset.name, num_classes=int(dataset.num_classes),
               image_shape=tuple(int(s) for s in dataset.image_shape),
               mean=tuple(float(m) for m in dataset.mean),
               std=tuple(float(s) for s in dataset.std))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DataMeta":
    return cls(name=d["name"], num_classes=int(d["num_classes"]),
               image_shape=tuple(d["image_shape"]), mean=tuple(d["mean"]),
               std=tuple(d["std"]))


def model_kwargs(model: ml_collections.ConfigDict) -> dict[str, Any]:
  """The model constructor's keyword arguments: ``model.kwargs``, plus
  ``remat=True`` when ``model.remat`` is set (a model without that field is then
  refused in one line by the registry, naming the arguments it takes)."""
  kwargs = section_kwargs(model)
  if model.get("remat", False):
    kwargs["remat"] = True
  return kwargs


def build(config: ml_collections.ConfigDict, meta: DataMeta
          ) -> tuple[nn.Module, Objective, Defense]:
  """The model (with the defense's modules inserted), objective and defense."""
  defense = configured_defense(config)
  objective = configured_objective(config)
  dtype = jnp.bfloat16 if config.train.dtype == "bfloat16" else jnp.float32
  # model.normalize False: the model sees the [0, 1] image (the CAS and FSR codes).
  standardise = config.model.get("normalize", True)
  mean = meta.mean if standardise else (0.0,) * len(meta.mean)
  std = meta.std if standardise else (1.0,) * len(meta.std)
  model = create_model(config.model.name, num_classes=meta.num_classes, mean=mean,
                       std=std, dtype=dtype,
                       insert=defense.insert(config.model.name, meta.num_classes),
                       **model_kwargs(config.model))
  return model, objective, defense
