"""``jaxdef data import SOURCE DEST``: a dataset on disk -> ArrayRecord shards.

Writes the format of :mod:`jaxdef.data.records` from one of three sources,
detected from SOURCE or named with ``--format``:

* ``imagefolder``: ``SOURCE/train/`` and ``SOURCE/test/`` and/or
  ``SOURCE/val/``, each holding one folder per class of ``.jpg``/``.jpeg``/
  ``.png`` files (any depth below the class folder). Classes are the train
  split's class folders sorted by name, as torchvision's ImageFolder numbers
  them; a val/test class folder the train split lacks is refused. Hidden
  files are ignored; any other file is listed as skipped. A first pass reads
  every image's header: when at least :data:`ONE_SHAPE_SHARE` of the images
  share one (H, W, C), that is the dataset's shape and the others are skipped
  as mismatched; otherwise sizes vary, every image is kept, and each decodes
  to the most common channel count. Images of one shape of at most
  :data:`RAW_MAX_PIXELS` pixels are stored decoded (``raw``: the fastest to
  read); larger or varying ones keep their original JPEG/PNG bytes.
* ``npz``: an ``.npz`` file or a folder of them (not searched below), read in
  name order as one dataset. A file holds ``image`` and ``label`` (the
  layout of the published generated-data releases; its examples go to the
  train split) or ``x_train, y_train, x_test, y_test`` (jaxdef's ``npz``
  source). Images are uint8 (N, H, W, C) or (N, H, W); the most common shape
  is the dataset's and a file of another shape is skipped; classes are
  ``0 .. max label``. Stored ``raw``.
* ``tfds``: a TFDS dataset already prepared as ArrayRecord (``jaxdef.data.
  prepare``): SOURCE is its ``DATA_DIR/NAME/VERSION`` folder, or its name
  with ``data_dir``. Splits ``train``, ``test`` and ``validation`` (as
  ``val``); images are stored ``raw`` as TFDS decodes them. Never downloads.

Nothing is held in memory beyond a chunk of images and the list of file
names. An unreadable or mismatched file, or a label outside the classes, is
skipped and listed in the metadata's ``skipped``. The shards are written to
a hidden sibling folder of DEST, renamed to DEST after the metadata (written
last) is in place; an interrupted import leaves no DEST behind.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import shutil
import uuid
import zipfile
from typing import Callable, Iterator, Optional

import numpy as np

from jaxdef.data import records
from jaxdef.data.dataset import channel_moments, mean_std
from jaxdef.errors import ConfigError
from jaxdef.progress import bar, iterate

FORMATS = ("imagefolder", "npz", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Images of one shape up to this many pixels (64 x 64) are stored decoded.
RAW_MAX_PIXELS = 64 * 64
# The share of images that must have one shape for it to be the dataset's.
ONE_SHAPE_SHARE = 0.9
# The shard size the default number of shards aims at.
SHARD_BYTES = 512 * 2 ** 20
# Images read from an .npz member at a time.
NPZ_CHUNK = 1024
_SPLIT_FOLDERS = ("train", "val", "test")
_TFDS_SPLITS = {"train": "train", "validation": "val", "test": "test"}


@dataclasses.dataclass
class Chunk:
  """What a source hands the writer at a time.

  ``records``/``labels`` are to be written; ``pixels`` are their decoded
  images (any leading shape, channels last) for the mean/std; ``skipped``
  lists what was left out; ``seen`` is how many source examples this covers.
  """
  records: list[bytes]
  labels: list[int]
  pixels: Optional[np.ndarray]
  skipped: list[dict[str, str]]
  seen: int


def skipped_chunk(path: str, reason: str, seen: int = 1) -> Chunk:
  return Chunk([], [], None, [{"path": path, "reason": reason}], seen)


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """One split to write: ``count`` examples, about ``example_bytes`` each on
  disk, read by ``chunks()``."""
  count: int
  example_bytes: float
  chunks: Callable[[], Iterator[Chunk]]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A source read far enough to know its classes, shape and splits."""
  format: str
  path: str
  class_names: tuple[str, ...]
  image_shape: Optional[tuple[int, int, int]]
  channels: int
  encoding: str
  splits: dict[str, SplitSource]
  skipped: tuple[dict[str, str], ...] = ()


def import_dataset(source: str, dest: str, *, source_format: Optional[str] = None,
                   shards: Optional[int] = None, overwrite: bool = False,
                   data_dir: Optional[str] = None, progress: bool = True) -> records.RecordsMeta:
  """Imports ``source`` into the folder ``dest``; returns the written metadata.

  Args:
    source: what to import (see the module docstring).
    dest: the folder to create.
    source_format: one of :data:`FORMATS`; None detects it.
    shards: shard files of the train split (the others get as many in
      proportion to their size); None aims at :data:`SHARD_BYTES` a shard.
    overwrite: replace ``dest`` when it holds an imported dataset.
    data_dir: the TFDS data_dir when ``source`` is a TFDS name.
    progress: show progress bars.

  Raises ConfigError (one line) for a source that cannot be imported or a
  ``dest`` that must not be written.
  """
  source = os.path.abspath(os.path.expanduser(str(source)))
  dest = os.path.abspath(os.path.expanduser(str(dest)))
  if shards is not None and (isinstance(shards, bool) or shards < 1):
    raise ConfigError(f"--shards must be a positive integer, got {shards!r}")
  check_dest(dest, overwrite)
  plan = make_plan(source, source_format or detect_format(source, data_dir), data_dir,
                   progress)
  parent = os.path.dirname(dest)
  os.makedirs(parent, exist_ok=True)
  work = sibling(dest, "importing")
  os.mkdir(work)  # with the user's umask, as DEST will have
  try:
    meta = write_plan(plan, work, shards, progress)
    records.write_metadata(work, meta)
    replace_folder(work, dest)
  except BaseException:
    shutil.rmtree(work, ignore_errors=True)
    raise
  return meta


def check_dest(dest: str, overwrite: bool) -> None:
  """ConfigError unless ``dest`` may be written: it is absent or an empty
  folder, or (with ``overwrite``) a dataset an earlier import wrote."""
  if not os.path.lexists(dest):
    return
  if not os.path.isdir(dest):
    raise ConfigError(f"{dest} exists and is not a folder; import into a new folder")
  if not os.listdir(dest):
    return
  if not os.path.isfile(os.path.join(dest, records.METADATA)):
    raise ConfigError(f"{dest} exists and does not hold an imported dataset; import into a "
                      f"new folder (nothing there is replaced)")
  if not overwrite:
    raise ConfigError(f"{dest} already holds an imported dataset; pass --overwrite to "
                      f"replace it")


def replace_folder(work: str, dest: str) -> None:
  """Renames the finished folder ``work`` to ``dest``; an old ``dest`` is
  moved aside first and deleted only once ``dest`` is in place."""
  if os.path.isdir(dest) and os.listdir(dest):
    old = sibling(dest, "replaced")
    os.rename(dest, old)
    os.rename(work, dest)
    shutil.rmtree(old)
  else:
    os.replace(work, dest)  # over an empty folder, or none


def sibling(dest: str, what: str) -> str:
  """A new hidden name beside ``dest``: ``.NAME.importing-1a2b3c4d``."""
  return os.path.join(os.path.dirname(dest),
                      f".{os.path.basename(dest)}.{what}-{uuid.uuid4().hex[:8]}")


def detect_format(source: str, data_dir: Optional[str] = None) -> str:
  """The format of ``source`` (see the module docstring); ConfigError when
  it is none of them."""
  if os.path.isfile(source):
    if source.endswith(".npz"):
      return "npz"
    raise ConfigError(f"{source} is a file but not an .npz file; SOURCE is an ImageFolder "
                      f"tree, an .npz file or folder, or a prepared TFDS dataset")
  if os.path.isdir(source):
    names = os.listdir(source)
    if "train" in names and os.path.isdir(os.path.join(source, "train")):
      return "imagefolder"
    if any(n.endswith(".npz") for n in names):
      return "npz"
    if "dataset_info.json" in names:
      return "tfds"
    raise ConfigError(f"cannot tell the format of {source}: no train/ folder (ImageFolder), "
                      f"no .npz files, no dataset_info.json (a prepared TFDS dataset); name "
                      f"it with --format {'|'.join(FORMATS)}")
  if data_dir:
    return "tfds"
  raise ConfigError(f"{source}: no such file or folder (a TFDS dataset's name needs "
                    f"--format tfds or --data_dir)")


def make_plan(source: str, fmt: str, data_dir: Optional[str], progress: bool) -> Plan:
  """The :class:`Plan` of ``source`` read as format ``fmt``."""
  if fmt not in FORMATS:
    raise ConfigError(f"unknown --format {fmt!r} (valid: {', '.join(FORMATS)})")
  if fmt == "tfds":
    return plan_tfds(source, data_dir)
  if not os.path.exists(source):
    raise ConfigError(f"{source}: no such file or folder")
  return plan_imagefolder(source, progress) if fmt == "imagefolder" else plan_npz(source)


def write_plan(plan: Plan, folder: str, shards: Optional[int],
               progress: bool) -> records.RecordsMeta:
  """Writes every split of ``plan`` into ``folder``; the metadata to write."""
  num_classes, train = len(plan.class_names), plan.splits["train"]
  train_shards = shards or max(1, math.ceil(train.count * train.example_bytes / SHARD_BYTES))
  moments = np.zeros((3, plan.channels))
  skipped = list(plan.skipped)
  splits = {}
  for split, part in plan.splits.items():
    count = max(1, math.ceil(train_shards * part.count / max(train.count, 1)))
    with records.SplitWriter(folder, split, shards=count, expected=part.count,
                             num_classes=num_classes) as writer, \
        bar(part.count, f"import {split}", "img", disable=not progress) as shown:
      for chunk in part.chunks():
        for record, label in zip(chunk.records, chunk.labels):
          writer.write(record, label)
        if split == "train" and chunk.records:
          moments += channel_moments(chunk.pixels)
        skipped.extend(chunk.skipped)
        shown.update(chunk.seen)
      splits[split] = writer.finish()
  if splits["train"].count == 0:
    first = f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
    raise ConfigError(f"{plan.path}: no training image could be imported{first}")
  mean, std = mean_std(moments)
  return records.RecordsMeta(
      format=records.FORMAT, version=records.VERSION, num_classes=num_classes,
      class_names=plan.class_names, image_shape=plan.image_shape, channels=plan.channels,
      mean=mean, std=std, splits=splits, skipped=tuple(skipped),
      source={"format": plan.format, "path": plan.path, "encoding": plan.encoding},
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def label_problem(label: int, num_classes: int) -> Optional[str]:
  """Why ``label`` cannot be stored, or None."""
  return None if 0 <= label < num_classes else f"label {label} outside [0, {num_classes})"


def shape_text(shape) -> str:
  return "x".join(str(s) for s in shape)


def one_shape(counts: collections.Counter) -> Optional[tuple[int, int, int]]:
  """The dataset's shape: the most common one when it covers at least
  :data:`ONE_SHAPE_SHARE` of the images, else None (sizes vary)."""
  if not counts:
    return None
  shape, count = counts.most_common(1)[0]
  return shape if count >= ONE_SHAPE_SHARE * sum(counts.values()) else None


# --- ImageFolder ------------------------------------------------------------------------

def plan_imagefolder(source: str, progress: bool) -> Plan:
  """Lists and scans an ImageFolder tree (see the module docstring)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if not os.path.isdir(os.path.join(source, "train")):
    raise ConfigError(f"{source} has no train/ folder (an ImageFolder tree is "
                      f"SOURCE/train/CLASS/*.jpg with SOURCE/test/ or SOURCE/val/ alike)")
  classes = class_folders(os.path.join(source, "train"))
  skipped: list[dict[str, str]] = []
  files: dict[str, list[tuple[str, int]]] = {}
  for split in _SPLIT_FOLDERS:
    root = os.path.join(source, split)
    if not os.path.isdir(root):
      continue
    extra = sorted(set(class_folders(root)) - set(classes))
    if extra:
      raise ConfigError(f"{root} has class folder(s) {', '.join(extra)} that "
                        f"{os.path.join(source, 'train')} lacks")
    files[split] = []
    for label, name in enumerate(classes):
      for path in image_files(os.path.join(root, name), source, skipped):
        files[split].append((path, label))

  headers: dict[str, tuple[str, tuple[int, int, int], int]] = {}
  for split, listed in files.items():
    for path, _ in iterate(listed, f"scan {split}", "img", disable=not progress):
      try:
        with Image.open(os.path.join(source, path)) as img:
          fmt, (width, height), mode = img.format, img.size, img.mode
      except (OSError, ValueError, SyntaxError) as e:
        skipped.append({"path": path, "reason": f"unreadable ({type(e).__name__}: {e})"})
        continue
      if fmt not in ("JPEG", "PNG"):
        skipped.append({"path": path, "reason": f"{fmt} data, not JPEG or PNG"})
        continue
      headers[path] = (fmt.lower(), (height, width, records.mode_channels(mode)),
                       os.path.getsize(os.path.join(source, path)))

  shapes = collections.Counter(shape for _, shape, _ in headers.values())
  shape = one_shape(shapes)
  channels = shape[-1] if shape else (collections.Counter(
      s[-1] for s in shapes.elements()).most_common(1) or [(3, 0)])[0][0]
  raw = shape is not None and shape[0] * shape[1] <= RAW_MAX_PIXELS
  splits = {}
  for split, listed in files.items():
    kept = []
    for path, label in listed:
      if path not in headers:
        continue
      if shape and headers[path][1] != shape:
        skipped.append({"path": path, "reason": f"size {shape_text(headers[path][1])}, the "
                        f"dataset's images are {shape_text(shape)}"})
        continue
      kept.append((path, label))
    example_bytes = (float(np.prod(shape)) if raw else
                     float(np.mean([headers[p][2] for p, _ in kept])) if kept else 0.0)
    splits[split] = SplitSource(
        len(kept), example_bytes,
        lambda kept=kept: (folder_example(source, path, label, headers[path][0], channels,
                                          raw) for path, label in kept))
  if "train" not in splits or not splits["train"].count:
    first = f" (first skipped: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
    raise ConfigError(f"{os.path.join(source, 'train')} holds no readable JPEG/PNG image in "
                      f"a class folder{first}")
  return Plan("imagefolder", source, tuple(classes), shape, channels,
              "raw" if raw else "jpeg/png", splits, tuple(skipped))


def class_folders(root: str) -> list[str]:
  """The class folder names under ``root``, sorted (torchvision's order)."""
  return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def image_files(folder: str, source: str, skipped: list[dict[str, str]]) -> list[str]:
  """The image files below ``folder`` in walk order, relative to ``source``;
  a non-hidden file of another kind is appended to ``skipped``."""
  found = []
  for root, dirs, names in sorted(os.walk(folder, followlinks=True)):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in sorted(names):
      if name.startswith("."):
        continue
      path = os.path.relpath(os.path.join(root, name), source)
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(path)
      else:
        skipped.append({"path": path, "reason": f"not a {'/'.join(IMAGE_EXTENSIONS)} file"})
  return found


def folder_example(source: str, path: str, label: int, encoding: str, channels: int,
                   raw: bool) -> Chunk:
  """One image file as a record; a file that does not decode is skipped."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  try:
    with open(os.path.join(source, path), "rb") as f:
      data = f.read()
    pixels = records.decode_image(data, channels)
    record = (records.encode_record(pixels, label) if raw else
              records.encode_record(data, label, encoding=encoding, channels=channels))
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    return skipped_chunk(path, f"unreadable ({type(e).__name__}: {e})")
  return Chunk([record], [label], pixels, [], 1)


# --- .npz -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NpzPart:
  """An image/label array pair of one .npz file, and the split it goes to."""
  file: str
  split: str
  image_key: str
  label_key: str
  shape: tuple[int, ...]  # of the images, (N, H, W, C)


def plan_npz(source: str) -> Plan:
  """Reads the array headers and labels of the .npz files of ``source``."""
  paths = ([source] if os.path.isfile(source) else
           sorted(os.path.join(source, n) for n in os.listdir(source) if n.endswith(".npz")))
  if not paths:
    raise ConfigError(f"{source} holds no .npz file")
  where = {p: os.path.relpath(p, os.path.dirname(source) if os.path.isfile(source) else source)
           for p in paths}
  skipped: list[dict[str, str]] = []
  parts: list[NpzPart] = []
  max_label = -1
  for path in paths:
    try:
      found, file_max = npz_parts(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      skipped.append({"path": where[path], "reason": f"unreadable ({type(e).__name__}: {e})"})
      continue
    parts += found
    max_label = max(max_label, file_max)
  shapes = collections.Counter()
  for part in parts:
    shapes[part.shape[1:]] += part.shape[0]
  if not shapes:
    first = f" ({skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
    raise ConfigError(f"{source}: no .npz file with image/label or x_train/y_train arrays"
                      f"{first}")
  shape = shapes.most_common(1)[0][0]
  kept = []
  for part in parts:
    if part.shape[1:] == shape:
      kept.append(part)
    else:
      skipped.append({"path": f"{where[part.file]}:{part.image_key}",
                      "reason": f"{part.shape[0]} images of size {shape_text(part.shape[1:])}, "
                                f"the dataset's images are {shape_text(shape)}"})
  num_classes = max_label + 1
  if num_classes < 1:
    raise ConfigError(f"{source}: no example has a label >= 0")
  splits = {}
  for split in ("train", "test"):
    mine = [p for p in kept if p.split == split]
    if mine:
      splits[split] = SplitSource(
          sum(p.shape[0] for p in mine), float(np.prod(shape)),
          lambda mine=mine: (c for p in mine for c in npz_chunks(p, where[p.file],
                                                                 num_classes)))
  if "train" not in splits:
    raise ConfigError(f"{source}: no training images (arrays image/label or x_train/y_train)")
  return Plan("npz", source, tuple(str(i) for i in range(num_classes)), shape, shape[-1],
              "raw", splits, tuple(skipped))


def npz_parts(path: str) -> tuple[list[NpzPart], int]:
  """The image/label pairs of one .npz file and its largest label.

  ValueError (naming the problem) for a file that cannot be imported.
  """
  with zipfile.ZipFile(path) as archive:
    names = {n[:-4] for n in archive.namelist() if n.endswith(".npy")}
    if {"image", "label"} <= names:
      pairs = [("train", "image", "label")]
    elif {"x_train", "y_train"} <= names:
      pairs = [("train", "x_train", "y_train")] + (
          [("test", "x_test", "y_test")] if {"x_test", "y_test"} <= names else [])
    else:
      raise ValueError(f"no image/label or x_train/y_train arrays (has: "
                       f"{', '.join(sorted(names)) or 'none'})")
    parts, max_label = [], -1
    for split, image_key, label_key in pairs:
      shape, dtype = npy_header(archive, image_key)
      if dtype != np.uint8 or len(shape) not in (3, 4):
        raise ValueError(f"{image_key} must be uint8 (N, H, W, C) or (N, H, W) images, got "
                         f"{dtype} {shape}")
      shape = shape if len(shape) == 4 else shape + (1,)
      label_shape, label_dtype = npy_header(archive, label_key)
      if not np.issubdtype(label_dtype, np.integer) or label_shape != shape[:1]:
        raise ValueError(f"{label_key} must be {shape[0]} integer labels, got {label_dtype} "
                         f"{label_shape}")
      for labels in npy_rows(archive, label_key, 1 << 20):
        if labels.size:
          max_label = max(max_label, int(labels.max()))
      parts.append(NpzPart(path, split, image_key, label_key, shape))
  return parts, max_label


def npy_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of the array ``key`` of an open .npz, read from its header."""
  with archive.open(f"{key}.npy") as f:
    shape, dtype = _read_header(f)
  return shape, dtype


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise ValueError(f"unsupported .npy format version {version}")
  if fortran and len(shape) > 1:
    raise ValueError("a Fortran-order array (save it with np.ascontiguousarray)")
  if dtype.hasobject:
    raise ValueError("an array of Python objects")
  return tuple(shape), dtype


def npy_rows(archive: zipfile.ZipFile, key: str, rows: int) -> Iterator[np.ndarray]:
  """The array ``key`` of an open .npz, ``rows`` leading-axis entries at a
  time, read (and decompressed) as it goes."""
  with archive.open(f"{key}.npy") as f:
    shape, dtype = _read_header(f)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    for start in range(0, shape[0], rows):
      count = min(rows, shape[0] - start)
      data = f.read(count * row_bytes)
      if len(data) != count * row_bytes:
        raise EOFError(f"{key} ends after {start + len(data) // max(row_bytes, 1)} of "
                       f"{shape[0]} rows")
      yield np.frombuffer(data, dtype).reshape((count,) + shape[1:])


def npz_chunks(part: NpzPart, where: str, num_classes: int) -> Iterator[Chunk]:
  """The records of one image/label pair, :data:`NPZ_CHUNK` at a time."""
  done = 0
  try:
    with zipfile.ZipFile(part.file) as archive:
      for images, labels in zip(npy_rows(archive, part.image_key, NPZ_CHUNK),
                                npy_rows(archive, part.label_key, NPZ_CHUNK)):
        images = images.reshape((len(images),) + part.shape[1:])
        good = (labels >= 0) & (labels < num_classes)
        skipped = [{"path": f"{where}:{part.label_key}[{done + i}]",
                    "reason": label_problem(int(labels[i]), num_classes)}
                   for i in np.flatnonzero(~good)]
        yield Chunk([records.encode_record(x, int(y))
                     for x, y in zip(images[good], labels[good])],
                    [int(y) for y in labels[good]], images[good], skipped, len(images))
        done += len(images)
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    left = part.shape[0] - done
    yield skipped_chunk(f"{where}:{part.image_key}", f"unreadable after {done} of "
                        f"{part.shape[0]} images ({type(e).__name__}: {e})", seen=left)


# --- TFDS -------------------------------------------------------------------------------

def plan_tfds(source: str, data_dir: Optional[str]) -> Plan:
  """A prepared TFDS dataset: its folder, or its name in ``data_dir``."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  try:
    if os.path.isdir(source):
      builder = tfds.builder_from_directory(source)
    else:
      name = os.path.basename(source)
      builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir or "~/tensorflow_datasets"))
      if not builder.is_prepared():
        raise FileNotFoundError(f"not prepared in {builder.data_dir}")
  except Exception as e:  # TFDS raises several types  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(f"{source}: not a prepared TFDS dataset ({type(e).__name__}: "
                      f"{reason}); jaxdef data import never downloads") from None
  image_key, label_key = builder.info.supervised_keys or ("image", "label")
  features = builder.info.features
  if image_key not in features or label_key not in features or \
      not hasattr(features[label_key], "num_classes"):
    raise ConfigError(f"{source}: needs an image feature and a ClassLabel feature (has: "
                      f"{', '.join(features.keys())})")
  label_feature, image_shape = features[label_key], tuple(features[image_key].shape)
  channels = image_shape[-1] if len(image_shape) == 3 and image_shape[-1] else 3
  shape = image_shape if None not in image_shape and len(image_shape) == 3 else None
  names = [s for s in _TFDS_SPLITS if s in builder.info.splits]
  if "train" not in names:
    raise ConfigError(f"{source}: has no train split (has: "
                      f"{', '.join(builder.info.splits.keys())})")
  try:
    sources = builder.as_data_source(split=names)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [""])[0]
    raise ConfigError(f"{source}: cannot be read as ArrayRecord ({type(e).__name__}: "
                      f"{reason})") from None
  num_classes = label_feature.num_classes
  splits = {}
  for name, data in zip(names, sources):
    info = builder.info.splits[name]
    splits[_TFDS_SPLITS[name]] = SplitSource(
        len(data), info.num_bytes / max(info.num_examples, 1),
        lambda data=data, name=name: (tfds_example(data, i, f"{name}[{i}]", image_key,
                                                   label_key, num_classes)
                                      for i in range(len(data))))
  return Plan("tfds", source, tuple(label_feature.names), shape, channels, "raw", splits)


def tfds_example(data, index: int, where: str, image_key: str, label_key: str,
                 num_classes: int) -> Chunk:
  """Example ``index`` of a TFDS data source as a raw record."""
  example = data[index]
  image, label = np.asarray(example[image_key], np.uint8), int(example[label_key])
  image = image if image.ndim == 3 else image[..., None]
  problem = label_problem(label, num_classes)
  if problem:
    return skipped_chunk(where, problem)
  return Chunk([records.encode_record(image, label)], [label], image, [], 1)


def summary_lines(meta: records.RecordsMeta, dest: str) -> list[str]:
  """What ``jaxdef data import`` prints when it is done."""
  counts = ", ".join(f"{split} {s.count}" for split, s in meta.splits.items())
  shape = shape_text(meta.image_shape) if meta.image_shape else f"sizes vary, {meta.channels} ch"
  lines = [f"imported {meta.source['path']} ({meta.source['format']}) into {dest}: {counts} "
           f"images, {meta.num_classes} classes, {shape}, {meta.source.get('encoding')} records",
           "mean " + " ".join(f"{m:.4f}" for m in meta.mean) + ", std "
           + " ".join(f"{s:.4f}" for s in meta.std)]
  if meta.skipped:
    shown = "; ".join(f"{s['path']}: {s['reason']}" for s in meta.skipped[:3])
    more = f"; and {len(meta.skipped) - 3} more" if len(meta.skipped) > 3 else ""
    lines.append(f"skipped {len(meta.skipped)} (all listed under \"skipped\" in "
                 f"{os.path.join(dest, records.METADATA)}): {shown}{more}")
  lines.append(f"train from it with: --config.data.name=arrayrecord --config.data.path={dest}")
  return lines
