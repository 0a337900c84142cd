"""TFDS image datasets read from prepared ArrayRecord files into numpy.

Reading goes through ``tfds.data_source`` (random access over ArrayRecord,
images decoded with PIL/OpenCV), so training never imports TensorFlow. The
files must be prepared once, with network access, by ``jaxdef.data.prepare``;
nothing here downloads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from jaxdef.progress import iterate
from jaxdef.data.dataset import Dataset, limits, register
from jaxdef.errors import ConfigError

DEFAULT_DATA_DIR = "~/tensorflow_datasets"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """What jaxdef needs to know about one TFDS dataset.

  ``mean``/``std`` are the per-channel statistics of the training split on
  the [0, 1] scale (population std over all training pixels).
  """
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  test_split: str = "test"
  image_key: str = "image"
  label_key: str = "label"


SPECS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": TfdsSpec(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # SVHN's 531k-image "extra" split is not used.
    "svhn_cropped": TfdsSpec(10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": TfdsSpec(10, (0.1307,), (0.3081,)),
    "fashion_mnist": TfdsSpec(10, (0.2860,), (0.3530,)),
}


def prepare_command(name: str, data_dir: str) -> str:
  return f"python -m jaxdef.data.prepare --dataset {name} --data_dir {data_dir}"


@register(*SPECS)
def load_tfds_config(data_config) -> Dataset:
  """The TFDS sources: ``data_config.name`` in :data:`SPECS`."""
  max_train, max_test = limits(data_config)
  name = data_config.get("name")
  return load_tfds(name, SPECS[name],
                   data_dir=data_config.get("data_dir", None),
                   max_train=max_train, max_test=max_test)


def load_tfds(name: str, spec: TfdsSpec, *, data_dir: Optional[str] = None,
              max_train: Optional[int] = None, max_test: Optional[int] = None,
              progress: bool = True) -> Dataset:
  """Reads TFDS dataset ``name`` prepared as ArrayRecord under ``data_dir``.

  Only the first ``max_train``/``max_test`` records are read (TFDS shuffled
  the records when it prepared them). Raises ConfigError, with the command
  that prepares the dataset, when it is not prepared.
  """
  import tensorflow_datasets as tfds  # Imported here: only TFDS sources pay for it.

  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  try:
    train, test = tfds.data_source(name, split=[spec.train_split, spec.test_split],
                                   data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises NotImplementedError, FileNotFoundError, ...
    raise _unreadable(tfds, name, data_dir, e) from None
  x_train, y_train = _read_split(train, spec, max_train, f"{name}/{spec.train_split}", progress)
  x_test, y_test = _read_split(test, spec, max_test, f"{name}/{spec.test_split}", progress)
  return Dataset(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                 num_classes=spec.num_classes, mean=spec.mean, std=spec.std)


def _unreadable(tfds, name: str, data_dir: str, error: Exception) -> ConfigError:
  """The one-line error for a dataset that ``tfds.data_source`` cannot open."""
  command = prepare_command(name, data_dir)
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if not prepared:
    return ConfigError(f"TFDS dataset {name!r} is not prepared in {data_dir}; prepare it "
                       f"once (needs network) with: {command}")
  reason = (str(error).strip().splitlines() or [""])[0]
  return ConfigError(f"TFDS dataset {name!r} in {data_dir} cannot be read as ArrayRecord "
                     f"({type(error).__name__}: {reason}); delete it and prepare it again "
                     f"with: {command}")


def _read_split(source, spec: TfdsSpec, limit: Optional[int], desc: str,
                progress: bool) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the first ``limit`` records of a data source into numpy arrays."""
  count = len(source) if limit is None else min(limit, len(source))
  images: Optional[np.ndarray] = None
  labels = np.empty((count,), np.int32)
  for i in iterate(range(count), desc, "img", disable=not progress):
    example = source[i]
    image = np.asarray(example[spec.image_key])
    if images is None:  # The first record fixes the shape.
      images = np.empty((count,) + image.shape, np.uint8)
    images[i] = image
    labels[i] = example[spec.label_key]
  if images is None:
    raise ConfigError(f"TFDS split {desc} is empty")
  return images, labels
