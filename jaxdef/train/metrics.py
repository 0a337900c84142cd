"""Run logs: ``workdir/metrics.jsonl`` (one JSON object a line) and tables."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np


class MetricsLog:
  """Appends records to ``workdir/metrics.jsonl``; flushed on every write so a
  crash loses nothing already logged."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _to_python(v) for k, v in record.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")

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
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
    return np.asarray(v).item()
  return v


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub Markdown table; floats printed with 2 decimals."""
  def fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
