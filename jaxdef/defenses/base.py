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

from jaxdef.registry import Registry
from jaxdef.models.base import ApplyFn, Insert, apply_fn  # noqa: F401  (re-exported)

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
    generate: replaces the trainer's PGD generator (None: PGD on the
      objective's inner loss + ``attack_term``). Called as
      ``generate(forward, x, y, key, budget, step, x_start) -> x_adv`` with
      ``forward`` an :data:`ApplyFn` of the current weights in the attack's
      BatchNorm mode (``attack.bn``), ``x`` the clean batch, ``budget`` the
      trainer's ``AttackBudget`` and ``x_start`` where this update's
      generation starts (see ``updates_per_batch``). ``stop_gradient`` is
      applied to the result.
    updates_per_batch: optimizer updates made on each batch. Chaining rule:
      update ``u`` generates its examples with the weights left by update
      ``u - 1``, from ``x_start`` = the clean batch for ``u = 0`` and the
      previous update's ``x_adv`` after that (the built-in PGD generator
      ignores ``x_start`` and starts afresh around the clean batch); every
      update's loss uses the clean batch and its own ``x_adv``. All updates
      of a batch use the learning rate the schedule gives that batch (the
      optimizer's ``count`` fields advance once per batch), the training
      step ``state.step`` advances once, each update is skipped on its own if
      not finite, and the metrics are averaged over the updates.
    objective_weight: multiplies the objective's outer loss.
    model_loss: ``(apply, x, x_adv, y) -> (N,)`` added to the training loss
      for terms that need more model calls than the clean and adversarial
      passes (e.g. Grad-CAM, whose gradient at a tap point needs
      ``perturbations``). ``apply`` is an :data:`ApplyFn` of the parameters
      being differentiated in training mode: BatchNorm normalises with the
      statistics of the batch it is given, and its running statistics are
      left to the clean and adversarial passes (these calls do not update
      them).
    joint_attack_loss: ``(out, y, loss=L) -> (N,)``, the adaptive
      evaluation's loss over the final logits and the auxiliary heads of an
      eval-mode ModelOutput, to maximise (None: the model has no heads to
      attack); ``L(logits, y) -> (N,)`` is the per-output loss (CE by default,
      the C&W margin for joint C&W).
  """
  name: str
  insert: Callable[[str, int], Optional[Insert]] = _no_insert
  attack_term: Callable[[Optional[dict], dict, Array], Array] = _no_term
  loss_term: Callable[[Optional[dict], dict, Array], Array] = _no_term
  needs_clean_pass: bool = False
  rng_collections: tuple[str, ...] = ()
  hyperparameters: Any = None
  generate: Optional[Callable[..., Array]] = None
  updates_per_batch: int = 1
  objective_weight: float = 1.0
  model_loss: Optional[Callable[[ApplyFn, Array, Array, Array], Array]] = None
  joint_attack_loss: Optional[Callable[..., Array]] = None


# The modules whose decorators register defenses, transforms and config sections.
DEFENSE_MODULES = tuple(f"jaxdef.defenses.{m}" for m in ("cas", "fsr", "aad", "nip", "pssr"))
_DEFENSES: Registry[Callable[..., Defense]] = Registry("defense", DEFENSE_MODULES)
# ``@register('cas')`` on ``make(**hyperparameters) -> Defense``.
register = _DEFENSES.register
defense_names = _DEFENSES.names


@register("none")
def make_none() -> Defense:
  """No defense: the objective alone."""
  return Defense(name="none")


def create_defense(name: str, **hyperparameters) -> Defense:
  """The defense ``name`` with its hyperparameters."""
  return _DEFENSES.create(name, **hyperparameters)


@dataclasses.dataclass(frozen=True)
class TestTimeTransform:
  """An input-transformation defense as the evaluation sees it (NIP, PSSR).

  The deployed pipeline is ``classifier(transform(x))``.

  Attributes:
    classifier: the bare classifier, ``x -> logits`` (eval mode).
    transform: ``x -> x'`` of the same shape and range, or ``(x, key) -> x'``
      when ``randomized``; it must use nothing but ``x`` (no label, no clean
      image).
    randomized: ``transform`` draws randomness (attacks then use EOT).
    info: what to report with the results (e.g. the statistics used).
    oracle: optional ``(x_clean, x_adv) -> x_restored``, a paper's own
      evaluation that reads the paired clean image (NIP's authors): not a
      defense, reported beside it as an oracle column.
  """
  classifier: Callable[[Array], Array]
  transform: Callable[..., Array]
  randomized: bool = False
  info: Any = None
  oracle: Optional[Callable[[Array, Array], Array]] = None


_TRANSFORMS: Registry[Callable[..., TestTimeTransform]] = Registry(
    "test-time transform (eval.transform)", DEFENSE_MODULES)
# ``@register_transform('nip')`` on ``make(run=, config=, data=) -> TestTimeTransform``:
# ``run`` a :class:`jaxdef.restored.Restored`, ``config`` the config with the
# transform's own section, ``data`` the loaded dataset (``x_train``/``y_train``).
register_transform = _TRANSFORMS.register
transform_names = _TRANSFORMS.names

# Config sections a module owns (e.g. 'nip'): ``@register_section('nip')`` on
# ``check(section) -> None`` (a one-line ConfigError for a bad field).
_SECTIONS: Registry[Callable[[Any], None]] = Registry(
    "config section", DEFENSE_MODULES)
register_section = _SECTIONS.register


def create_transform(name: str, *, run: Any, config: Any, data: Any) -> TestTimeTransform:
  """The test-time transform ``name`` for the restored ``run`` (see :data:`register_transform`)."""
  return _TRANSFORMS.create(name, run=run, config=config, data=data)


def check_sections(config: Any) -> None:
  """Runs the registered check of every section ``config`` has (see :data:`register_section`)."""
  for name in _SECTIONS.names():
    if name in config:
      _SECTIONS.get(name)(config[name])
