"""The on-disk format of an imported dataset: ArrayRecord shards + metadata.

``jaxdef data import SOURCE DEST`` writes a folder DEST holding, per split,
ArrayRecord files ``train-00000-of-00004.array_record`` ... (random access,
read by ``grain.sources.ArrayRecordDataSource`` or array_record's reader) and
``DEST/jaxdef_dataset.json``, written last (see :class:`RecordsMeta`).

Each record is one example, a msgpack map::

  {"image": bytes, "encoding": "raw" | "png" | "jpeg", "shape": [H, W, C], "label": int}

``raw`` holds uint8 HWC pixels in C order (the fast path for small images of
one shape); ``png``/``jpeg`` hold the file's original bytes, decoded by PIL
when read, and ``shape`` is the decoded shape: C is 1 (grayscale) or 3 (RGB;
a palette is expanded, an alpha channel dropped).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Optional

import msgpack
import numpy as np

from jaxdef.errors import ConfigError

METADATA = "jaxdef_dataset.json"
FORMAT = "jaxdef-arrayrecord"
VERSION = 1
ENCODINGS = ("raw", "png", "jpeg")
SUFFIX = ".array_record"
# One record per chunk: reading example i decompresses example i alone (the
# setting for random access that TFDS and Grain use), zstd-compressed.
WRITER_OPTIONS = "group_size:1"
# PIL modes that decode to one channel; every other mode decodes to RGB.
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_HOW_TO_IMPORT = "jaxdef data import SOURCE DEST"


def encode_record(image: Any, label: int, *, encoding: str = "raw",
                  channels: Optional[int] = None) -> bytes:
  """One example as a record.

  Args:
    image: for ``raw``, a uint8 (H, W, C) array; for ``png``/``jpeg``, the
      file's encoded bytes.
    label: the class index, >= 0.
    encoding: one of :data:`ENCODINGS`.
    channels: ``png``/``jpeg`` only: decode to this many channels (1 or 3);
      None keeps the file's own (1 for a grayscale file, else 3).

  Raises ValueError for an image that is not what ``encoding`` says.
  """
  if encoding not in ENCODINGS:
    raise ValueError(f"unknown record encoding {encoding!r} (valid: {', '.join(ENCODINGS)})")
  if isinstance(label, bool) or int(label) != label or label < 0:
    raise ValueError(f"a label must be an int >= 0, got {label!r}")
  if encoding == "raw":
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
      raise ValueError(f"a raw record needs a uint8 (H, W, C) image, got {pixels.dtype} "
                       f"{pixels.shape}")
    data, shape = np.ascontiguousarray(pixels).tobytes(), pixels.shape
  else:
    data = bytes(image)
    shape = encoded_shape(data, encoding, channels)
  return msgpack.packb({"image": data, "encoding": encoding, "shape": [int(s) for s in shape],
                        "label": int(label)}, use_bin_type=True)


def encoded_shape(data: bytes, encoding: str, channels: Optional[int] = None
                  ) -> tuple[int, int, int]:
  """The decoded (H, W, C) of PNG/JPEG ``data`` from its header alone."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as img:
    if img.format != encoding.upper():
      raise ValueError(f"the bytes are {img.format} data, not {encoding.upper()}")
    width, height = img.size
    mode = img.mode
  channels = channels or mode_channels(mode)
  if channels not in (1, 3):
    raise ValueError(f"an encoded image decodes to 1 or 3 channels, not {channels}")
  return height, width, channels


def mode_channels(mode: str) -> int:
  """The channels an image of PIL ``mode`` decodes to: 1 for grayscale, else 3."""
  return 1 if mode in _GRAY_MODES else 3


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """``(image, label)`` of a record: a writable uint8 (H, W, C) array and an int."""
  fields = msgpack.unpackb(record, raw=False)
  shape = tuple(fields["shape"])
  if fields["encoding"] == "raw":
    image = np.frombuffer(fields["image"], np.uint8).reshape(shape).copy()
  else:
    image = decode_image(fields["image"], channels=shape[-1])
    if image.shape != shape:
      raise ValueError(f"a record's {fields['encoding']} image decodes to {image.shape}, "
                       f"its record says {shape}")
  return image, int(fields["label"])


def decode_image(data: bytes, channels: int) -> np.ndarray:
  """PNG/JPEG ``data`` decoded by PIL to uint8 (H, W, channels), channels 1 or 3."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(io.BytesIO(data)) as img:
    pixels = np.asarray(img.convert("L" if channels == 1 else "RGB"))
  return pixels.reshape(pixels.shape[:2] + (channels,))


@dataclasses.dataclass(frozen=True)
class SplitMeta:
  """One split of an imported dataset.

  Attributes:
    files: the shard file names, relative to the dataset folder, in order
      (record ``i`` of the split is record ``i`` of their concatenation).
    count: the number of records.
    class_counts: records per class, ``num_classes`` ints.
  """
  files: tuple[str, ...]
  count: int
  class_counts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class RecordsMeta:
  """The contents of ``DEST/jaxdef_dataset.json``.

  Attributes:
    format, version: :data:`FORMAT` and :data:`VERSION`.
    num_classes: classes of the classifier head.
    class_names: ``num_classes`` names (class ``i`` is ``class_names[i]``).
    image_shape: (H, W, C) shared by every image, or None when sizes vary.
    channels: C.
    mean, std: per-channel statistics of the training images' pixels on the
      [0, 1] scale (population std), computed while writing.
    splits: ``'train'`` and ``'test'`` and/or ``'val'`` -> :class:`SplitMeta`.
    skipped: ``{"path", "reason"}`` of each source file left out.
    source: ``{"format", "path"}`` the dataset was imported from.
    created: when the import finished (ISO 8601, UTC).
  """
  format: str
  version: int
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: Optional[tuple[int, int, int]]
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  splits: dict[str, SplitMeta]
  skipped: tuple[dict[str, str], ...]
  source: dict[str, str]
  created: str

  def to_json(self) -> dict[str, Any]:
    """The JSON object written to :data:`METADATA`."""
    out = dataclasses.asdict(self)
    out["splits"] = {name: dataclasses.asdict(split) for name, split in self.splits.items()}
    return out


def shard_names(split: str, shards: int) -> list[str]:
  """``['train-00000-of-00004.array_record', ...]``: the file names of a split."""
  return [f"{split}-{i:05d}-of-{shards:05d}{SUFFIX}" for i in range(shards)]


class SplitWriter:
  """Writes the records of one split into ``shards`` ArrayRecord files.

  Records fill the shards in order (record ``i`` of the split lands in shard
  ``i * shards // expected``), so reading the shards one after another gives
  the records in the order they were written. ``expected`` is the number of
  records planned; when fewer arrive (skipped files), the last shards are
  shorter. Use as a context manager; :meth:`finish` returns the split's
  :class:`SplitMeta`.
  """

  def __init__(self, folder: str, split: str, *, shards: int, expected: int,
               num_classes: int, options: str = WRITER_OPTIONS):
    self.folder, self.options = folder, options
    self.files = shard_names(split, max(1, shards))
    self.expected = max(1, expected)
    self.class_counts = [0] * num_classes
    self.count = 0
    self._index, self._writer = -1, None

  def write(self, record: bytes, label: int) -> None:
    """Appends one record (from :func:`encode_record`) of class ``label``."""
    shard = min(self.count * len(self.files) // self.expected, len(self.files) - 1)
    while self._index < shard:
      self._open_next()
    self._writer.write(record)
    self.class_counts[label] += 1
    self.count += 1

  def _open_next(self) -> None:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    if self._writer is not None:
      self._writer.close()
    self._index += 1
    self._writer = array_record_module.ArrayRecordWriter(
        os.path.join(self.folder, self.files[self._index]), self.options)

  def finish(self) -> SplitMeta:
    """Closes the files (every shard exists, maybe empty) and describes the split."""
    while self._index < len(self.files) - 1:
      self._open_next()
    self._writer.close()
    self._writer = None
    return SplitMeta(tuple(self.files), self.count, tuple(self.class_counts))

  def __enter__(self) -> "SplitWriter":
    return self

  def __exit__(self, *exc) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def write_metadata(dest: str, meta: RecordsMeta) -> None:
  """Writes ``meta`` to ``dest/jaxdef_dataset.json`` (the import's last step)."""
  with open(os.path.join(dest, METADATA), "w", encoding="utf-8") as f:
    json.dump(meta.to_json(), f, indent=1)
    f.write("\n")


def read_metadata(dest: str) -> RecordsMeta:
  """The metadata of the imported dataset in folder ``dest``.

  Raises ConfigError (one line) when the folder or its metadata is missing
  (an import that did not finish writes none), unreadable, incomplete, of
  another format or version, or names a shard file that is not there.
  """
  dest = os.path.expanduser(str(dest))
  if not os.path.isdir(dest):
    raise ConfigError(f"{dest}: no such folder (make an imported dataset with "
                      f"{_HOW_TO_IMPORT})")
  path = os.path.join(dest, METADATA)
  if not os.path.isfile(path):
    raise ConfigError(f"{dest} has no {METADATA}: not a dataset written by {_HOW_TO_IMPORT}, "
                      f"or an import that did not finish (import it again)")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: not a JSON object")
  if raw.get("format") != FORMAT or raw.get("version") != VERSION:
    raise ConfigError(f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}, "
                      f"this jaxdef reads {FORMAT!r} version {VERSION} (import it again)")
  meta = _parse(raw, path)
  for split in meta.splits.values():
    for name in split.files:
      if not os.path.isfile(os.path.join(dest, name)):
        raise ConfigError(f"{path}: shard file {name} is missing (import it again)")
  return meta


def _parse(raw: dict[str, Any], path: str) -> RecordsMeta:
  """Checks the fields' presence and types; ConfigError naming the first bad one."""
  fields = {f.name for f in dataclasses.fields(RecordsMeta)}
  missing = sorted(fields - set(raw))
  if missing:
    raise ConfigError(f"{path}: incomplete, missing {', '.join(missing)} (import it again)")

  def bad(field: str) -> ConfigError:
    return ConfigError(f"{path}: field {field!r} is malformed: {raw.get(field)!r:.80}")

  num_classes, channels = raw["num_classes"], raw["channels"]
  if not _is_int(num_classes) or num_classes < 1:
    raise bad("num_classes")
  if not _is_int(channels) or channels < 1:
    raise bad("channels")
  if not _str_list(raw["class_names"]) or len(raw["class_names"]) != num_classes:
    raise bad("class_names")
  shape = raw["image_shape"]
  if shape is not None and not (_int_list(shape, 3) and shape[-1] == channels):
    raise bad("image_shape")
  for field in ("mean", "std"):
    if not (isinstance(raw[field], list) and len(raw[field]) == channels
            and all(isinstance(v, (int, float)) for v in raw[field])):
      raise bad(field)
  splits = raw["splits"]
  if not isinstance(splits, dict) or "train" not in splits:
    raise bad("splits")
  parsed = {}
  for name, split in splits.items():
    if not (isinstance(split, dict) and _str_list(split.get("files"))
            and _is_int(split.get("count")) and _int_list(split.get("class_counts"), num_classes)
            and sum(split["class_counts"]) == split["count"]):
      raise bad("splits")
    parsed[name] = SplitMeta(tuple(split["files"]), split["count"],
                             tuple(split["class_counts"]))
  skipped = raw["skipped"]
  if not (isinstance(skipped, list) and all(isinstance(s, dict) for s in skipped)):
    raise bad("skipped")
  if not isinstance(raw["source"], dict):
    raise bad("source")
  return RecordsMeta(
      format=FORMAT, version=VERSION, num_classes=num_classes,
      class_names=tuple(raw["class_names"]),
      image_shape=None if shape is None else tuple(shape), channels=channels,
      mean=tuple(float(v) for v in raw["mean"]), std=tuple(float(v) for v in raw["std"]),
      splits=parsed, skipped=tuple(skipped), source=dict(raw["source"]),
      created=str(raw["created"]))


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any, length: int) -> bool:
  return (isinstance(value, list) and len(value) == length
          and all(_is_int(v) and v >= 0 for v in value))


def _str_list(value: Any) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def split_files(meta: RecordsMeta, dest: str, split: str) -> list[str]:
  """Absolute paths of the shard files of ``split``; ``'test'`` falls back
  to ``'val'`` for a dataset without a test split."""
  name = split_name(meta, split)
  return [os.path.abspath(os.path.join(os.path.expanduser(str(dest)), f))
          for f in meta.splits[name].files]


def split_name(meta: RecordsMeta, split: str) -> str:
  """The split of ``meta`` that serves as ``split`` (``'test'`` -> ``'val'``
  when there is no test split); ConfigError naming the splits there are."""
  if split in meta.splits:
    return split
  if split == "test" and "val" in meta.splits:
    return "val"
  raise ConfigError(f"the imported dataset has no {split!r} split (it has: "
                    f"{', '.join(sorted(meta.splits))})")

