"""What the evaluation attacks and scores: :class:`Target`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

Array = jax.Array
LogitsFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Target:
  """What the suite scores, and what its attacks see (docs/methods.md sec. 6).

  An example counts as robust to an attack when ``predict`` classifies it
  correctly both clean and attacked. The attacks compute their gradients (and
  queries) on ``attack_view``:

  * a plain model: ``attack_view`` is ``predict`` (the default);
  * an input-transformation defense ``classifier(t(x))``: the bare
    classifier for the papers' non-adaptive protocol, or
    :func:`jaxdef.attacks.defended_logits_fn` (BPDA) for the adaptive one;
  * a model with auxiliary heads (CAS, FSR): ``outputs`` and ``joint_loss``
    give the 'joint-pgdN' attacks, which maximise the final loss plus the
    heads' losses.

  Attributes:
    predict: the deployed model, ``x -> logits`` (``(x, key) -> logits``
      when ``randomized``).
    attack_view: what the attacks run on (default ``predict``), same calling
      convention.
    randomized: both take a key; every gradient is then averaged over
      ``eot_samples`` draws (EOT) and AutoAttack should be the 'rand' version.
    eot_samples: gradient draws per attack step when ``randomized``.
    outputs: ``x -> ModelOutput`` of the deployed model (joint attacks; the
      attack unit test reads its ``penultimate`` features).
    joint_loss: ``(ModelOutput, y, loss=L) -> (N,)`` to maximise (joint
      attacks): ``L(logits, y)`` on the final logits plus the heads' ``L``
      (CE by default; the C&W margin for joint C&W).
    reference: the bare classifier ``x -> logits``; when given, each attack
      also reports the defense success rate: of the attacked examples that
      fool the reference, the share ``predict`` classifies correctly.
    oracle: ``(x_clean, x_adv) -> x_restored``, a paper's evaluation that
      reads the paired clean image (NIP's authors); with ``reference``, each
      attack also reports the oracle success rate: of the attacked examples
      whose reference prediction differs from the clean one, the share whose
      restoration the reference classifies as the clean image. Not a
      defense: it is reported in its own column, never scored as ``predict``.
    label: names this target's columns in the results ('' for the main one).
  """
  predict: Callable[..., Array]
  attack_view: Optional[Callable[..., Array]] = None
  randomized: bool = False
  eot_samples: int = 1
  outputs: Optional[Callable[[Array], dict]] = None
  joint_loss: Optional[Callable[[dict, Array], Array]] = None
  reference: Optional[LogitsFn] = None
  oracle: Optional[Callable[[Array, Array], Array]] = None
  label: str = ""

  @property
  def view(self) -> Callable[..., Array]:
    return self.predict if self.attack_view is None else self.attack_view


def as_target(model: "Target | LogitsFn") -> Target:
  """A deterministic ``x -> logits`` function as a :class:`Target`."""
  return model if isinstance(model, Target) else Target(predict=model)
