"""The public attacks compile themselves when called with concrete arrays.

    x_adv = attacks.pgd(logits_fn, x, y, key=key, eps=8 / 255, step_size=2 / 255, steps=20)

runs as one XLA program, compiled on the first call and reused by every later
call with the same ``logits_fn``, the same budget and the same shapes; the
same line inside the caller's ``jax.jit`` (or ``vmap``, ``grad``) is the plain
function it always was, traced into the caller's program. Every public attack
is wrapped by :func:`compiles_itself`, which decides between the two with
:func:`tracing`; :func:`call_compiled` is the compile-and-cache step, shared
with AutoAttack's eager path (one program per stage).

What is traced and what is static: arrays (JAX or numpy, PRNG keys included)
anywhere in the arguments are traced; every other value (numbers, strings,
flags, the model function, a loss function) is a static argument of the
compiled program, so a new ``eps`` or ``steps`` compiles a new program. Pass
``eps=jnp.float32(e)`` to trace it instead (one program for an eps curve;
the attack then cannot check its value). The cache is JAX's own jit cache;
a model function counts as the same when it is the same object (a bound
method of an unhashable record: the same record and method), and the cache
keeps it, with the weights it closes over, alive. Keep the function, not a
fresh lambda per call, to reuse the compiled program.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.attacks.common import keyed

Array = jax.Array


def tracing(tree: Any) -> bool:
  """Whether ``tree`` holds a tracer: a transformation (the caller's jit, vmap,
  grad) is tracing the attack, which must then stay a plain function of its
  inputs inside the caller's program."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def check_inputs(logits_fn: Callable[..., Array], x: Array, y: Optional[Array] = None, *,
                 randomized: bool = False) -> None:
  """One-line errors for images and labels an attack cannot take.

  Shapes always; value ranges only for concrete arrays (not under ``jit``).
  ``logits_fn`` is ``x -> logits``, or ``(x, key) -> logits`` if ``randomized``;
  ``y`` None (an attack without labels) checks the images only.
  """
  if x.ndim != 4:
    raise ValueError(f"images must be NHWC (4 dimensions), got shape {tuple(x.shape)}")
  if y is not None and (y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer)):
    raise ValueError(f"labels must be integers of shape ({x.shape[0]},), got "
                     f"{y.dtype}{tuple(y.shape)}")
  if tracing((x, y)):
    return
  if float(jnp.min(x)) < 0 or float(jnp.max(x)) > 1:
    raise ValueError("images must be in [0, 1]")
  if y is None:
    return
  classes = jax.eval_shape(keyed(logits_fn, randomized), x, jax.random.key(0)).shape[-1]
  if int(jnp.min(y)) < 0 or int(jnp.max(y)) >= classes:
    raise ValueError(f"labels must be in [0, {classes - 1}], got values in "
                     f"[{int(jnp.min(y))}, {int(jnp.max(y))}]")


class _ByIdentity:
  """A static argument that cannot be hashed (a bound method of a record
  holding dicts of weights), compared by identity instead: by its object and
  function for a bound method, since each attribute access makes a new one.
  The cache entry holds the value, so its id cannot be reused meanwhile."""

  def __init__(self, value: Any):
    self.value = value

  def _key(self) -> tuple:
    v = self.value
    if isinstance(v, types.MethodType):
      return id(v.__self__), v.__func__
    return (id(v),)

  def __hash__(self) -> int:
    return hash(self._key())

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _ByIdentity) and self._key() == other._key()


def _hashable(value: Any) -> Any:
  try:
    hash(value)
  except TypeError:
    return _ByIdentity(value)
  return value


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray))


@functools.partial(jax.jit, static_argnames=("fn", "treedef", "static"))
def _compiled(arrays: list, *, fn: Callable, treedef: Any, static: tuple) -> Any:
  """``fn`` on the arguments rebuilt from the traced ``arrays`` and the
  ``static`` (position, value) leaves; one XLA program per distinct static
  part and array shapes (JAX's jit cache)."""
  leaves, arrays = [], iter(arrays)
  fixed = dict(static)
  for i in range(treedef.num_leaves):
    value = fixed[i] if i in fixed else next(arrays)
    leaves.append(value.value if isinstance(value, _ByIdentity) else value)
  args, kwargs = jax.tree.unflatten(treedef, leaves)
  return fn(*args, **kwargs)


def call_compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
  """``fn(*args, **kwargs)`` as a compiled program, cached per static values
  and array shapes (see the module docstring for what is static)."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  arrays = [leaf for leaf in leaves if _is_array(leaf)]
  static = tuple((i, _hashable(leaf)) for i, leaf in enumerate(leaves) if not _is_array(leaf))
  return _compiled(arrays, fn=fn, treedef=treedef, static=static)


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
  """Every argument of a call by name, defaults filled in and ``**kwargs`` merged in."""
  bound = signature.bind(*args, **kwargs)
  bound.apply_defaults()
  named = {}
  for name, value in bound.arguments.items():
    kind = signature.parameters[name].kind
    named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
  return named


def compiles_itself(attack: Optional[Callable[..., Any]] = None, *,
                    eager: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
  """Decorator of a public attack ``attack(logits_fn, x, [y,] ..., [randomized=...])``.

  Traced (a tracer among the arguments, :func:`tracing`): calls ``attack``
  itself, so the caller's program is unchanged. Called with concrete arrays:
  checks the images and labels (:func:`check_inputs`, the value checks a
  traced call cannot make), then runs ``attack`` through
  :func:`call_compiled`, or ``eager`` if given (AutoAttack's staged path),
  which gets every argument of ``attack`` by name, defaults filled in.
  ``public.traced`` is the undecorated ``attack``.
  """
  if attack is None:
    return functools.partial(compiles_itself, eager=eager)
  signature = inspect.signature(attack)

  @functools.wraps(attack)
  def public(*args, **kwargs):
    named = _arguments(signature, args, kwargs)
    if tracing(named):
      return attack(*args, **kwargs)
    model = next(iter(named.values()))
    check_inputs(model, named["x"], named.get("y"), randomized=named.get("randomized", False))
    if eager is not None:
      return eager(**named)
    return call_compiled(attack, *args, **kwargs)

  public.traced = attack
  return public
