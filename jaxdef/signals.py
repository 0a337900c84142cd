"""SIGTERM / Ctrl-C as a request to stop at the next safe point.

    with stop_requests() as stop:
      for step in ...:
        ...
        if stop["signal"] is not None:   # save, write what is done, then exit
          break

Training saves a checkpoint there (with several processes, a signal sent to
any of them stops all after the same step: the flag is their vote in
:class:`jaxdef.train.distributed.StopAgreement`); the evaluation writes its
finished attacks as partial results. The process then exits with ``128 + signal``
(:func:`exit_status`: 130 for Ctrl-C, 143 for SIGTERM), which schedulers read
as "stopped", not "done". A second signal while stopping ends the process at
once with that status (``os._exit``: no traceback, and no interpreter
tear-down racing the accelerator runtime's threads).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# ``{"signal": None | signum}``, the flag :func:`stop_requests` yields.
StopFlag = dict


class StopRequested(Exception):
  """Raised at a safe point (between batches) after a stop request arrived."""


def check(stop: Optional[StopFlag]) -> None:
  """Raises :class:`StopRequested` if ``stop`` (a flag, or None) holds a signal."""
  if stop is not None and stop.get("signal") is not None:
    raise StopRequested(signal.Signals(stop["signal"]).name)


def exit_status(signum: "int | str") -> int:
  """``128 + signum``, the shell's status for a process ended by that signal
  (given by number or by name, e.g. 'SIGTERM')."""
  if isinstance(signum, str):
    signum = signal.Signals[signum].value
  return 128 + int(signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[dict[str, Optional[int]]]:
  """While active, SIGTERM / SIGINT set ``flag["signal"]`` instead of killing;
  a second one exits at once (see the module docstring).

  Outside the main thread (where Python cannot install handlers) this is a no-op.
  """
  flag: dict[str, Optional[int]] = {"signal": None}
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    if flag["signal"] is not None:
      os._exit(exit_status(signum))
    flag["signal"] = signum
  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
