"""What the launcher does with its command line before any jaxdef work.

* :func:`with_fractions`: ``--config.attack.eps=8/255`` (a fraction, the
  convention eps and step sizes are written in) becomes ``0.0313...``; only
  for fields named like a budget (:data:`FRACTION_FIELDS`), so that a path
  such as ``--config.data.path=runs/1/2`` is never touched.
* :func:`flag_error`: what went wrong while parsing the flags, as one line
  for ``error: ...`` (unknown config field with its did-you-mean, unknown
  variant, a value of the wrong type), instead of a traceback.
* :func:`enable_compilation_cache`: JAX's persistent compilation cache, on by
  default in the user's cache folder (``JAXDEF_COMPILATION_CACHE``).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

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


def compilation_cache_dir(env: Mapping[str, str]) -> Optional[str]:
  """Where the launcher keeps JAX's persistent compilation cache, from ``env``.

  ``JAXDEF_COMPILATION_CACHE``: a folder, or ``off`` (also ``0``, ``false``,
  ``none``) for no cache; unset: ``$XDG_CACHE_HOME/jaxdef/xla`` (default
  ``~/.cache/jaxdef/xla``). None when a user's own ``JAX_COMPILATION_CACHE_DIR``
  is set (JAX reads it itself) or the cache is off. A second evaluation of
  the same model shape then compiles nothing.
  """
  chosen = env.get("JAXDEF_COMPILATION_CACHE")
  if env.get("JAX_COMPILATION_CACHE_DIR") and chosen is None:
    return None
  if chosen is not None:
    return None if chosen.strip().lower() in ("off", "0", "false", "none", "") else chosen
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxdef", "xla")


def enable_compilation_cache(env: Mapping[str, str]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in :func:`compilation_cache_dir`
  (before anything is compiled); returns the folder, or None."""
  folder = compilation_cache_dir(env)
  if folder is None:
    return None
  import jax
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  # Programs that took at least a second to compile (JAX's default threshold).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder
