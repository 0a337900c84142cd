"""Which examples each global batch holds: the training split, and an extra source mixed in.

Without an extra source, step ``s`` takes the examples
:func:`jaxdef.data.pipeline.train_batch_indices` names (the epoch's
permutation keyed by the seed and the epoch). With one (``data.extra``, e.g.
the 1M-50M generated images of Gowal et al. 2021 and Wang et al. 2023), a
fixed share ``extra_fraction`` of every global batch comes from it (0.7 in
Wang et al.'s recipe):

* the real part, ``round((1 - extra_fraction) * B)`` rows, is drawn without
  replacement by the same ``train_batch_indices`` and defines the epoch
  (an epoch is one pass over the real split);
* the extra part is drawn with replacement, uniformly, from a random stream
  keyed by ``(seed, step)`` alone;
* which rows of the batch are extra is fixed (the same every step): the
  extra rows are spread evenly over the batch (row ``i`` is extra when
  ``floor((i + 1) E / B) > floor(i E / B)``), so every contiguous device
  shard holds the same mix up to one row, exactly the same when the number
  of real rows divides by the number of shards.

Everything is a pure function of ``(sizes, B, extra_fraction, seed, step)``:
the batch does not depend on the number of processes or devices, nor on the
history of the run, so a resumed run draws exactly what an uninterrupted one
would, and each process can compute its own rows of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxdef.data.pipeline import steps_per_epoch, train_batch_indices
from jaxdef.errors import ConfigError

# Where a row of a batch comes from (``BatchPlan.batch``'s first array).
REAL, EXTRA = 0, 1
# A tag that separates the extra draws' random stream from the epoch
# permutations (``default_rng([seed, epoch])``); non-zero, since numpy's
# SeedSequence pads short entropy with zeros.
_EXTRA_STREAM = 0x65787472


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """The composition of every global batch of a run.

  Attributes:
    num_real: examples in the training split.
    global_batch: rows of every batch (``train.batch_size``).
    seed: the run's seed.
    num_extra: examples in the extra source (0: none).
    extra_fraction: its share of every batch, in [0, 1).
    keep_last: ``data.keep_last_batch`` (no extra source only): the last
      batch of an epoch holds the remainder of the real split.
  """
  num_real: int
  global_batch: int
  seed: int
  num_extra: int = 0
  extra_fraction: float = 0.0
  keep_last: bool = False

  def __post_init__(self):
    if not 0.0 <= self.extra_fraction < 1.0:
      raise ConfigError(f"data.extra_fraction must be in [0, 1), got {self.extra_fraction}")
    if self.extra_fraction > 0 and self.num_extra < 1:
      raise ConfigError(f"data.extra_fraction={self.extra_fraction} needs an extra source: "
                        f"set data.extra.path (an imported dataset folder or an .npz)")
    if self.num_extra and self.extra_per_batch < 1:
      raise ConfigError(f"data.extra_fraction={self.extra_fraction} of train.batch_size="
                        f"{self.global_batch} rounds to no extra row per batch; raise either")
    if self.real_per_batch < 1:
      raise ConfigError(f"data.extra_fraction={self.extra_fraction} of train.batch_size="
                        f"{self.global_batch} leaves no real row per batch")
    if self.keep_last and self.num_extra:
      raise ConfigError("data.keep_last_batch cannot be combined with an extra source "
                        "(data.extra): every mixed batch has train.batch_size rows")
    if self.real_per_batch > self.num_real:
      share = f" ({self.real_per_batch} real rows)" if self.num_extra else ""
      raise ConfigError(f"train.batch_size={self.global_batch}{share} is larger than the "
                        f"training set ({self.num_real} examples)")

  @property
  def extra_per_batch(self) -> int:
    """Rows of every batch drawn from the extra source."""
    return int(round(self.extra_fraction * self.global_batch)) if self.num_extra else 0

  @property
  def real_per_batch(self) -> int:
    """Rows of every (full) batch drawn from the training split."""
    return self.global_batch - self.extra_per_batch

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one pass over the training split."""
    return steps_per_epoch(self.num_real, self.real_per_batch, keep_last=self.keep_last)

  def batch_size(self, step: int) -> int:
    """Rows of the batch of ``step``: ``global_batch``, or the remainder of
    the training split at the end of an epoch with ``keep_last``."""
    within = int(step) % self.steps_per_epoch
    if self.keep_last and within == self.steps_per_epoch - 1 \
        and self.num_real % self.global_batch:
      return self.num_real % self.global_batch
    return self.global_batch

  def extra_rows(self) -> np.ndarray:
    """(global_batch,) bool: which rows of every batch come from the extra source."""
    rows = np.arange(self.global_batch + 1) * self.extra_per_batch // self.global_batch
    return np.diff(rows) > 0

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source, index)`` of the rows of global step ``step``, each (batch_size(step),).

    ``source[i]`` is :data:`REAL` or :data:`EXTRA`; ``index[i]`` the example's
    index in that source.
    """
    real = train_batch_indices(self.num_real, self.real_per_batch, self.seed, step,
                               keep_last=self.keep_last)
    if not self.num_extra:
      return np.full(len(real), REAL, np.int8), real
    extra = self.extra_rows()
    index = np.empty(self.global_batch, np.int64)
    index[~extra] = real
    index[extra] = np.random.default_rng([self.seed, int(step), _EXTRA_STREAM]).integers(
        0, self.num_extra, self.extra_per_batch)
    return np.where(extra, EXTRA, REAL).astype(np.int8), index

  def label_smoothing(self, extra_smoothing: float, every_row: float = 0.0) -> np.ndarray:
    """(global_batch,) float32: label smoothing of each row of a batch.

    ``every_row`` (``train.label_smoothing``, Wang et al. 2023's 0.1) on every
    row; the extra rows' labels smoothed again by ``extra_smoothing``
    (``data.extra_label_smoothing``, Gowal et al. 2021's generated labels).
    Smoothing the target (1 - a) onehot + a / K again by b gives
    (1 - s) onehot + s / K with s = 1 - (1 - a)(1 - b), so the extra rows get
    that s and the real rows ``every_row``.
    """
    both = every_row + extra_smoothing - every_row * extra_smoothing  # exact when one is 0
    return np.where(self.extra_rows(), np.float32(both), np.float32(every_row))

  def position(self, step: int) -> dict[str, Any]:
    """Where step ``step`` is in the data, as saved with its checkpoint."""
    epoch, within = divmod(int(step), self.steps_per_epoch)
    return {"step": int(step), "epoch": epoch, "step_in_epoch": within, "seed": self.seed,
            "num_real": self.num_real, "num_extra": self.num_extra,
            "global_batch": self.global_batch, "extra_fraction": self.extra_fraction,
            "keep_last": self.keep_last}

  def check_position(self, saved: dict[str, Any], where: str) -> None:
    """One-line ConfigError when a checkpoint's ``saved`` position came from
    other data (sizes, batch, seed, mix): resuming would not continue its batches."""
    mine = self.position(int(saved.get("step", 0)))
    differ = [f"{k} {saved[k]!r} -> {mine[k]!r}" for k in mine
              if k in saved and saved[k] != mine[k]]
    if differ:
      raise ConfigError(f"{where} was trained on other data ({', '.join(differ)}): resuming "
                        f"would not continue its batches; train a fresh run with another "
                        f"--workdir")
