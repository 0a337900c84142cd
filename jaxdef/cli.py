"""What the launcher does with its command line before any jaxdef work.

* :func:`with_fractions`: ``--config.attack.eps=8/255`` (a fraction, the
  convention eps and step sizes are written in) becomes ``0.0313...``; only
  for fields named like a budget (:data:`FRACTION_FIELDS`), so that a path
  such as ``--config.data.path=runs/1/2`` is never touched.
* :func:`flag_error`: what went wrong while parsing the flags, as one line
  for ``error: ...`` (unknown config field with its did-you-mean, unknown
  variant, a value of the wrong type), instead of a traceback.
"""

from __future__ import annotations

import re
from typing import Sequence

# The last name of a --config field that accepts a fraction 'a/b'.
FRACTION_FIELDS = re.compile(r"(.*eps.*|.*step_size.*|lr|tau)")
_FRACTION = re.compile(r"([0-9]*\.?[0-9]+)/([0-9]*\.?[0-9]+)")
_OVERRIDE = re.compile(r"--(config(?:\.[A-Za-z_][A-Za-z0-9_]*)+)=(.*)", re.S)


def with_fractions(argv: Sequence[str]) -> list[str]:
  """``argv`` with each ``--config.<field>=a/b`` of a budget field replaced by a/b."""
  out = []
  for arg in argv:
    m = _OVERRIDE.fullmatch(arg)
    if m and FRACTION_FIELDS.fullmatch(m.group(1).rsplit(".", 1)[-1]):
      frac = _FRACTION.fullmatch(m.group(2).strip())
      if frac and float(frac.group(2)) != 0:
        arg = f"--{m.group(1)}={float(frac.group(1)) / float(frac.group(2))!r}"
    out.append(arg)
  return out


def _overridden_fields(argv: Sequence[str]) -> list[str]:
  return [m.group(1) for m in map(_OVERRIDE.fullmatch, argv) if m]


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line saying what is wrong with the command line ``argv``.

  An unknown config field names the flag and ml_collections' suggestion
  (``unknown config field config.train.epocs (did you mean 'epochs'?)``);
  an error that carries a traceback or several lines (a config file that
  raised, a missing file) gives its last line.
  """
  for e in (error, error.__cause__ or error.__context__):
    if isinstance(e, (AttributeError, KeyError)):
      key = re.search(r"'\\?'?([A-Za-z_][A-Za-z0-9_]*)\\?'?'", str(e))
      hint = re.search(r'Did you mean "([^"]+)"', str(e))
      if key:
        names = [f for f in _overridden_fields(argv) if f.split(".")[-1] == key.group(1)]
        field = names[0] if names else key.group(1)
        suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        return f"unknown config field {field}{suggestion}; see the config file for its fields"
  lines = [l.strip() for l in str(error).replace("\\n", "\n").splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  text = re.sub(r"^(FATAL )?Flags parsing error: ", "", lines[-1])
  if len(lines) > 1 and "--config" not in text:
    text = f"cannot load the config: {text}"
  return text
