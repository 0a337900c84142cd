"""Progress reports: a bar on a terminal, plain throttled lines in a log file."""

import io

from jaxdef import progress


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_redirected_progress_is_plain_throttled_lines():
  out, clock = io.StringIO(), Clock()
  bar = progress.LogLines(100, "  train", "step", stream=out, interval=30.0, clock=clock)
  for _ in range(10):             # ten updates inside one interval: no line
    clock.now += 1.0
    bar.update(1)
  bar.set_postfix(loss="0.412", adv_acc="31.2%")
  clock.now += 25.0               # 35 s after the start: one line
  bar.update(5)
  bar.close()
  bar.close()                     # closing twice prints once
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue() and all(l == l.rstrip() for l in lines)
  # Closing after a line that shows the last count adds nothing.
  assert lines == ["train: 0/100 step (0%)",
                   "train: 15/100 step (15%), 0.429 step/s, loss=0.412 adv_acc=31.2%"]
  moved = progress.LogLines(4, "eval", "ex", stream=out, clock=clock)
  moved.update(4)
  moved.close()
  assert out.getvalue().splitlines()[-2:] == ["eval: 0/4 ex (0%)", "eval: 4/4 ex (100%)"]


def test_bar_is_tqdm_only_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True
  assert isinstance(progress.bar(3, "x", "ex", stream=io.StringIO()), progress.LogLines)
  assert not isinstance(progress.bar(3, "x", "ex", stream=Terminal()), progress.LogLines)
  out = io.StringIO()
  assert list(progress.iterate([1, 2], "y", "it", disable=True)) == [1, 2]
  assert out.getvalue() == ""
