"""The model zoo: ``create_model(name, ...)`` and the tap-point contract.

Models: ``small_cnn``, ``resnet18``, ``preact_resnet18``, ``resnet50``,
``wide_resnet`` (``wrn34_10``), ``dm_wide_resnet``, ``vgg16``; see :mod:`jaxdef.models.base` for what every model
returns and where defenses plug in.
"""

from jaxdef.models.base import (Insert, ModelOutput, Normalize, Taps,
                                perturbation_zeros, split_variables)
from jaxdef.models.registry import create_model, model_names, register

__all__ = ["Insert", "ModelOutput", "Normalize", "Taps", "create_model",
           "model_names", "perturbation_zeros", "register", "split_variables"]
