"""Any ``.npz`` with ``x_train, y_train, x_test, y_test`` as a :class:`Dataset`.

Images are uint8, (N, H, W, C) or grayscale (N, H, W); labels are integers.
``mean``/``std`` are computed from ``x_train``; ``num_classes`` is
``data.num_classes`` when set, else the largest label + 1.
"""

from __future__ import annotations

import os
import zipfile
from typing import IO, Optional, Union

import numpy as np

from jaxdef.data.dataset import Dataset, channel_mean_std, register
from jaxdef.errors import ConfigError

KEYS = ("x_train", "y_train", "x_test", "y_test")
_HOW_TO_WRITE = "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"


@register("npz")
def load_npz(data_config) -> Dataset:
  """The ``npz`` source: reads ``data_config.path``."""
  path = data_config.get("path", None)
  if not path:
    raise ConfigError(f"data.path must name an .npz file for data.name='npz' (write one with "
                      f"{_HOW_TO_WRITE})")
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise ConfigError(f"npz file not found: {path} (data.path; write one with {_HOW_TO_WRITE})")
  return dataset_from_npz(path, name="npz", num_classes=data_config.get("num_classes", None),
                          where=path)


def dataset_from_npz(file: Union[str, IO[bytes]], *, name: str,
                     num_classes: Optional[int] = None, where: str = "") -> Dataset:
  """Reads and validates the four arrays of an npz ``file`` into a Dataset.

  ``where`` names the file in error messages.
  """
  where = where or str(file)
  try:
    with np.load(file, allow_pickle=False) as archive:
      missing = [k for k in KEYS if k not in archive.files]
      if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)} (has: "
                          f"{', '.join(sorted(archive.files)) or 'none'}; needs {', '.join(KEYS)})")
      arrays = {k: archive[k] for k in KEYS}
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from None

  for split in ("train", "test"):
    arrays[f"x_{split}"] = _images(arrays[f"x_{split}"], f"{where}: x_{split}")
    arrays[f"y_{split}"] = _labels(arrays[f"y_{split}"], f"{where}: y_{split}")
  if num_classes is None:
    num_classes = int(max((arrays[k].max() for k in ("y_train", "y_test") if arrays[k].size),
                          default=-1)) + 1
  elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ConfigError(f"data.num_classes must be a positive int, got {num_classes!r}")
  if len(arrays["x_train"]) == 0:
    raise ConfigError(f"{where}: x_train is empty")
  mean, std = channel_mean_std(arrays["x_train"])
  return Dataset(name=name, num_classes=int(num_classes), mean=mean, std=std, **arrays)


def _images(x: np.ndarray, what: str) -> np.ndarray:
  if x.dtype != np.uint8:
    raise ConfigError(f"{what} must be uint8 images 0..255, got dtype {x.dtype}")
  if x.ndim == 3:  # grayscale (N, H, W)
    x = x[..., None]
  if x.ndim != 4:
    raise ConfigError(f"{what} must have shape (N, H, W, C) or (N, H, W), got {x.shape}")
  return x


def _labels(y: np.ndarray, what: str) -> np.ndarray:
  if not np.issubdtype(y.dtype, np.integer):
    raise ConfigError(f"{what} must be integer labels, got dtype {y.dtype}")
  if y.ndim != 1:
    raise ConfigError(f"{what} must have shape (N,), got {y.shape}")
  if y.size and y.min() < 0:
    raise ConfigError(f"{what} has negative labels (min {y.min()})")
  if y.size and y.max() > np.iinfo(np.int32).max:
    raise ConfigError(f"{what} has labels too large for int32 (max {y.max()})")
  return y.astype(np.int32)
