"""Indicators of attack failure (Pintor et al., NeurIPS 2022, "Indicators of Attack
Failure: Debugging and Improving Optimization of Adversarial Examples").

A gradient attack that fails on an example may have failed for a reason that
says nothing about robustness. :func:`jaxdef.attacks.pgd.perturb` (PGD, FGSM,
C&W) records a :class:`Trace` inside its own ``fori_loop`` when asked (the
loss of every iterate, whether any iterate fooled the model, whether the
input gradients were zero or not finite), and so does APGD
(:func:`jaxdef.attacks.apgd.apgd_run` with ``record``, hence APGD-CE, APGD-DLR
and APGD-T inside AutoAttack, whose eager and traced paths return them);
:func:`failure_indicators` turns a trace into per-example flags, each set
only where the attack failed:

* ``silent success``: an iterate fooled the model but the returned point
  does not (mitigation: return the best iterate, not the last);
* ``incomplete optimisation``: the loss still rose over the last tenth of
  the iterations (mitigation: more steps);
* ``non-converging attack``: the returned point's loss is well below the
  best loss the attack visited, i.e. it oscillates (mitigation: a smaller
  step or a step-size schedule such as APGD's);
* ``unavailable gradients``: the input gradient was zero at every iterate,
  or not finite at some iterate (mitigation: BPDA through the
  non-differentiable part, EOT over randomness, another loss).

The thresholds are jaxdef's reading of the paper's intent (its code was not
consulted): "still rising" means that over the last ``k = max(1, steps //
10)`` iterates the loss gained, per iterate, at least half its average gain
per iterate over the whole run (the curve has not flattened; a gain below
1e-6 never counts); "well below" means by more than 10% of the best loss's
magnitude (plus 1e-6). Both need a curve: they are judged for attacks of at
least 10 iterations (FGSM, a single step, is never "incomplete"). Two more indicators of the paper, transfer
failure and unconstrained-attack failure, need other attacks than the one
traced: the evaluation's eps curve (accuracy left at a large eps) covers the
latter (its check is named after it); the suite counts transfer failures
across columns (:func:`jaxdef.evaluate.suite.transfer_failures`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

MITIGATIONS = {
    "silent success": "return the best iterate of the attack, not its last",
    "incomplete optimisation": "more attack steps",
    "non-converging attack": "a smaller step or a step-size schedule (APGD)",
    "unavailable gradients": "BPDA through the non-differentiable part, EOT over "
                             "randomness, or another loss",
    # Judged by the suite on whole columns (jaxdef.evaluate.suite.transfer_failures).
    "transfer failure": "the white-box gradients mislead: BPDA through the "
                        "transform, EOT, or another loss (the transferred examples "
                        "already count in the worst case)",
}
RISING = 0.5      # share of the run's average gain per iterate still gained at the end
DROPPED = 0.10    # relative fall from the best loss visited: oscillating
MIN_STEPS = 10    # the two loss-curve indicators need at least this many iterations


NAMES = ("silent success", "incomplete optimisation", "non-converging attack",
         "unavailable gradients")  # the per-example indicators of failure_indicators


def gradient_state(g: Array) -> tuple[Array, Array]:
  """Per example of a gradient batch (N, ...): (exactly zero everywhere, not finite somewhere)."""
  flat = g.reshape(g.shape[0], -1)
  return jnp.all(flat == 0, axis=1), ~jnp.all(jnp.isfinite(flat), axis=1)


def no_flags(n: int) -> dict[str, Array]:
  """Every indicator of :func:`failure_indicators` unset for ``n`` examples."""
  return {name: jnp.zeros(n, bool) for name in NAMES}


class Trace(NamedTuple):
  """What one run of the projected-gradient loop saw, per example.

  Attributes:
    losses: (steps + 1, N) the loss of every iterate, the start and the last included.
    fooled_any: (N,) some iterate fooled the model.
    fooled_last: (N,) the returned (last) iterate fools the model.
    zero_gradient: (N,) the input gradient was exactly zero at every iterate.
    nonfinite_gradient: (N,) it was not finite at some iterate.
  """
  losses: Array
  fooled_any: Array
  fooled_last: Array
  zero_gradient: Array
  nonfinite_gradient: Array


def failure_indicators(trace: Trace) -> dict[str, Array]:
  """Per-example flags (N,) bool of each indicator, set only where the attack
  failed (its returned point does not fool the model)."""
  failed = ~trace.fooled_last
  losses = trace.losses
  steps = losses.shape[0] - 1
  k = max(1, steps // 10)
  last = jnp.mean(losses[-k:], axis=0)
  before = jnp.mean(losses[-2 * k:-k], axis=0) if losses.shape[0] >= 2 * k else losses[0]
  recent_gain = (last - before) / k
  average_gain = (losses[-1] - losses[0]) / max(steps, 1)
  best = jnp.max(losses, axis=0)
  judged = steps >= MIN_STEPS  # too few iterates to tell a curve's shape
  return {
      "silent success": failed & trace.fooled_any,
      "incomplete optimisation": failed & judged & (recent_gain > 1e-6)
                                 & (recent_gain >= RISING * average_gain),
      "non-converging attack": failed & judged
                               & (best - losses[-1] > DROPPED * jnp.abs(best) + 1e-6),
      "unavailable gradients": failed & (trace.zero_gradient | trace.nonfinite_gradient),
  }
