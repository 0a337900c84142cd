"""Reading a checkpoint file safely, and unwrapping the state dict inside it.

``.safetensors`` files are read with ``safetensors.numpy`` (no PyTorch, no
code in the file format). ``.pt`` / ``.pth`` / ``.bin`` files are pickles;
they are read only through ``torch.load(..., weights_only=True)``, whose
restricted unpickler refuses any object but tensors and plain containers, so
a file that would run code on loading is refused, never run. Without PyTorch
installed such a file gets a one-line hint to convert it. Every failure is a
one-line :class:`~jaxdef.errors.ConfigError`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

import numpy as np

from jaxdef.errors import ConfigError

SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Keys under which training scripts nest the model's state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes that wrappers add to every key: DataParallel / DistributedDataParallel
# ('module.') and scripts that save a wrapper module ('model.').
WRAPPER_PREFIXES = ("module.", "model.")

CONVERT_HINT = ("python -c \"import torch, safetensors.torch as st; "
                "st.save_file(torch.load('{path}', weights_only=True), '{stem}.safetensors')\"")


def _first_line(error: BaseException) -> str:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  return lines[0][:240] if lines else type(error).__name__


def _as_array(value: Any) -> np.ndarray:
  """A numpy copy of a numpy array or a PyTorch tensor (duck-typed: jaxdef does
  not import torch); low-precision floats become float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _is_tensor(value: Any) -> bool:
  return isinstance(value, np.ndarray) or hasattr(value, "detach")


def unwrap(obj: Any, what: str = "the checkpoint") -> dict[str, np.ndarray]:
  """The flat ``{key: array}`` state dict inside ``obj``.

  Descends through wrapper dicts (``{'state_dict': ...}``, ``{'model': ...}``,
  with or without other entries such as 'epoch' or 'optimizer') and strips a
  prefix that every key carries (``module.`` from DataParallel, ``model.``).
  Raises a one-line ConfigError when no state dict is found.
  """
  node = obj
  while isinstance(node, Mapping) and not (node and all(_is_tensor(v) for v in node.values())):
    inner = [k for k in WRAPPER_KEYS if isinstance(node.get(k), Mapping)]
    if not inner:
      keys = ", ".join(map(repr, list(node)[:6])) or "none"
      raise ConfigError(f"{what} holds no state dict (a mapping of names to tensors); its "
                        f"top-level keys: {keys}")
    node = node[inner[0]]
  if not isinstance(node, Mapping):
    raise ConfigError(f"{what} holds a {type(node).__name__}, not a state dict (a mapping of "
                      f"names to tensors)")
  tensors = {str(k): _as_array(v) for k, v in node.items()}
  stripped = True
  while stripped:
    stripped = False
    for prefix in WRAPPER_PREFIXES:
      if tensors and all(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
        stripped = True
  return tensors


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  import safetensors
  import safetensors.numpy
  try:
    tensors = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
  except Exception as e:  # SafetensorError, or a dtype numpy lacks
    raise ConfigError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
  return tensors, metadata


def _read_pickle(path: str) -> Any:
  try:
    torch = importlib.import_module("torch")  # optional: only for pickled checkpoints
  except ImportError:
    stem = os.path.splitext(path)[0]
    raise ConfigError(f"{path} is a PyTorch pickle, which jaxdef reads only with PyTorch "
                      f"installed; convert it where PyTorch is: "
                      f"{CONVERT_HINT.format(path=path, stem=stem)}") from None
  import pickle
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # The restricted unpickler names the callable a pickle asked for ("Unsupported
    # global: GLOBAL posix.system ..."); other refusals are bytes that are no pickle.
    globals_ = [l.strip() for l in str(e).splitlines() if "GLOBAL" in l]
    if globals_:
      raise ConfigError(f"refused {path}: it holds pickled objects other than tensors, which "
                        f"could run code when loaded; weights-only loading did not run them "
                        f"({globals_[0][:200]})") from None
    detail = [l.strip() for l in str(e).splitlines() if "Unsupported" in l]
    raise ConfigError(f"{path} is not a PyTorch checkpoint ({(detail or [_first_line(e)])[0]})"
                      ) from None
  except Exception as e:  # a truncated zip, a text file, ...
    raise ConfigError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: "
                      f"{_first_line(e)})") from None


def read_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(state dict, metadata)`` of the checkpoint file ``path``.

  The metadata is the safetensors header's (``{}`` for a pickle); the state
  dict is unwrapped (:func:`unwrap`).
  """
  if not os.path.isfile(path):
    raise ConfigError(f"no such file: {path}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix in SAFETENSORS:
    tensors, metadata = _read_safetensors(path)
    return unwrap(tensors, path), metadata
  if suffix in PICKLES:
    return unwrap(_read_pickle(path), path), {}
  raise ConfigError(f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r} (give a "
                    f"{' or '.join(SAFETENSORS + PICKLES)} file)")
