"""Progress that reads well on a terminal and in a log file.

On a terminal, :func:`bar` is a tqdm bar. When the output is redirected (a
scheduler's log, ``> run.log``, a pipe), a redrawn bar leaves carriage
returns and space padding in the file; :class:`LogLines` prints plain lines
instead: one when the work starts, then one at most every ``interval``
seconds while it moves, and one when it ends, each with the count, the
percentage, the rate and the latest postfix (``train: 120/500 step (24%),
3.1 step/s, loss=0.412 adv_acc=31.2%``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

# Seconds between two lines of a redirected progress report.
LOG_INTERVAL = 30.0


class LogLines:
  """The part of tqdm's interface jaxdef uses, as throttled plain lines."""

  def __init__(self, total: Optional[int], desc: str, unit: str, initial: int = 0,
               disable: bool = False, stream: Optional[TextIO] = None,
               interval: float = LOG_INTERVAL, clock=time.monotonic):
    self.total, self.desc, self.unit, self.n = total, desc.strip(), unit, initial
    self.disable, self.stream, self.interval, self.clock = disable, stream, interval, clock
    self.postfix = ""
    self._start = self._last = clock()
    self._start_n = initial
    self._closed = False
    self._shown = None  # the count of the last line printed
    self._line()

  def _out(self) -> TextIO:
    return self.stream or sys.stderr

  def _line(self) -> None:
    if self.disable:
      return
    self._shown = self.n
    of = f"/{self.total}" if self.total else ""
    pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    elapsed = self.clock() - self._start
    rate = (f", {(self.n - self._start_n) / elapsed:.3g} {self.unit}/s"
            if elapsed > 0 and self.n > self._start_n else "")
    post = f", {self.postfix}" if self.postfix else ""
    print(f"{self.desc}: {self.n}{of} {self.unit}{pct}{rate}{post}", file=self._out(),
          flush=True)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.clock() - self._last >= self.interval:
      self._last = self.clock()
      self._line()

  def set_postfix(self, **values: Any) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

  def write(self, text: str) -> None:
    print(text, file=self._out(), flush=True)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      if self.n != self._shown:  # the last count is not on screen yet
        self._line()

  def __enter__(self) -> "LogLines":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def is_terminal(stream: Optional[TextIO] = None) -> bool:
  stream = stream or sys.stderr
  return bool(getattr(stream, "isatty", lambda: False)())


def bar(total: Optional[int], desc: str, unit: str, *, initial: int = 0,
        disable: bool = False, leave: bool = True, stream: Optional[TextIO] = None):
  """A tqdm bar on a terminal, :class:`LogLines` otherwise (see the module)."""
  if is_terminal(stream):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                leave=leave, file=stream, dynamic_ncols=True)
  return LogLines(total, desc, unit, initial=initial, disable=disable, stream=stream)


def iterate(items, desc: str, unit: str, *, disable: bool = False):
  """``items`` (a sized iterable) with progress (tqdm's ``tqdm(iterable)`` use)."""
  with bar(len(items), desc, unit, disable=disable, leave=False) as b:
    for item in items:
      yield item
      b.update(1)
