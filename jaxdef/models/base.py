"""What every jaxdef classifier shares: named tap points, defense inserts, outputs.

A jaxdef model is a ``flax.linen`` module called as

    out = model.apply(variables, x, train=False, labels=None)

with ``x`` NHWC float in [0, 1] (dataset normalisation happens inside the
model). It returns a :class:`ModelOutput` dict:

* ``logits``   (N, num_classes)
* ``features`` {point name: activation} for every tap point (after any
  defense inserted there), e.g. ``stage3`` (N, 8, 8, 256) or
  ``penultimate`` (N, D). Under ``jit`` the unused ones cost nothing.
* ``aux``      {point name: whatever the inserted defense returned as
  auxiliary output} (empty without a defense).

Tap points are where defenses plug in (CAS after ``stage4.0`` and
``stage4.1``, FSR after ``stage4``) and where Grad-CAM / NIP read
activations. A point can have several names (the last block of a stage is
both ``stage4.1`` and ``stage4``); its first name is its primary name.

Each tap also calls ``Module.perturb(primary_name, h)``: passing a zeros
``perturbations`` collection to ``apply`` and differentiating with respect to
it gives d(output)/d(activation) at that point, which Grad-CAM (AAD) and
neuron influence (NIP) need. Without that collection ``perturb`` is the
identity, so ordinary calls are unaffected; ``init`` does not create it (see
:func:`perturbation_zeros`). Defense modules must not be named like a tap
point (use ``f"{kind}_{point}"``): the perturbation variable owns that name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class ModelOutput(TypedDict):
  logits: Array
  features: dict[str, Array]
  aux: dict[str, Any]


# A defense module inserted at a tap point is called as
#   h_new, aux = module(h, train=train, labels=labels)
# and must keep the shape of h. ``make(point_name)`` builds it; it is called
# inside the model's compact ``__call__`` so the module becomes a child named
# ``f"{kind}_{point}"`` by the factory.
@dataclasses.dataclass(frozen=True)
class Insert:
  """Which tap points get a defense module, and how to build one.

  Attributes:
    points: names of the tap points (primary names or aliases).
    make: ``make(point_name) -> nn.Module``; the module's ``__call__`` is
      ``(h, *, train, labels) -> (h, aux)``.
  """
  points: tuple[str, ...]
  make: Callable[[str], nn.Module]


class Taps:
  """Collects features and aux outputs while a model runs (one per call)."""

  def __init__(self, module: nn.Module, insert: Optional[Insert], train: bool,
               labels: Optional[Array]):
    self._module = module
    self._insert = insert
    self._train = train
    self._labels = labels
    self.features: dict[str, Array] = {}
    self.aux: dict[str, Any] = {}
    self._used: set[str] = set()

  def __call__(self, names: str | Sequence[str], h: Array) -> Array:
    """Marks tap point ``names`` on activation ``h``; returns what follows it."""
    names = (names,) if isinstance(names, str) else tuple(names)
    primary = names[0]
    if self._insert is not None:
      hit = [n for n in names if n in self._insert.points]
      if len(hit) > 1:
        raise ValueError(f"Insert names one tap point twice ({hit}); name it once")
      if hit:
        defense = self._insert.make(hit[0])
        h, self.aux[hit[0]] = defense(h, train=self._train, labels=self._labels)
        self._used.update(hit)
    # At init the collection would be sized for the dummy batch, and a later
    # apply with init's full output would silently broadcast it: skip it.
    if not self._module.is_initializing():
      h = self._module.perturb(primary, h)
    for n in names:
      self.features[n] = h
    return h

  def output(self, logits: Array) -> ModelOutput:
    """Finishes the call; checks every requested insert point existed."""
    if self._insert is not None:
      missing = [p for p in self._insert.points if p not in self._used]
      if missing:
        raise ValueError(
            f"{type(self._module).__name__} has no tap point named {missing}; "
            f"valid points: {sorted(self.features)}")
    return ModelOutput(logits=logits, features=self.features, aux=self.aux)


class Normalize(nn.Module):
  """(x - mean) / std with the dataset statistics, so models take [0, 1]."""
  mean: Sequence[float]
  std: Sequence[float]

  def __call__(self, x: Array) -> Array:
    mean = jnp.asarray(self.mean, x.dtype)
    std = jnp.asarray(self.std, x.dtype)
    return (x - mean) / std


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
  """Returns ``(params, batch_stats)`` from ``init`` output (perturbations dropped)."""
  return variables["params"], variables.get("batch_stats", {})


def perturbation_zeros(model: nn.Module, variables: Mapping[str, Any], x: Array,
                       **kwargs) -> dict[str, Array]:
  """Zeros for every tap point of ``model`` at input ``x`` (shapes only, no FLOPs).

  Pass ``{"perturbations": zeros}`` to ``apply`` and take the gradient with
  respect to it to get d(out)/d(activation) at each tap point.
  """
  def shapes():
    _, state = model.apply(variables, x, mutable=["perturbations", "batch_stats"], **kwargs)
    return state["perturbations"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(shapes))


# ``apply(x, perturbations=None) -> ModelOutput``: a model with fixed variables;
# ``perturbations`` ({tap point name: zeros}) is passed to ``model.apply`` so
# that differentiating with respect to it gives d(out)/d(activation) there.
ApplyFn = Callable[..., dict]


def apply_fn(model: nn.Module, variables: dict, *, train: bool, labels: Optional[Array] = None,
             rngs: Optional[dict] = None) -> ApplyFn:
  """``model`` with fixed ``variables`` as an :data:`ApplyFn`.

  In training mode BatchNorm normalises with the statistics of the batch it
  is given and the update of its running statistics is discarded.
  """
  def apply(x: Array, perturbations: Optional[dict] = None) -> dict:
    v = variables if perturbations is None else {**variables, "perturbations": perturbations}
    if not train:
      return model.apply(v, x, train=False)
    return model.apply(v, x, train=True, labels=labels, rngs=rngs, mutable=["batch_stats"])[0]
  return apply


# Flax layers that cast their kernel and bias to their compute dtype at every call.
_CASTING_LAYERS = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.DenseGeneral)


def precast_params(call: Callable[[dict], Any], variables: dict) -> dict:
  """``variables`` with the kernel and bias of every Flax ``Conv`` / ``Dense``
  layer that ``call(variables)`` applies with a compute dtype already cast to it.

  Those layers cast their float32 weights at every call: inside an attack's
  loop that is one cast per layer per iteration (on a GPU, XLA does not hoist
  them out of the ``while``). Cast here once, the loop reads bfloat16 weights
  and the layers' own cast is the identity, so the values are the same.
  Weights a layer reads in float32 (a compute dtype of None, or another module's
  ``param``) are left as they are. ``call`` is traced for shapes only.
  """
  dtypes: dict[tuple[str, ...], Any] = {}

  def record(next_fun, args, kwargs, context):
    layer = context.module
    if isinstance(layer, _CASTING_LAYERS) and layer.dtype is not None:
      dtypes[tuple(layer.path)] = layer.dtype
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(call, variables)

  def cast(path, leaf):
    keys = tuple(getattr(p, "key", str(p)) for p in path)
    dtype = dtypes.get(keys[:-1])
    return leaf.astype(dtype) if dtype is not None and keys[-1] in ("kernel", "bias") else leaf

  return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}
