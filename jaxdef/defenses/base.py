"""The one small interface through which the trainer knows defenses.

A feature-level defense (CAS, FSR) inserts Flax modules at named tap points of
the model and adds terms to the attack loss and the training loss; the trainer
calls these hooks and imports no specific defense. ``none`` is plain
adversarial training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxdef.errors import unknown_name
from jaxdef.models.base import Insert

Array = jax.Array


def _no_insert(model_name: str, num_classes: int) -> Optional[Insert]:
  return None


def _no_term(out_clean: Optional[dict], out_adv: dict, y: Array) -> Array:
  return jnp.zeros(out_adv["logits"].shape[:1], jnp.float32)


@dataclasses.dataclass(frozen=True)
class Defense:
  """A defense as the trainer sees it.

  Attributes:
    name: registry name.
    insert: ``(model_name, num_classes) -> Insert | None``: modules placed at
      tap points of that model (None: the model is unchanged).
    attack_term: ``(out_clean, out_adv, y) -> (N,)`` added to the objective's
      inner loss while PGD runs (e.g. the CAS joint loss); ``out_clean`` may
      be None.
    loss_term: ``(out_clean, out_adv, y) -> (N,)`` added to the training loss
      (auxiliary heads); ``out_clean`` is None unless ``needs_clean_pass``.
    needs_clean_pass: ``loss_term`` reads the clean outputs.
    rng_collections: Flax RNG streams the inserted modules draw from in
      training mode (e.g. 'gumbel' for FSR).
    hyperparameters: what was configured, for the record.
  """
  name: str
  insert: Callable[[str, int], Optional[Insert]] = _no_insert
  attack_term: Callable[[Optional[dict], dict, Array], Array] = _no_term
  loss_term: Callable[[Optional[dict], dict, Array], Array] = _no_term
  needs_clean_pass: bool = False
  rng_collections: tuple[str, ...] = ()
  hyperparameters: Any = None


_DEFENSES: dict[str, Callable[..., Defense]] = {}


def register(name: str):
  """Decorator: ``@register('cas')`` on ``make(**hyperparameters) -> Defense``."""
  def wrap(fn):
    _DEFENSES[name] = fn
    return fn
  return wrap


@register("none")
def make_none() -> Defense:
  """No defense: the objective alone."""
  return Defense(name="none")


def defense_names() -> list[str]:
  _load_all()
  return sorted(_DEFENSES)


def create_defense(name: str, **hyperparameters) -> Defense:
  """The defense ``name`` with its hyperparameters."""
  _load_all()
  if name not in _DEFENSES:
    raise unknown_name("defense", name, _DEFENSES)
  return _DEFENSES[name](**hyperparameters)


def _load_all():
  # Defense modules register themselves on import; add new ones here.
  from jaxdef.defenses import cas, fsr  # noqa: F401
