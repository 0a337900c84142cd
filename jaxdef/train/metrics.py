"""Run logs: ``workdir/metrics.jsonl`` (one JSON object a line), the same
numbers as TensorBoard event files in ``workdir/tensorboard`` (written by
tensorboardX: no TensorFlow needed), and tables.

    tensorboard --logdir runs/     # every run's train / test / eval curves
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np


TENSORBOARD = "tensorboard"


def _event_writer(workdir: str):
  """A tensorboardX writer of event files in ``workdir/tensorboard``."""
  from tensorboardX import SummaryWriter
  return SummaryWriter(os.path.join(workdir, TENSORBOARD))


def _add_scalars(writer, step: int, scalars: Mapping[str, float]) -> None:
  """Adds the finite ones (a throughput not measured yet has no value: no point)."""
  for tag, value in scalars.items():
    if value is not None and math.isfinite(value):
      writer.add_scalar(tag, value, int(step))


def tensorboard_scalars(workdir: str, step: int, scalars: Mapping[str, float]) -> None:
  """Writes ``{tag: value}`` at ``step`` to an event file in ``workdir/tensorboard``
  (opened and closed here, so nothing is left buffered on a crash)."""
  if not scalars:
    return
  writer = _event_writer(workdir)
  try:
    _add_scalars(writer, step, scalars)
  finally:
    writer.close()


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """The numbers of a metrics record as TensorBoard tags ``split/name`` (the
  record's ``step``, ``epoch`` and non-numeric fields left out)."""
  split = record.get("split", "train")
  return {f"{split}/{k}": float(v) for k, v in record.items()
          if k not in ("step", "split", "epoch") and isinstance(v, (int, float))
          and not isinstance(v, bool)}


class MetricsLog:
  """Appends records to ``workdir/metrics.jsonl`` and the numbers of those with
  a ``step`` to TensorBoard (tags ``split/name``: ``train/loss``,
  ``test/pgd_acc``, ...); both flushed on every write, so a crash loses
  nothing already logged. :meth:`close` closes the event file."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._writer = None

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _to_python(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")
    scalars = record_scalars(clean) if "step" in clean else {}
    if scalars:
      if self._writer is None:
        self._writer = _event_writer(self.workdir)
      _add_scalars(self._writer, clean["step"], scalars)
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]


def unfinished_run_warning(workdir: str) -> str | None:
  """A one-line warning when ``workdir`` holds a run that has not finished
  (its ``metrics.jsonl`` has no final ``summary`` record: stopped by a signal,
  a crash, or still training), else None. Evaluating such a run scores its
  newest checkpoint, which may be a few steps old."""
  records = MetricsLog(workdir).read()
  if not records or any(r.get("split") == "summary" for r in records):
    return None
  last = max((int(r["step"]) for r in records if "step" in r), default=0)
  return (f"warning: the run in {workdir!r} has not finished (no summary in metrics.jsonl; "
          f"last logged step {last}); evaluating its newest checkpoint")


def _to_python(v: Any) -> Any:
  """``v`` as a JSON value: a NaN or infinity (a throughput not measured yet, a
  skipped non-finite step's loss) becomes null, which every JSON reader takes."""
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; floats printed with 2 decimals."""
  def fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
