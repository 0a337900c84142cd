"""A run's training batches: from memory, or streamed from disk through Grain.

Two paths, one batch. Whichever path reads them, the examples of global step
``s`` are those :class:`jaxdef.data.mixing.BatchPlan` names (the epoch's
permutation, plus the extra source's draws when ``data.extra`` is set), and
:class:`LocalBatches` builds this process's rows of that batch: it reads them
from their sources (:class:`ArrayRows` in memory, :class:`RecordRows` from
the ArrayRecord files of an imported dataset), applies the host augmentation
(``rrc_flip``: :func:`jaxdef.data.augment.random_resized_crop`, keyed by
``(seed, step, row)``) and stacks them. The batch of a step therefore never
depends on the path, the number of processes or the run's history.

* In memory (``data.streamed`` false; the default except for
  ``data.name='arrayrecord'``): the dataset is loaded whole and each step's
  rows are gathered in the training process, as fast as a copy.
* Streamed (``data.name='arrayrecord'``, ``data.streamed`` true or unset):
  a ``grain.MapDataset`` over the steps maps each step to its local batch,
  in ``data.workers`` worker processes (``mp_prefetch``; 0: in the training
  process), reading and decoding only this process's rows; a background
  thread turns the next batches into global ``jax.Array``s on the mesh
  (:class:`DevicePrefetch`). Host memory holds a few batches, whatever the
  dataset's size.

A run resumed at step ``k`` starts the map at ``k``: nothing is replayed. The
position saved with each checkpoint (:meth:`TrainData.position`) records the
data's sizes and seed, so a resume onto other data is refused.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Any, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxdef.data import records
from jaxdef.data.augment import center_crop, random_resized_crop
from jaxdef.data.dataset import Dataset, split_validation
from jaxdef.data.mixing import BatchPlan
from jaxdef.data.pipeline import global_arrays, local_rows
from jaxdef.errors import ConfigError

# A tag separating the host augmentation's random stream (per step and row)
# from the batch plan's streams.
_AUGMENT_STREAM = 0x61756731
_IMPORT = "jaxdef data import SOURCE DEST"
# Grain's min_shm_size that no batch reaches.
_NEVER_SHARED = 1 << 62


def is_streamed(data_config) -> bool:
  """Whether ``data_config`` (``config.data``) trains from the streamed path:
  ``data.streamed``, where None (unset) streams an imported dataset
  (``data.name='arrayrecord'``) and keeps every other source in memory."""
  streamed = data_config.get("streamed", None)
  return data_config.get("name") == "arrayrecord" if streamed is None else bool(streamed)


class ArrayRows:
  """Examples held in memory: ``read(index)`` gathers ``x[index]``, ``y[index]``."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.x, self.y = x, y

  def __len__(self) -> int:
    return len(self.y)

  def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, H, W, C) uint8, labels (n,) int32)`` of the examples ``index``."""
    return self.x[index], self.y[index]


class RecordRows:
  """Examples in ArrayRecord files (the records of :mod:`jaxdef.data.records`).

  Record ``i`` is record ``i`` of the files' concatenation, or, with
  ``keep`` (sorted record numbers), record ``keep[i]``. The files are opened
  on first read, in whichever process reads (Grain workers receive this
  object pickled, unopened).
  """

  def __init__(self, files: Sequence[str], count: int, keep: Optional[np.ndarray] = None):
    self.files, self.count, self.keep = tuple(files), int(count), keep
    self._source = None

  def __len__(self) -> int:
    return self.count if self.keep is None else len(self.keep)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}

  def read(self, index: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """``([image (H, W, C) uint8, ...], labels (n,) int32)`` of the examples ``index``,
    images decoded at their stored size."""
    if self._source is None:
      import grain  # pylint: disable=import-outside-toplevel
      self._source = grain.sources.ArrayRecordDataSource(list(self.files))
    keys = np.asarray(index) if self.keep is None else self.keep[np.asarray(index)]
    decoded = [records.decode_record(r) for r in self._source.__getitems__(keys.tolist())]
    return [im for im, _ in decoded], np.array([label for _, label in decoded], np.int32)


@dataclasses.dataclass(frozen=True)
class LocalBatches:
  """``step -> (x, y)``: this process's rows of the global batch of ``step``.

  Attributes:
    plan: which examples each global batch holds.
    sources: the readers of the training split and (when mixing) of the extra
      source, indexed by :data:`jaxdef.data.mixing.REAL` / ``EXTRA``.
    rows: ``{batch size: (first, stop)}``, the contiguous rows of a global
      batch of that size that this process's devices hold.
    image_shape: (H, W, C) of every image of a batch.
    augment: ``'rrc_flip'`` crops and flips on the host; anything else leaves
      the images as stored (device augmentation happens in the train step).
    seed: the run's seed (the host augmentation's stream).
  """
  plan: BatchPlan
  sources: tuple[Any, ...]
  rows: dict[int, tuple[int, int]]
  image_shape: tuple[int, int, int]
  augment: str
  seed: int

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x (b, H, W, C) uint8, y (b,) int32)``, b this process's share of the batch."""
    step = int(step)
    source, index = self.plan.batch(step)
    first, stop = self.rows[len(index)]
    source, index = source[first:stop], index[first:stop]
    x = np.empty((stop - first,) + tuple(self.image_shape), np.uint8)
    y = np.empty(stop - first, np.int32)
    for which, reader in enumerate(self.sources):
      at = np.flatnonzero(source == which)
      if not len(at):
        continue
      images, y[at] = reader.read(index[at])
      if self.augment == "rrc_flip":
        images = [random_resized_crop(
            image, np.random.default_rng([self.seed, step, first + int(row), _AUGMENT_STREAM]),
            self.image_shape[0]) for image, row in zip(images, at)]
      x[at] = _stacked(images, x.shape[1:], f"step {step}")
    return x, y


def _stacked(images: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
  """``images`` (an array or a list of arrays) as one (n,) + ``shape`` array;
  ValueError when an image has another shape."""
  shapes = {tuple(images.shape[1:])} if isinstance(images, np.ndarray) else \
      {im.shape for im in images}
  if shapes - {tuple(shape)}:
    raise ValueError(f"{where}: images of shape {sorted(shapes - {tuple(shape)})[0]} in a "
                     f"batch of {tuple(shape)} (images of several sizes need "
                     f"data.augment='rrc_flip' and data.image_size)")
  return images if isinstance(images, np.ndarray) else np.stack(images)


class DevicePrefetch:
  """Iterates global batches that a background thread makes ``depth`` steps ahead.

  The thread pulls ``(x, y)`` local batches from ``local`` (a Grain iterator),
  makes the global arrays (:func:`jaxdef.data.pipeline.global_arrays`) and
  queues them; an error in the thread is raised by the next ``next()``. :meth:`close` stops the
  thread and closes ``local`` (Grain's worker processes).
  """

  _END = object()

  def __init__(self, local: Iterator, sizes: Iterator[int], sharding: NamedSharding,
               depth: int = 2):
    self._local, self._sizes, self._sharding = local, sizes, sharding
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name="device-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for (x, y), size in zip(self._local, self._sizes):
        if not self._put(global_arrays(x, y, size, self._sharding)):
          return
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in next())
      self._put(e)

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> tuple[jax.Array, jax.Array]:
    item = self._queue.get()
    if item is self._END:
      self._queue.put(item)
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    close = getattr(self._local, "close", None)
    if close is not None:
      close()


class InProcess:
  """Iterates global batches made in the training process, step by step."""

  def __init__(self, local: LocalBatches, steps: range, sharding: NamedSharding):
    self._batches = (global_arrays(*local(s), local.plan.batch_size(s), sharding) for s in steps)

  def __iter__(self) -> "InProcess":
    return self

  def __next__(self) -> tuple[jax.Array, jax.Array]:
    return next(self._batches)

  def close(self) -> None:
    self._batches.close()


@dataclasses.dataclass(frozen=True, eq=False)
class EvalImages:
  """A model's data and its evaluated test examples, in memory.

  ``name``, ``num_classes``, ``image_shape`` (the training resolution),
  ``mean`` and ``std`` are the fields :class:`jaxdef.build.DataMeta` reads;
  ``x_test`` (M, H, W, C) uint8 / ``y_test`` (M,) int32 the evaluated
  examples, cropped by :func:`eval_images`.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  x_test: np.ndarray
  y_test: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class TrainData(EvalImages):
  """What training reads: the metadata and the per-epoch evaluation's
  examples (:class:`EvalImages`), the batch plan, the sources."""
  plan: BatchPlan
  sources: tuple[Any, ...]
  augment: str
  seed: int
  streamed: bool = False
  workers: int = 0

  @property
  def steps_per_epoch(self) -> int:
    return self.plan.steps_per_epoch

  def local_batches(self, sharding: NamedSharding) -> LocalBatches:
    """The step -> local batch function for this process's devices of ``sharding``."""
    sizes = {self.plan.global_batch, self.plan.batch_size(self.plan.steps_per_epoch - 1)}
    rows = {}
    for size in sizes:
      held = local_rows(sharding, size)
      rows[size] = (held.start, held.stop)
    return LocalBatches(self.plan, self.sources, rows, tuple(self.image_shape), self.augment,
                        self.seed)

  def batches(self, start: int, stop: int, sharding: NamedSharding):
    """Global ``(x, y)`` batches of steps ``start .. stop - 1``, sharded by ``sharding``.

    Returns an iterator with a ``close()`` (stops workers and threads).
    """
    local = self.local_batches(sharding)
    steps = range(int(start), int(stop))
    if not self.streamed:
      return InProcess(local, steps, sharding)
    import grain  # pylint: disable=import-outside-toplevel
    dataset = grain.MapDataset.range(steps.start, steps.stop).map(local).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if self.workers > 0:
      _absl_flags_parsed()
      # Batches come back pickled, not in shared memory: as fast here, and
      # Grain's shared-memory blocks, freed by a background thread, can outlive
      # a process that ends right after its last batch (leak warnings at exit).
      dataset = grain.experimental.WithOptionsIterDataset(
          dataset, grain.experimental.DatasetOptions(min_shm_size=_NEVER_SHARED))
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=2))
    return DevicePrefetch(iter(dataset), (self.plan.batch_size(s) for s in steps), sharding)

  def position(self, step: int) -> dict[str, Any]:
    """The data position of ``step`` saved with its checkpoint (JSON)."""
    return {**self.plan.position(step), "streamed": self.streamed}

  def check_position(self, saved: Optional[dict[str, Any]], where: str) -> None:
    """Refuses (one line) to resume from a checkpoint whose ``saved`` position
    came from other data; None (a checkpoint saved without one) passes."""
    if saved is not None:
      self.plan.check_position(saved, where)

  def label_smoothing(self, data_config, every_row: float = 0.0) -> Optional[np.ndarray]:
    """The label smoothing of the batch's rows, or None when nothing is smoothed.

    With an extra source, (global batch,): ``every_row`` (``train.label_smoothing``)
    composed with ``data.extra_label_smoothing`` on the extra rows
    (:meth:`BatchPlan.label_smoothing`). Without one, the () array
    ``every_row``, the same for every row of any batch (the last, smaller
    batch of ``data.keep_last_batch`` included).
    """
    smoothing = float(data_config.get("extra_label_smoothing", 0.0) or 0.0)
    every_row = float(every_row or 0.0)
    if smoothing and not self.plan.num_extra:
      raise ConfigError("data.extra_label_smoothing smooths the extra source's labels: set "
                        "data.extra.path and data.extra_fraction too (train.label_smoothing "
                        "smooths every label)")
    if self.plan.num_extra and (smoothing or every_row):
      return self.plan.label_smoothing(smoothing, every_row)
    return np.asarray(every_row, np.float32) if every_row else None


def _absl_flags_parsed() -> None:
  """Marks absl's global flags parsed (at their defaults) when nothing parsed them.

  Grain's worker start-up reads its flags (``--grain_*``) from absl's global
  ``FLAGS`` and fails on unparsed flags; jaxdef's command line parses its own
  ``FlagValues``, and a library caller may parse none.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _plan(data_config, num_real: int, num_extra: int, *, seed: int,
          global_batch: int) -> BatchPlan:
  return BatchPlan(num_real=num_real, global_batch=int(global_batch), seed=int(seed),
                   num_extra=num_extra,
                   extra_fraction=float(data_config.get("extra_fraction", 0.0) or 0.0),
                   keep_last=bool(data_config.get("keep_last_batch", False)))


def output_shape(data_config, stored: Optional[tuple[int, ...]], channels: int,
                 where: str) -> tuple[int, int, int]:
  """The (H, W, C) of training images: ``data.image_size`` square with
  ``rrc_flip``, else as stored; one-line refusals for a size that no
  augmentation produces."""
  size, augment = int(data_config.get("image_size", 0) or 0), data_config.get("augment", "none")
  if augment == "rrc_flip":
    if size:
      return size, size, channels
    if stored is None or stored[0] != stored[1]:
      raise ConfigError(f"{where} holds images of several or non-square sizes: set "
                        f"data.image_size (the side random-resized-crop resizes to)")
    return tuple(stored)
  if stored is None:
    raise ConfigError(f"{where} holds images of several sizes: train with "
                      f"data.augment='rrc_flip' and data.image_size=N (random-resized-crop "
                      f"to N px on the host, centre crop for evaluation)")
  if size and (size, size) != tuple(stored[:2]):
    raise ConfigError(f"data.image_size={size} but {where} holds {stored[0]}x{stored[1]} images "
                      f"and data.augment={augment!r} does not resize: set "
                      f"data.augment='rrc_flip' or data.image_size=0")
  return tuple(stored)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSplit:
  """Evaluation examples at the training resolution: (M, H, W, C) uint8, (M,) int32."""
  x_test: np.ndarray
  y_test: np.ndarray


def eval_images(images: Sequence[np.ndarray], data_config,
                shape: tuple[int, int, int]) -> np.ndarray:
  """Evaluation images at the training resolution: the centre crop with
  ``rrc_flip`` (:func:`jaxdef.data.augment.center_crop`), else as stored."""
  if data_config.get("augment", "none") == "rrc_flip":
    images = [center_crop(im, shape[0]) for im in images]
  if not len(images):
    return np.zeros((0,) + tuple(shape), np.uint8)
  return _stacked(images, shape, "the evaluation split")


def _extra_source(data_config, *, streamed: bool, num_classes: int,
                  channels: int) -> Optional[Any]:
  """The reader of ``data.extra.path`` (None without one)."""
  extra = data_config.get("extra", None)
  path = extra.get("path", "") if extra is not None else ""
  if not path:
    return None
  path = os.path.expanduser(str(path))
  if os.path.isdir(path):
    meta = records.read_metadata(path)
    where = f"data.extra.path={path}"
    if meta.num_classes > num_classes or meta.channels != channels:
      raise ConfigError(f"{where} has {meta.num_classes} classes of {meta.channels}-channel "
                        f"images; the training split has {num_classes} of {channels}")
    split = meta.splits["train"]
    return RecordRows(records.split_files(meta, path, "train"), split.count)
  if not path.endswith(".npz") or not os.path.isfile(path):
    raise ConfigError(f"data.extra.path={path} is neither an imported dataset folder nor an "
                      f".npz file")
  if streamed:
    raise ConfigError(f"data.extra.path={path} is an .npz, which the streamed path cannot read "
                      f"in parts: import it with {_IMPORT} and name the folder")
  return ArrayRows(*_npz_extra(path, num_classes, channels))


def _npz_extra(path: str, num_classes: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """``(images, labels)`` of an extra-data .npz (keys ``image``/``label``, as the
  generated-data releases, or ``x_train``/``y_train``)."""
  with np.load(path, allow_pickle=False) as archive:
    keys = next((k for k in (("image", "label"), ("x_train", "y_train"))
                 if set(k) <= set(archive.files)), None)
    if keys is None:
      raise ConfigError(f"data.extra.path={path}: needs arrays 'image' and 'label' (has "
                        f"{', '.join(sorted(archive.files))})")
    x, y = archive[keys[0]], archive[keys[1]]
  if x.ndim == 3:
    x = x[..., None]
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != channels or y.shape != x.shape[:1]:
    raise ConfigError(f"data.extra.path={path}: images must be uint8 (N, H, W, {channels}) "
                      f"with N labels, got {x.dtype} {x.shape} and {y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ConfigError(f"data.extra.path={path}: labels outside [0, {num_classes})")
  return x, y.astype(np.int32)


def _check_extra_shape(extra: Any, augment: str, shape: tuple[int, ...]) -> None:
  if isinstance(extra, ArrayRows) and augment != "rrc_flip" \
      and tuple(extra.x.shape[1:]) != tuple(shape):
    raise ConfigError(f"data.extra images are {extra.x.shape[1:]}, the training images "
                      f"{tuple(shape)}: use data.augment='rrc_flip' to crop both to "
                      f"data.image_size")


def in_memory_train_data(dataset: Dataset, data_config, *, seed: int,
                         global_batch: int) -> TrainData:
  """The in-memory path over a loaded ``dataset`` (and ``data.extra``)."""
  channels = dataset.image_shape[-1]
  shape = output_shape(data_config, dataset.image_shape, channels, f"dataset {dataset.name!r}")
  extra = _extra_source(data_config, streamed=False, num_classes=dataset.num_classes,
                        channels=channels)
  augment = data_config.get("augment", "none")
  if extra is not None:
    _check_extra_shape(extra, augment, dataset.image_shape)
  sources = (ArrayRows(dataset.x_train, dataset.y_train),) + ((extra,) if extra else ())
  plan = _plan(data_config, len(dataset.y_train), len(extra) if extra else 0, seed=seed,
               global_batch=global_batch)
  return TrainData(dataset.name, dataset.num_classes, shape, dataset.mean, dataset.std,
                   eval_images(dataset.x_test, data_config, shape), dataset.y_test, plan,
                   sources, augment, int(seed))


def streamed_train_data(data_config, *, seed: int, global_batch: int,
                        eval_examples: int) -> TrainData:
  """The streamed path over the imported dataset in ``data.path``.

  The first ``eval_examples`` test (or val) records (0: all) are read into
  memory for the per-epoch evaluation (:func:`imported_eval_split`).
  """
  if data_config.get("val_size", 0):
    raise ConfigError("data.val_size holds examples out in memory: set data.streamed=False "
                      "to use it, or import a 'val' split and evaluate on it")
  path, meta, shape = _imported(data_config)
  real = _imported_train(data_config, meta, path)
  extra = _extra_source(data_config, streamed=True, num_classes=meta.num_classes,
                        channels=meta.channels)
  sources = (real,) + ((extra,) if extra else ())
  plan = _plan(data_config, len(real), len(extra) if extra else 0, seed=seed,
               global_batch=global_batch)
  test = imported_eval_split(data_config, meta, path, shape, eval_examples)
  return TrainData("arrayrecord", meta.num_classes, shape, meta.mean, meta.std,
                   test.x_test, test.y_test, plan, sources,
                   data_config.get("augment", "none"), int(seed), streamed=True,
                   workers=int(data_config.get("workers", 0) or 0))


def _imported(data_config) -> tuple[str, records.RecordsMeta, tuple[int, int, int]]:
  """``(folder, metadata, training image shape)`` of the imported ``data.path``."""
  path = str(data_config.get("path", "") or "")
  if not path:
    raise ConfigError(f"data.path must name an imported dataset folder for "
                      f"data.name='arrayrecord' (make one with {_IMPORT})")
  meta = records.read_metadata(path)
  shape = output_shape(data_config, meta.image_shape, meta.channels, f"the dataset in {path}")
  return path, meta, shape


def _imported_train(data_config, meta: records.RecordsMeta, path: str) -> RecordRows:
  """The reader of the imported training split (``data.max_train`` of it); opens nothing."""
  from jaxdef.data.dataset import limits, kept_rows  # pylint: disable=import-outside-toplevel

  train = meta.splits["train"]
  return RecordRows(records.split_files(meta, path, "train"), train.count,
                    kept_rows(train.count, limits(data_config)[0]))


def imported_eval_split(data_config, meta: records.RecordsMeta, path: str,
                        shape: tuple[int, int, int], num_examples: int) -> EvalSplit:
  """The first ``num_examples`` (0: all) records of the imported test split (val
  when there is none; ``data.max_test`` of it) at the training resolution
  (:func:`eval_images`): the only records read."""
  from jaxdef.data.dataset import limits, kept_rows  # pylint: disable=import-outside-toplevel

  name = records.split_name(meta, "test")
  count = meta.splits[name].count
  test = RecordRows(records.split_files(meta, path, "test"), count,
                    kept_rows(count, limits(data_config)[1]))
  count = len(test) if not num_examples else min(int(num_examples), len(test))
  images, labels = test.read(np.arange(count)) if count else ([], np.zeros(0, np.int32))
  return EvalSplit(eval_images(images, data_config, shape), labels)


@dataclasses.dataclass(frozen=True, eq=False)
class EvalData(EvalImages):
  """What ``jaxdef eval`` reads of a run's data (:func:`eval_data`): the
  metadata and evaluated test examples (:class:`EvalImages`), and ``train``,
  the training split's reader, read only by :meth:`train_examples`."""
  train: Any
  data_config: Any

  @property
  def num_train(self) -> int:
    """The number of training examples (``data.max_train`` of them)."""
    return len(self.train)

  def train_examples(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, H, W, C) uint8, labels (n,) int32)``: training examples
    ``index`` at the evaluation resolution (the centre crop with ``rrc_flip``)."""
    images, labels = self.train.read(np.asarray(index))
    return eval_images(list(images), self.data_config, self.image_shape), labels


def eval_data(data_config, num_examples: int = 0) -> EvalData:
  """The data ``jaxdef eval`` evaluates: the first ``num_examples`` (0: all) test
  examples, cropped as the per-epoch evaluation crops them.

  Streamed (:func:`is_streamed`: an imported dataset, by default) only those
  test (or val) records are read and decoded; the training split is opened
  only if :meth:`EvalData.train_examples` is called. In memory the dataset is
  loaded whole (:func:`jaxdef.data.load_dataset`).
  """
  if is_streamed(data_config):
    path, meta, shape = _imported(data_config)
    test = imported_eval_split(data_config, meta, path, shape, num_examples)
    return EvalData("arrayrecord", meta.num_classes, shape, meta.mean, meta.std, test.x_test,
                    test.y_test, _imported_train(data_config, meta, path), data_config)
  from jaxdef.data.dataset import load_dataset  # pylint: disable=import-outside-toplevel

  dataset = load_dataset(data_config)
  shape = output_shape(data_config, dataset.image_shape, dataset.image_shape[-1],
                       f"dataset {dataset.name!r}")
  count = int(num_examples) or None
  return EvalData(dataset.name, dataset.num_classes, shape, dataset.mean, dataset.std,
                  eval_images(dataset.x_test[:count], data_config, shape),
                  dataset.y_test[:count], ArrayRows(dataset.x_train, dataset.y_train),
                  data_config)


def train_data(data_config, *, seed: int, global_batch: int, eval_examples: int = 0,
               dataset: Optional[Dataset] = None) -> tuple[TrainData, Optional[EvalSplit]]:
  """``(train data, validation)`` of a run: streamed or in memory (:func:`is_streamed`).

  In memory, ``dataset`` (default: :func:`jaxdef.data.load_dataset`) is
  loaded and ``data.val_size`` examples held out as the validation set.
  """
  if is_streamed(data_config):
    return streamed_train_data(data_config, seed=seed, global_batch=global_batch,
                               eval_examples=eval_examples), None
  from jaxdef.data.dataset import load_dataset  # pylint: disable=import-outside-toplevel

  dataset = load_dataset(data_config) if dataset is None else dataset
  held = None
  if data_config.get("val_size", 0):
    dataset, held = split_validation(dataset, int(data_config.val_size))
  data = in_memory_train_data(dataset, data_config, seed=seed, global_batch=global_batch)
  if held is None:
    return data, None
  return data, EvalSplit(eval_images(held.x_test, data_config, data.image_shape), held.y_test)
