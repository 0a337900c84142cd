"""The configs that ship with jaxdef (``jaxdef.configs``), by name.

``jaxdef train --config pgd_at:cifar10_resnet18`` names a shipped config and
one of its variants; ``--config path/to/file.py:variant`` names any config
file. :func:`resolve` turns either into the file path ml_collections loads,
or says in one line what is wrong. :func:`listing` is what ``jaxdef configs``
prints: each config's variants and the first lines of its first comment.

A config file is a Python module with ``get_config(variant)`` (big_vision
style). Its variants are its ``VARIANTS`` tuple, or none when
``get_config`` takes no argument; its first comment says what it trains, how
to run it and what it reaches.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import types

from jaxdef.errors import ConfigError

PACKAGE = "jaxdef.configs"


def config_dir() -> str:
  """The folder of the shipped configs (``configs/`` in a checkout)."""
  return os.path.dirname(importlib.import_module(PACKAGE).__file__)


def names() -> list[str]:
  """The shipped configs' names (file names without ``.py``), sorted."""
  return sorted(f[:-3] for f in os.listdir(config_dir())
                if f.endswith(".py") and not f.startswith("_"))


def module(name: str) -> types.ModuleType:
  """The shipped config ``name`` as a module."""
  return importlib.import_module(f"{PACKAGE}.{name}")


def variants(config_module: types.ModuleType) -> tuple[str, ...]:
  """The variants ``config_module.get_config`` accepts: its ``VARIANTS``, else
  its argument's default alone, else none (a config without variants)."""
  if hasattr(config_module, "VARIANTS"):
    return tuple(config_module.VARIANTS)
  params = list(inspect.signature(config_module.get_config).parameters.values())
  if params and params[0].default is not inspect.Parameter.empty:
    return (params[0].default,)
  return ()


def first_comment(path: str) -> list[str]:
  """The lines of the comment a config file starts with, without ``# ``."""
  lines = []
  with open(path) as f:
    for line in f:
      if not line.startswith("#"):
        break
      lines.append(line[1:].rstrip("\n")[1:] if line.startswith("# ") else line[1:].rstrip())
  return lines


def summary(path: str) -> str:
  """What a config trains: its first comment up to the first indented line
  (the command that runs it), as one line."""
  words = []
  for line in first_comment(path):
    if line.startswith(" ") or not line.strip():
      break
    words.append(line.strip())
  return " ".join(words).rstrip(":")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One shipped config, as ``jaxdef configs`` lists it."""
  name: str
  path: str
  variants: tuple[str, ...]
  summary: str


def listing() -> list[Entry]:
  """Every shipped config with its variants and summary."""
  out = []
  for name in names():
    path = os.path.join(config_dir(), f"{name}.py")
    out.append(Entry(name, path, variants(module(name)), summary(path)))
  return out


def name_of(spec: str) -> str:
  """The config name ``--config``'s value ``spec`` refers to: a ``.py`` file's
  name without the extension, else the value itself (the variant dropped)."""
  target = spec.partition(":")[0]
  return os.path.basename(target)[:-3] if target.endswith(".py") else target


def resolve(spec: str) -> str:
  """``--config``'s value as the path ml_collections loads (``file[:variant]``).

  ``spec`` is a config file (``configs/pgd_at.py:cifar10_resnet18``) or the
  name of a shipped config (``pgd_at:cifar10_resnet18``, ``pgd_at.py``,
  ``default``). A file wins over a shipped name, and a path that is not a
  file falls back to the shipped config of that name (the README's
  ``configs/default.py`` outside a checkout). A name that is neither is a
  :class:`ConfigError` naming the closest shipped configs; a variant the
  shipped config does not have is one too.
  """
  target, sep, variant = spec.partition(":")
  if os.path.isfile(os.path.expanduser(target)):
    return os.path.expanduser(target) + sep + variant
  name = name_of(spec)
  if name not in names():
    if os.sep in target or target.endswith(".py"):
      raise ConfigError(f"config file not found: {target} (nor is {name!r} a shipped config; "
                        f"`jaxdef configs` lists them)")
    close = difflib.get_close_matches(name, names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown config {name!r}{hint}; `jaxdef configs` lists the shipped "
                      f"configs, or give a config file")
  known = variants(module(name))
  if sep and not known:
    raise ConfigError(f"config {name} has no variants (got {variant!r})")
  if sep and variant not in known:
    raise ConfigError(f"unknown variant {variant!r} of config {name} "
                      f"(valid: {', '.join(known)})")
  return os.path.join(config_dir(), f"{name}.py") + sep + variant
