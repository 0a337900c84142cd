"""The in-memory ``Dataset`` and ``load_dataset``: ``config.data.name`` -> source.

Every source (embedded ``mnist5k``, any ``.npz``, the TFDS image datasets)
returns the same :class:`Dataset`: uint8 NHWC images and int32 labels as host
numpy arrays. Floats, augmentation and sharding happen later, on device
(``augment.py``, ``pipeline.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from jaxdef.errors import ConfigError, unknown_name
from jaxdef.registry import Registry

AUGMENTATIONS = ("none", "crop_flip", "rrc_flip")



@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test split of an image classification dataset, on the host.

  Attributes:
    name: the ``config.data.name`` it was loaded as.
    x_train: (N, H, W, C) uint8 images.
    y_train: (N,) int32 labels in ``[0, num_classes)``.
    x_test: (M, H, W, C) uint8 images.
    y_test: (M,) int32 labels.
    num_classes: number of classes of the classifier head.
    mean: per-channel mean of the training images on the [0, 1] scale.
    std: per-channel standard deviation on the [0, 1] scale.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    for split in ("train", "test"):
      x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
      if x.dtype != np.uint8 or x.ndim != 4:
        raise ConfigError(f"dataset {self.name!r}: x_{split} must be uint8 (N, H, W, C), "
                          f"got {x.dtype} {x.shape}")
      if y.dtype != np.int32 or y.shape != x.shape[:1]:
        raise ConfigError(f"dataset {self.name!r}: y_{split} must be int32 of shape "
                          f"{x.shape[:1]}, got {y.dtype} {y.shape}")
      if y.size and (y.min() < 0 or y.max() >= self.num_classes):
        raise ConfigError(f"dataset {self.name!r}: y_{split} has labels outside "
                          f"[0, {self.num_classes}) (min {y.min()}, max {y.max()})")
    if self.x_train.shape[1:] != self.x_test.shape[1:]:
      raise ConfigError(f"dataset {self.name!r}: train images {self.x_train.shape[1:]} and "
                        f"test images {self.x_test.shape[1:]} differ in shape")
    channels = self.x_train.shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ConfigError(f"dataset {self.name!r}: mean/std need {channels} values, got "
                        f"{len(self.mean)}/{len(self.std)}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.x_train.shape[1:])

  def subset(self, max_train: Optional[int] = None,
             max_test: Optional[int] = None) -> "Dataset":
    """Keeps at most ``max_train`` / ``max_test`` examples of each split.

    The kept examples are a fixed pseudo-random choice (the same on every run
    and machine), left in their original order. A plain "first N" would give a
    single class on class-sorted data such as ``mnist5k``. ``mean``/``std``
    stay those of the full training set.
    """
    return dataclasses.replace(
        self,
        **dict(zip(("x_train", "y_train"), _keep(max_train, self.x_train, self.y_train))),
        **dict(zip(("x_test", "y_test"), _keep(max_test, self.x_test, self.y_test))))


def split_validation(dataset: Dataset, val_size: int) -> tuple[Dataset, Dataset]:
  """``(train, validation)``: ``val_size`` training examples held out (a fixed
  pseudo-random choice, the same on every run and machine) as the
  validation set's *test* split, so the per-epoch evaluation can score it;
  the training split keeps the rest. The test split is never touched."""
  if not 0 < val_size < len(dataset.x_train):
    raise ConfigError(f"data.val_size={val_size} must be in [1, {len(dataset.x_train) - 1}] "
                      f"(the training split has {len(dataset.x_train)} examples)")
  held = np.zeros(len(dataset.x_train), bool)
  held[np.random.default_rng(1).permutation(len(held))[:val_size]] = True
  train = dataclasses.replace(dataset, x_train=dataset.x_train[~held],
                              y_train=dataset.y_train[~held])
  val = dataclasses.replace(dataset, x_test=dataset.x_train[held], y_test=dataset.y_train[held])
  return train, val


def kept_rows(count: int, limit: Optional[int]) -> Optional[np.ndarray]:
  """The rows :meth:`Dataset.subset` keeps of ``count`` examples, sorted
  (None: all of them); a fixed pseudo-random choice."""
  if limit is None or limit >= count:
    return None
  return np.sort(np.random.default_rng(0).permutation(count)[:limit])


def _keep(limit: Optional[int], x: np.ndarray, y: np.ndarray):
  rows = kept_rows(len(x), limit)
  return (x, y) if rows is None else (x[rows], y[rows])


_SOURCES: Registry[Callable[[Any], "Dataset"]] = Registry("dataset", [
    f"jaxdef.data.{m}" for m in ("embedded", "npz", "tfds_source", "arrayrecord")])
# ``@register('cifar10')`` on a ``loader(data_config) -> Dataset``.
register = _SOURCES.register
dataset_names = _SOURCES.names


def load_dataset(data_config) -> Dataset:
  """Loads the dataset that ``data_config`` (``config.data``) names.

  Fields: ``name`` (see :func:`dataset_names`), ``path`` (``npz``; the
  folder of ``arrayrecord``),
  ``data_dir`` (TFDS; None -> ``~/tensorflow_datasets``), ``augment``
  (checked here so a typo fails before any work), and the optional ints
  ``max_train``/``max_test`` (see :meth:`Dataset.subset`) and
  ``num_classes`` (``npz``).
  """
  loader = _SOURCES.get(data_config.get("name"))
  augment = data_config.get("augment", "none")
  if augment not in AUGMENTATIONS:
    raise unknown_name("augmentation", str(augment), AUGMENTATIONS)
  max_train, max_test = limits(data_config)
  return loader(data_config).subset(max_train, max_test)


def limits(data_config) -> tuple[Optional[int], Optional[int]]:
  """``(max_train, max_test)`` from the config, each None or a positive int.

  0 or None means "all" (configs use 0 so that ``--config.data.max_train=N``
  parses as an int on the command line).
  """
  out = []
  for field in ("max_train", "max_test"):
    value = data_config.get(field, None) or None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < 1):
      raise ConfigError(f"data.{field} must be a positive int or None, got {value!r}")
    out.append(None if value is None else int(value))
  return out[0], out[1]


def channel_mean_std(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of uint8 NHWC images on the [0, 1] scale.

  Sums in float64 over chunks of ``chunk`` images, so the memory used does not
  grow with the dataset.
  """
  moments = np.zeros((3, x.shape[-1]))
  for start in range(0, len(x), chunk):
    moments += channel_moments(x[start:start + chunk])
  return mean_std(moments)


def channel_moments(x: np.ndarray) -> np.ndarray:
  """(3, C) float64: the pixel count, sum and sum of squares of each channel
  of uint8 images (any leading shape, channels last), exact (from each
  channel's histogram of the 256 values). Moments of several blocks add up,
  so statistics of a stream of images are their sum."""
  histogram = np.stack([np.bincount(x[..., c].ravel(), minlength=256)
                        for c in range(x.shape[-1])]).astype(np.float64)
  values = np.arange(256.0)
  return np.stack([histogram.sum(axis=1), histogram @ values, histogram @ values ** 2])


def mean_std(moments: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, population std) on the [0, 1] scale from summed
  :func:`channel_moments`."""
  count = np.maximum(moments[0], 1.0)
  mean = moments[1] / count
  std = np.sqrt(np.maximum(moments[2] / count - mean ** 2, 0.0))
  return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)
