"""One registry implementation for every kind of named thing (models, datasets,
objectives, defenses): a config string maps to a constructor, and an unknown
name is a one-line :class:`ConfigError` listing the valid ones."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Generic, Sequence, TypeVar

from jaxdef.errors import ConfigError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
  """Names -> constructors of one ``kind``.

  ``modules`` are imported before the first lookup: their
  ``@registry.register(...)`` decorators fill the registry, so importing
  jaxdef stays cheap and free of circular imports.
  """

  def __init__(self, kind: str, modules: Sequence[str]):
    self.kind = kind
    self._modules = tuple(modules)
    self._entries: dict[str, T] = {}

  def _load(self) -> None:
    for module in self._modules:
      importlib.import_module(module)

  def register(self, *names: str) -> Callable[[T], T]:
    """Decorator registering ``fn`` under each of ``names``."""
    def wrap(fn: T) -> T:
      for name in names:
        self._entries[name] = fn
      return fn
    return wrap

  def names(self) -> list[str]:
    self._load()
    return sorted(self._entries)

  def get(self, name: str) -> T:
    """The constructor registered as ``name``; ConfigError if there is none."""
    self._load()
    if name not in self._entries:
      raise unknown_name(self.kind, str(name), self._entries)
    return self._entries[name]

  def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
    """``get(name)(*args, **kwargs)``: the thing registered as ``name``, built.

    Arguments the constructor does not take (a ``kwargs`` entry of a config
    written for another ``name``) are a one-line ConfigError naming them and
    the ones it takes, not a TypeError from inside the constructor.
    """
    constructor = self.get(name)
    try:
      signature = inspect.signature(constructor)
    except (TypeError, ValueError):  # a builtin without a signature: let it check
      return constructor(*args, **kwargs)
    try:
      signature.bind(*args, **kwargs)
    except TypeError as e:
      takes = [p for p in signature.parameters if p not in ("self", "parent", "name")]
      raise ConfigError(f"{self.kind} {name!r} cannot be built with these arguments ({e}); "
                        f"it takes: {', '.join(takes)}") from None
    return constructor(*args, **kwargs)
