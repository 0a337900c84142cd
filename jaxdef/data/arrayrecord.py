"""The ``arrayrecord`` source: a folder ``jaxdef data import`` wrote, in memory.

``--config.data.name=arrayrecord --config.data.path=DEST`` trains any config
from an imported dataset; its classes, image shape and mean/std come from
``DEST/jaxdef_dataset.json`` (:mod:`jaxdef.data.records`). This module is the
in-memory path (``data.streamed=False``): every record is decoded into the
:class:`Dataset` before training starts. A dataset whose decoded images would
not fit in memory, or whose images vary in size, is refused in one line that
names the streamed path.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from jaxdef.data import records
from jaxdef.data.dataset import Dataset, kept_rows, limits, register
from jaxdef.errors import ConfigError
from jaxdef.progress import iterate

# The in-memory path refuses a dataset whose decoded images need more than this
# share of the host memory available when it starts (training needs the rest).
MEMORY_SHARE = 0.5
_STREAMED = "--config.data.streamed=true"


@register("arrayrecord")
def load_arrayrecord(data_config) -> Dataset:
  """Decodes the imported dataset in folder ``data_config.path`` (its train
  split and its test split, or val when it has no test split)."""
  dest = data_config.get("path", None)
  if not dest:
    raise ConfigError("data.path must name a folder written by `jaxdef data import SOURCE "
                      "DEST` for data.name='arrayrecord'")
  meta = records.read_metadata(str(dest))
  if meta.image_shape is None:
    raise ConfigError(f"{dest}: the images vary in size, and the in-memory path needs one "
                      f"size; train from it streamed ({_STREAMED})")
  max_train, max_test = limits(data_config)
  rows = {split: kept_rows(meta.splits[records.split_name(meta, split)].count, limit)
          for split, limit in (("train", max_train), ("test", max_test))}
  counts = [meta.splits[records.split_name(meta, s)].count if r is None else len(r)
            for s, r in rows.items()]
  refusal = memory_refusal(sum(counts) * int(np.prod(meta.image_shape)), available_memory())
  if refusal:
    raise ConfigError(f"{dest}: {counts[0]} + {counts[1]} images of "
                      f"{'x'.join(map(str, meta.image_shape))} {refusal}; train from it "
                      f"streamed ({_STREAMED}) or on a subset (--config.data.max_train=N)")
  x_train, y_train = read_split(meta, str(dest), "train", rows["train"])
  x_test, y_test = read_split(meta, str(dest), "test", rows["test"])
  return Dataset(name="arrayrecord", x_train=x_train, y_train=y_train, x_test=x_test,
                 y_test=y_test, num_classes=meta.num_classes, mean=meta.mean, std=meta.std)


def read_split(meta: records.RecordsMeta, dest: str, split: str,
               rows: Optional[np.ndarray] = None,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """``(images, labels)`` of ``split``: uint8 (N, H, W, C) and int32 (N,), the
  records ``rows`` (sorted; None: all) in their stored order."""
  import grain  # pylint: disable=import-outside-toplevel

  source = grain.sources.ArrayRecordDataSource(records.split_files(meta, dest, split))
  rows = np.arange(len(source)) if rows is None else rows
  images = np.empty((len(rows),) + tuple(meta.image_shape), np.uint8)
  labels = np.empty((len(rows),), np.int32)
  for i in iterate(range(len(rows)), f"read {split}", "img", disable=not progress):
    image, labels[i] = records.decode_record(source[int(rows[i])])
    if image.shape != images.shape[1:]:
      raise ConfigError(f"{dest}: record {rows[i]} of {split} is {image.shape}, the "
                        f"metadata says {images.shape[1:]} (import it again)")
    images[i] = image
  return images, labels


def memory_refusal(needed: int, available: Optional[int]) -> Optional[str]:
  """Why ``needed`` bytes of decoded images should not be held in memory
  (more than :data:`MEMORY_SHARE` of ``available``), or None."""
  if available is None or needed <= MEMORY_SHARE * available:
    return None
  return (f"need {needed / 2 ** 30:.1f} GiB decoded, more than {MEMORY_SHARE:.0%} of the "
          f"{available / 2 ** 30:.1f} GiB of memory available")


def available_memory() -> Optional[int]:
  """Bytes of host memory available now (Linux ``MemAvailable``), or None
  where it cannot be read."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None
