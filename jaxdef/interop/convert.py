"""PyTorch state dicts to jaxdef variables and back, for one architecture.

    model, variables = from_torch(state_dict, "wrn-28-10")
    arch, state_dict = to_torch(model, "wide_resnet", variables)

Layouts: a convolution kernel is (O, I, kh, kw) in PyTorch and (kh, kw, I, O)
in Flax; a linear layer's weight is (out, in) against Flax's (in, out);
BatchNorm's weight / bias / running_mean / running_var are Flax's scale /
bias and the ``batch_stats`` mean / var (``num_batches_tracked`` is read
nowhere in evaluation: ignored on import, written as 0 on export). Both
directions go through the one table :func:`slots`, so a round trip is exact.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.errors import ConfigError
from jaxdef.interop.architectures import (FAMILIES, Arch, Family, arch_of_model, layers,
                                          parse_arch)
from jaxdef.interop.tensors import unwrap
from jaxdef.models.registry import create_model

BN_COUNTER = "num_batches_tracked"
SHOWN = 3  # keys named per kind of mismatch


class Slot(NamedTuple):
  """Where one PyTorch tensor lives in jaxdef's variables, and its layout:
  'conv' (OIHW vs HWIO), 'dense' (transposed) or 'plain' (as is)."""
  collection: str
  path: tuple[str, ...]
  layout: str


def slots(model: Any, family: Family) -> dict[str, Slot]:
  """``{PyTorch key: Slot}`` for every tensor of ``model`` named as in ``family``."""
  out: dict[str, Slot] = {}
  for layer in layers(model, family):
    p = layer.path
    if layer.kind == "conv":
      out[f"{layer.torch}.weight"] = Slot("params", p + ("kernel",), "conv")
    elif layer.kind == "dense":
      out[f"{layer.torch}.weight"] = Slot("params", p + ("kernel",), "dense")
      out[f"{layer.torch}.bias"] = Slot("params", p + ("bias",), "plain")
    else:
      for torch_name, collection, name in (("weight", "params", "scale"),
                                           ("bias", "params", "bias"),
                                           ("running_mean", "batch_stats", "mean"),
                                           ("running_var", "batch_stats", "var")):
        out[f"{layer.torch}.{torch_name}"] = Slot(collection, p + (name,), "plain")
  return out


def torch_layout(a: np.ndarray, layout: str) -> np.ndarray:
  """A Flax array in PyTorch's layout."""
  return {"conv": lambda: a.transpose(3, 2, 0, 1), "dense": lambda: a.T,
          "plain": lambda: a}[layout]()


def flax_layout(t: np.ndarray, layout: str) -> np.ndarray:
  """A PyTorch array in Flax's layout (the inverse of :func:`torch_layout`)."""
  return {"conv": lambda: t.transpose(2, 3, 1, 0), "dense": lambda: t.T,
          "plain": lambda: t}[layout]()


def variable_shapes(model: Any, image_shape: Sequence[int]) -> dict[tuple[str, ...], tuple]:
  """``{(collection, *path): shape}`` of ``model``'s params and batch_stats
  (from ``jax.eval_shape``: nothing is computed)."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, *image_shape), jnp.float32)))
  flat = flax.traverse_util.flatten_dict({k: tree[k] for k in ("params", "batch_stats")
                                          if k in tree})
  return {k: tuple(v.shape) for k, v in flat.items()}


def _check_table(table: Mapping[str, Slot], shapes: Mapping[tuple, tuple], arch: Arch) -> None:
  """The key table names every variable of the model once (a jaxdef bug otherwise)."""
  named = {(s.collection, *s.path) for s in table.values()}
  if named != set(shapes) or len(named) != len(table):
    raise RuntimeError(f"jaxdef's key table for {arch.name} does not match the model "
                       f"{arch.model}: unnamed {sorted(set(shapes) - named)[:3]}, "
                       f"unknown {sorted(named - set(shapes))[:3]}")


def _listing(keys: Sequence[str]) -> str:
  shown = ", ".join(keys[:SHOWN])
  return shown + (", ..." if len(keys) > SHOWN else "")


def ignored_keys(state_dict: Mapping[str, Any], arch: Arch) -> list[str]:
  """Keys of modules the PyTorch forward pass never uses (e.g. the TRADES
  WideResNet's ``sub_block1``): dropped on import."""
  prefixes = FAMILIES[arch.family].ignored
  return sorted(k for k in state_dict if prefixes and k.startswith(prefixes))


def mismatch(state_dict: Mapping[str, np.ndarray], table: Mapping[str, Slot],
             shapes: Mapping[tuple, tuple], arch: Arch) -> Optional[str]:
  """One line naming the first few missing, unexpected and wrong-shaped tensors
  of ``state_dict`` against ``table`` with their counts; None when it fits."""
  bn_prefixes = {k.rsplit(".", 1)[0] for k, s in table.items() if k.endswith(".running_var")}
  ignored = set(ignored_keys(state_dict, arch))
  missing = [k for k in table if k not in state_dict]
  unexpected = [k for k in state_dict if k not in table and k not in ignored
                and not (k.endswith("." + BN_COUNTER) and k.rsplit(".", 1)[0] in bn_prefixes)]
  wrong = []
  for key, slot in table.items():
    if key in state_dict:
      want = torch_layout(np.empty(shapes[(slot.collection, *slot.path)], np.uint8),
                          slot.layout).shape
      got = tuple(np.shape(state_dict[key]))
      if got != want:
        wrong.append(f"{key} {got} where {want}")
  parts = [f"{len(found)} {what} ({_listing(found)})"
           for what, found in (("missing", missing), ("unexpected", unexpected),
                               ("wrong-shaped", wrong)) if found]
  return "; ".join(parts) if parts else None


def _model(arch: Arch, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Any:
  return create_model(arch.model, num_classes=num_classes, mean=mean, std=std,
                      **dict(arch.kwargs))


def infer_num_classes(state_dict: Mapping[str, np.ndarray], arch: Arch) -> Optional[int]:
  """Rows of the head's weight, when the state dict has a 2-D one."""
  weight = state_dict.get(f"{FAMILIES[arch.family].head}.weight")
  return int(weight.shape[0]) if weight is not None and np.ndim(weight) == 2 else None


def from_torch(state_dict: Mapping[str, Any], arch: str | Arch, *,
               num_classes: Optional[int] = None, mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, what: str = "the state dict"
               ) -> tuple[Any, dict]:
  """``(model, variables)``: the jaxdef model of ``arch`` (an ``--arch`` name,
  see :mod:`jaxdef.interop.architectures`) holding the weights of a PyTorch
  ``state_dict`` (numpy arrays or tensors; wrappers and ``module.`` prefixes
  are unwrapped).

  ``num_classes`` defaults to the head's rows; ``mean``/``std`` to the
  architecture's own normalisation (the DeepMind WRNs') or none. A state
  dict that does not fit is refused in one ConfigError line naming the first
  few missing, unexpected and wrong-shaped tensors and their counts.
  """
  arch = parse_arch(arch) if isinstance(arch, str) else arch
  tensors = unwrap(state_dict, what)
  inferred = infer_num_classes(tensors, arch)
  num_classes = num_classes or inferred or 10
  mean = tuple(mean) if mean is not None else (arch.mean or (0.0,))
  std = tuple(std) if std is not None else (arch.std or (1.0,))
  model = _model(arch, num_classes, mean, std)
  shapes = variable_shapes(model, arch.image_shape)
  table = slots(model, FAMILIES[arch.family])
  _check_table(table, shapes, arch)
  problem = mismatch(tensors, table, shapes, arch)
  if problem:
    raise ConfigError(f"{what} does not fit --arch {arch.name} ({arch.class_call}, "
                      f"{num_classes} classes): {problem}")
  flat = {(s.collection, *s.path): jnp.asarray(flax_layout(tensors[k].astype(np.float32),
                                                           s.layout))
          for k, s in table.items()}
  return model, flax.traverse_util.unflatten_dict(flat)


def to_torch(model: Any, model_name: str, variables: Mapping[str, Any]
             ) -> tuple[Arch, dict[str, np.ndarray]]:
  """``(arch, state_dict)``: jaxdef ``model`` (built as ``model.name =
  model_name``) with ``variables`` as the state dict of its PyTorch class
  (float32 numpy arrays, ``num_batches_tracked`` int64 zeros). A model with
  no PyTorch counterpart is refused in one ConfigError line."""
  arch = arch_of_model(model, model_name)
  flat = flax.traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")
                                          if k in variables})
  table = slots(model, FAMILIES[arch.family])
  _check_table(table, {k: np.shape(v) for k, v in flat.items()}, arch)
  out = {k: np.array(torch_layout(np.asarray(flat[(s.collection, *s.path)], np.float32),
                                  s.layout), order="C")  # a writable copy
         for k, s in table.items()}
  for key in [k for k in table if k.endswith(".running_var")]:
    out[f"{key.rsplit('.', 1)[0]}.{BN_COUNTER}"] = np.zeros((), np.int64)
  return arch, out
