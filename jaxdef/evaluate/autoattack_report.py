"""AutoAttack the way users of the reference library call it.

    report = autoattack_report(logits_fn, x_test, y_test, eps=8 / 255, norm="Linf")
    report["robust_accuracy"], report["stages"], report["x_adv"]

The reference (``AutoAttack(model, norm='Linf', eps=..., version='standard')``
then ``run_standard_evaluation(x, y, bs=...)``) logs the clean accuracy, the
robust accuracy after each attack and the perturbation's size, and returns
the adversarial images. This entry does the same with jaxdef's AutoAttack
called eagerly (:func:`jaxdef.attacks.autoattack.staged`): before each attack
the examples still robust are gathered into batches of at most
``batch_size`` (padded to a few bucketed sizes, optionally placed over a mesh
with ``sharding``), each attack is one compiled program, and its lines are
logged as it finishes, not after the whole ensemble.

Robust accuracy is counted as the reference counts it: after each attack the
returned images are re-predicted and only the examples still classified
correctly stay robust. For a randomized model (``randomized=True``, the
``rand`` version) every re-prediction, and the clean pass, is a fresh draw of
its randomness, so an example is robust only if it is classified correctly
under all of them.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from jaxdef import attacks
from jaxdef.attacks.autoattack import VERSIONS, eot_draws
from jaxdef.data.augment import to_float
from jaxdef.errors import ConfigError

Array = jax.Array
# The reference's norm names, and jaxdef's own.
NORMS = {"Linf": "linf", "linf": "linf", "L2": "l2", "l2": "l2"}


def _reference_name(norm: str) -> str:
  return {"linf": "Linf", "l2": "L2"}[norm]


def autoattack_report(logits_fn: Callable[..., Array], x: np.ndarray, y: np.ndarray, *,
                      eps: float, norm: str = "Linf", version: str = "standard",
                      randomized: bool = False, key: Optional[Array] = None,
                      batch_size: Optional[int] = None, sharding=None,
                      log: Optional[Callable[[str], None]] = print,
                      **budget: Any) -> dict[str, Any]:
  """Robust accuracy under AutoAttack, per stage, with the adversarial images.

  Args:
    logits_fn: the classifier ``x -> logits`` (eval mode), or ``(x, key) ->
      logits`` for a randomized one (``randomized``).
    x: (N, H, W, C) images, float in [0, 1] or uint8; y: (N,) labels.
    eps: the budget; norm: 'Linf' / 'L2' (the reference's names) or 'linf' / 'l2'.
    version: 'standard' | 'plus' | 'rand' (:data:`jaxdef.attacks.autoattack.VERSIONS`).
    randomized: ``logits_fn`` takes a key and draws its randomness afresh on
      every call (use the 'rand' version: its APGD averages 20 draws per
      gradient).
    key: randomness (default ``jax.random.key(0)``).
    batch_size: the most examples one compiled attack takes at a time (None:
      :func:`jaxdef.attacks.autoattack.default_batch_size`, 40 on CPU, all of
      them on an accelerator).
    sharding: optional ``NamedSharding`` for the batches (batch axis first).
    log: where the reference-style lines go, each attack's as it finishes
      (None: nowhere).
    budget: passed on to :func:`jaxdef.attacks.autoattack` (``steps``,
      ``fab_steps``, ``queries``, ``n_target_classes``, ``chunks``, ...).

  Returns:
    ``{'clean_accuracy', 'robust_accuracy', 'stages': {attack: robust
    accuracy after it}, 'x_adv': (N, H, W, C) float32, 'seconds', 'norm',
    'eps', 'version', 'eot_iter'}`` (``eot_iter``: gradient draws per APGD
    step); accuracies as fractions.
  """
  if norm not in NORMS:
    raise ConfigError(f"unknown norm {norm!r} (valid: {', '.join(NORMS)})")
  if version not in VERSIONS:
    raise ConfigError(f"unknown AutoAttack version {version!r} (valid: {', '.join(VERSIONS)})")
  norm = NORMS[norm]
  say = log or (lambda line: None)
  key = jax.random.key(0) if key is None else key
  names = tuple(budget.get("attacks") or VERSIONS[version])
  say(f"using {version} version including {', '.join(names)}.")
  x_float, y = np.asarray(to_float(np.asarray(x))), np.asarray(y).astype(np.int32)
  n = len(x_float)
  t0 = time.perf_counter()
  x_adv, fooled = attacks.autoattack(logits_fn, x_float, y, key=key, eps=eps, norm=norm,
                                     version=version, randomized=randomized,
                                     return_stages=True, batch_size=batch_size, log=log,
                                     sharding=sharding, **budget)
  x_adv = np.asarray(x_adv, np.float32)
  # Re-predicted after every attack, as the reference does: the last stage's flags.
  correct = ~np.asarray(fooled[names[-1]] if names else fooled["clean"])
  seconds = time.perf_counter() - t0
  clean = float(1.0 - np.mean(fooled["clean"]))
  accuracy = {name: float(1.0 - np.mean(fooled[name])) for name in names}
  delta = (x_adv - x_float).reshape(n, -1)
  size = (np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1)))
  say(f"max {_reference_name(norm)} perturbation: {size.max():.5f}, nan in tensor: "
      f"{int(np.isnan(x_adv).sum())}, max: {x_adv.max():.5f}, min: {x_adv.min():.5f}")
  robust = float(correct.mean())
  say(f"robust accuracy: {100 * robust:.2f}%")
  return {"clean_accuracy": clean, "robust_accuracy": robust, "stages": accuracy,
          "x_adv": x_adv, "seconds": seconds, "norm": norm, "eps": float(eps),
          "version": version, "eot_iter": eot_draws(version, budget.get("eot_iter"))}

