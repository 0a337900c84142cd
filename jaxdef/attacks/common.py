"""What APGD, FAB, Square and AutoAttack share: worst-case bookkeeping.

Every attack here refines a :class:`Best` (the worst case found so far per
example). It starts from the clean input, so an example the model already
misclassifies keeps ``x`` itself, and an attack run only replaces the entry of
an example that is still classified correctly. :func:`run_on_robust` is the
jit-friendly form of "attack only the points still robust" (Croce & Hein 2020,
sec. 4): the batch keeps its static shape, the still-robust examples are moved
to the front, and chunks holding no robust example are skipped with
``lax.cond``, so compute shrinks with the robust fraction as in the reference.

The attacks draw their randomness per example (:func:`per_example`, keyed by
the example's index in the caller's batch), so an example meets the same
random starts and proposals whichever batch it is attacked in: in the whole
batch, in a chunk of it, or in the compacted batches of AutoAttack's eager
path (:mod:`jaxdef.attacks.autoattack`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdef.attacks.conv_layout import canonical_input_gradients
from jaxdef.attacks.indicators import no_flags

Array = jax.Array
# A model as the attacks call it: (x, key) -> logits. Deterministic models
# ignore the key; randomized ones (AutoAttack 'rand', EOT) use it.
KeyedLogitsFn = Callable[[Array, Array], Array]


class Best(NamedTuple):
  """Worst case per example: the point, whether it fools the model, its loss,
  and (when an attack records them) the indicators of attack failure its runs
  raised, ``{name: (N,) bool}`` (:mod:`jaxdef.attacks.indicators`; None when
  none is recorded). A flag stays set once a run raised it: whether the
  example was fooled later is the reader's to apply (``flags & ~fooled``)."""
  x_adv: Array   # (N, H, W, C)
  fooled: Array  # (N,) bool
  loss: Array    # (N,) attack loss of x_adv; compared only within one attack
  flags: Optional[dict[str, Array]] = None


def with_flag_slots(best: Best) -> Best:
  """``best`` with every indicator present (unset where it had none): the
  carry of a loop whose attack records the indicators keeps one structure."""
  return best._replace(flags={**no_flags(best.fooled.shape[0]), **(best.flags or {})})


def keyed(logits_fn: Callable[..., Array], randomized: bool) -> KeyedLogitsFn:
  """``logits_fn(x)`` (or ``logits_fn(x, key)`` when ``randomized``) as ``(x, key) -> logits``."""
  if randomized:
    return logits_fn
  return lambda z, key: logits_fn(z)


def attacked_model(logits_fn: Callable[..., Array], randomized: bool) -> KeyedLogitsFn:
  """The model as an attack differentiates it: :func:`keyed`, with the input
  gradients of its convolutions in the layout XLA:CPU runs fast inside loops
  (:func:`jaxdef.attacks.conv_layout.canonical_input_gradients`; the same
  values and gradients)."""
  return canonical_input_gradients(keyed(logits_fn, randomized))


def eot_value_and_grad(fn: Callable[[Array, Array], tuple[Array, Any]], z: Array, key: Array,
                       draws: int) -> tuple[tuple[Array, Any], Array]:
  """``((value, aux), gradient)`` of ``fn(z, key) -> (scalar, aux)`` at ``z``,
  the gradient averaged over ``draws`` keys folded from ``key``.

  Expectation over Transformation (Athalye et al. 2018): for a randomized
  model the attack follows the mean gradient of the randomness. ``value`` and
  ``aux`` are those of the last draw. One draw is a plain ``value_and_grad``
  (with ``key`` itself). The draws run in a ``fori_loop``: memory stays that
  of one draw.
  """
  value_and_grad = jax.value_and_grad(fn, has_aux=True)
  if draws == 1:
    return value_and_grad(z, key)

  def draw(i, acc):
    out, g = value_and_grad(z, jax.random.fold_in(key, i))
    return out, acc[1] + g

  first, g0 = value_and_grad(z, jax.random.fold_in(key, 0))
  out, g = jax.lax.fori_loop(1, draws, draw, (first, g0))
  return out, g / draws


def example_ids(n: int, ids: Optional[Array] = None) -> Array:
  """``ids`` if given, else ``0 .. n-1``: which example of the caller's batch each row is."""
  return jnp.arange(n) if ids is None else ids


def per_example(sample: Callable[[Array, tuple], Array], key: Array, ids: Array,
                shape: tuple) -> Array:
  """``sample(key_i, shape)`` for every example, stacked: (len(ids),) + shape.

  ``key_i`` is ``key`` folded with ``ids[i]``, so an example's draw depends on
  ``key`` and its own id only, not on its row or on the other examples of the
  batch. That is what lets AutoAttack regroup the still-robust examples into
  smaller batches and still attack each exactly as in the whole batch.
  """
  return jax.vmap(lambda i: sample(jax.random.fold_in(key, i), shape))(ids)


def lp_norm(v: Array, norm: str) -> Array:
  """Per-example L-inf or L2 norm of NHWC ``v``, (N,)."""
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))


def select(pick: Array, a: Array, b: Array) -> Array:
  """``a`` where the per-example flag ``pick`` (N,) is set, else ``b``."""
  return jnp.where(pick.reshape(pick.shape + (1,) * (a.ndim - 1)), a, b)


def start_from_clean(model: KeyedLogitsFn, x: Array, y: Array, key: Array) -> Best:
  """The worst case before any attack: ``x`` itself, fooled where already misclassified."""
  fooled = jnp.argmax(model(x, key), axis=-1) != y
  return Best(x, fooled, jnp.full(y.shape, -jnp.inf, jnp.float32))


def attack_from_clean(update: Callable[..., Best], logits_fn: Callable[..., Array], x: Array,
                      y: Array, *, key: Array, randomized: bool, **budget) -> Array:
  """Runs ``update(best, model, x, y, key=..., **budget)`` from the clean worst
  case; returns its ``x_adv``. The public attacks are this around their update."""
  model = attacked_model(logits_fn, randomized)
  k_clean, key = jax.random.split(key)
  return update(start_from_clean(model, x, y, k_clean), model, x, y, key=key, **budget).x_adv


def keep_worst(best: Best, cand: Best) -> Best:
  """Per example: a candidate replaces the current worst case if it fools the
  model and the current one does not, or if neither does and its loss is higher."""
  take = ~best.fooled & (cand.fooled | (cand.loss > best.loss))
  flags = best.flags
  if cand.flags:  # the candidate's run recorded indicators: they add to the earlier ones
    flags = {**(flags or {}), **{k: v | (flags or {}).get(k, False)
                                 for k, v in cand.flags.items()}}
  return Best(select(take, cand.x_adv, best.x_adv), best.fooled | cand.fooled,
              jnp.where(take, cand.loss, best.loss), flags)


def repeat(times: int, body: Callable[[int, Any], Any], init: Any) -> Any:
  """``body(i, carry)`` for ``i`` in ``0 .. times - 1``, as a ``fori_loop``,
  or one plain call of ``body(0, init)`` when ``times`` is 1.

  An attack's restarts: most runs have one, and XLA:CPU runs Square's query
  loop nested in a one-trip loop around :func:`run_on_robust`'s ``cond``
  1.5x slower than the same loop in the ``cond`` alone (VGG-style CNN, 32
  rows: 6.9 against 4.6 ms a query). The values are the same either way.
  """
  if times == 1:
    return body(0, init)
  return jax.lax.fori_loop(0, times, body, init)


def run_on_robust(attack: Callable[[Any, Array], Best], batch: Any, best: Best,
                  key: Array, chunks: int = 1) -> Best:
  """Runs ``attack(batch_chunk, key) -> Best`` where ``best`` is not yet fooled.

  Args:
    attack: one attack run on a batch (a pytree of per-example arrays with a
      leading axis, e.g. ``(x, y, ids)`` or ``(x, y, target, ids)``); returns
      its result for every example of the chunk.
    batch: the per-example inputs, leading axis N.
    best: the worst case so far; its fooled examples are left as they are.
    key: randomness of this run, the same for every chunk (the attacks draw
      per example, :func:`per_example`, so chunks differ by their ids).
    chunks: the batch is cut into this many chunks after moving the robust
      examples to the front; a chunk with none is skipped. 1 keeps the batch
      whole (it is still skipped when nothing is robust). Ignored when it does
      not divide N.

  Returns:
    ``best`` updated with :func:`keep_worst`; the indicator flags an attack
    run records are kept for the indicators ``best.flags`` has slots for
    (:func:`with_flag_slots`), so the result has ``best``'s structure.
  """
  n = best.fooled.shape[0]
  chunks = chunks if chunks > 1 and n % chunks == 0 else 1

  # Both branches give the indicator flags ``best`` carries (:func:`with_flag_slots`):
  # the attack's where it records them, unset otherwise.
  slots = tuple(best.flags or ())

  def flagged(cand, flags):
    unset = jnp.zeros_like(cand.fooled)
    return cand._replace(flags={k: flags.get(k, unset) for k in slots} if slots else None)

  def guarded(inputs, fooled):
    def skip(b):
      return flagged(Best(b[0], jnp.zeros_like(fooled),
                          jnp.full(fooled.shape, -jnp.inf, jnp.float32)), {})

    def run(b):
      cand = attack(b, key)
      return flagged(cand, cand.flags or {})
    return jax.lax.cond(jnp.all(fooled), skip, run, inputs)

  if chunks == 1:
    return keep_worst(best, guarded(batch, best.fooled))
  order = jnp.argsort(best.fooled, stable=True)  # still-robust first
  inverse = jnp.argsort(order)
  split = lambda a: a[order].reshape((chunks, n // chunks) + a.shape[1:])
  merge = lambda a: a.reshape((n,) + a.shape[2:])[inverse]
  per_chunk = (jax.tree.map(split, batch), split(best.fooled))
  cand = jax.lax.map(lambda c: guarded(*c), per_chunk)
  return keep_worst(best, jax.tree.map(merge, cand))


def target_ranks(logits: Array, n_targets: int) -> Array:
  """Classes ranked 2nd .. (n_targets+1)-th by the clean logits, (N, n_targets).

  The target classes of APGD-T and FAB-T (Croce & Hein 2020, sec. 4).
  """
  return jax.lax.top_k(logits, n_targets + 1)[1][:, 1:]
