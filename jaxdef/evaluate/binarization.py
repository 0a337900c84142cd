"""The attack unit test: binarization (Zimmermann et al., NeurIPS 2022, "Increasing
Confidence in Adversarial Robustness Evaluations", sec. 3 and 4).

A robust-accuracy figure says that the attacks found no adversarial example;
the unit test asks whether they would have found one that is known to
exist. For each test image ``x`` the evaluated model is changed into a
binary classifier that keeps the model's feature extractor and replaces its
classes by a linear readout fitted on the features of

* ``x`` itself and ``inner`` points drawn uniformly inside the ball of radius
  ``inner_radius * eps`` around it, labelled 0 ("clean"), and
* one point at ``boundary_radius * eps`` (0.99 eps: inside the ball),
  labelled 1.

Where the fitted readout classifies all of them as labelled (checked with the
deployed model's features, :func:`fit_readout`), the label-1 point is an
adversarial example of the binarized model inside the eps-ball: it exists by
construction. The suite's attacks (the same functions, :mod:`.attacks`) are
then run on the binarized model with label 0, and the test reports which
share of these examples they find. The evaluation passes when that share is
at least ``threshold`` (0.95 by default: the paper asks that the attacks find
"nearly all"; one miss in 20 is allowed). Examples whose readout cannot be
fitted are left out of the rate and counted.

Choices made here (the paper leaves them open or the authors' code sets them
per case study):

* **Features**: the model's ``penultimate`` tap point (the input of its
  linear head, the paper's choice) when the target exposes
  :attr:`Target.outputs` and its attacks see the deployed model itself;
  otherwise (a transform pipeline, a BPDA or randomized view) the logits of
  ``predict`` and ``attack_view``, so that the binarized model keeps whatever
  the attacks had to get through. The record names which.
* **Points** (:func:`ball_points`): L-inf inner points are uniform in the
  cube, L2 ones have uniform directions and radii stratified by the uniform
  ball's radial law; the boundary point has a random direction whose coordinates that
  would leave [0, 1] are flipped (a flip keeps both norms), so for eps <= 0.5
  the box clips nothing and it sits at 0.99 eps (a corner of the L-inf cube).
  Every point is clipped to [0, 1], which only shortens a perturbation.
* **Readout** (:func:`fit_readout`): logistic regression (the authors' choice)
  on the features centred on the clean class and scaled to unit norm,
  classes weighted equally, by gradient descent from the minimum-norm
  least-squares fit; then rescaled so its logit is at most 1 in magnitude on
  the fitted points (the authors' 'fixed' rescaling), so that a CE attack
  meets neither a saturated nor an inflated loss. The binarized logits are
  ``(-s/2, s/2)``: a margin of ``s``.
* **One model per example**: every example has its own readout, so each
  attack is run per example (batch 1, ``vmap``-ed): no attack that regroups
  or reorders its batch (AutoAttack's chunks) can pair an image with another
  example's readout.
* **Attacks**: the readout has two classes, so AutoAttack is represented by
  its APGD-CE stage (its DLR losses need at least 3 and 4 classes, FAB-T and
  APGD-T other classes to target), joint attacks are left out (no auxiliary
  heads) and so is Square (not a gradient attack).
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdef import signals
from jaxdef.attacks.common import keyed, lp_norm
from jaxdef.config import UNIT_TEST_MODES
from jaxdef.data.augment import to_float
from jaxdef.errors import ConfigError, unknown_name
from jaxdef.evaluate.attacks import SuiteAttack, suite_attack
from jaxdef.evaluate.suite import padded_batches
from jaxdef.evaluate.target import LogitsFn, Target, as_target

Array = jax.Array
# (x, key) -> (N, D) features.
FeaturesFn = Callable[[Array, Array], Array]

CHEAP_EXAMPLES = 20
PASS_THRESHOLD = 0.95
# Suite attacks that are defined on a two-class model; 'autoattack' runs as its
# APGD-CE stage (see the module docstring).
BINARY_ATTACKS = ("fgsm", "cw", "stepll", "r+stepll", "iterll", "apgd-ce")
AUTOATTACK_AS = "apgd-ce"
TEST_NAME = "attack unit test (binarization, Zimmermann et al. 2022)"


class Readout(NamedTuple):
  """A binary linear readout ``s = features @ weight + bias``; class 1 where s > 0."""
  weight: Array  # (D,)
  bias: Array    # ()


def ball_points(key: Array, x: Array, *, eps: float, norm: str, inner: int,
                inner_radius: float = 0.95, boundary_radius: float = 0.99
                ) -> tuple[Array, Array]:
  """The points the readouts are fitted on, for images ``x`` (B, H, W, C):
  ``(points (B, inner + 2, H, W, C), labels (inner + 2,))``, per image in the
  order ``x`` itself, ``inner`` points (label 0), one boundary point (label 1).

  * Inner points: uniform in the ``norm`` ball of radius ``inner_radius *
    eps`` (the authors' gap of 5% between the two classes); for L2 on
    spheres whose radii are the quantiles ``(j + 1/2) / inner`` of the radial
    law of the uniform ball (``r^d``), with uniformly random directions.
  * The boundary point: at ``boundary_radius * eps`` in a random direction (a
    random sign per coordinate for L-inf, a corner of the cube; a uniform
    direction for L2); its coordinates that would leave [0, 1] are flipped,
    which keeps both norms, so for per-pixel budgets up to 0.5 the box clips
    nothing.

  Every point is clipped to [0, 1], which only shortens a perturbation: all
  are inside the eps-ball. One draw serves the whole batch, from XLA's own
  generator (``rbg``, seeded by ``key``): threefry's hash costs seconds of
  compilation per program on a CPU, which the cheap default cannot afford.
  """
  shape = (x.shape[0], inner + 1) + x.shape[1:]
  key = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(key), 2), impl="rbg")
  if norm == "linf":
    u = jax.random.uniform(key, shape, x.dtype, -1.0, 1.0)
    d_inner = inner_radius * eps * u[:, :inner]
    d_bound = boundary_radius * eps * jnp.where(u[:, inner] < 0, -1.0, 1.0)
  elif norm == "l2":
    g = jax.random.normal(key, shape, x.dtype)
    unit = g / (jnp.sqrt(jnp.sum(g * g, axis=(2, 3, 4), keepdims=True)) + 1e-12)
    dim = int(np.prod(x.shape[1:]))
    radii = inner_radius * eps * ((jnp.arange(inner) + 0.5) / inner) ** (1.0 / dim)
    d_inner = unit[:, :inner] * radii.reshape(1, inner, 1, 1, 1)
    d_bound = boundary_radius * eps * unit[:, inner]
  else:
    raise unknown_name("norm", norm, ("linf", "l2"))
  outside = (x + d_bound < 0.0) | (x + d_bound > 1.0)
  boundary = jnp.clip(x + jnp.where(outside, -d_bound, d_bound), 0.0, 1.0)
  points = jnp.concatenate([x[:, None], jnp.clip(x[:, None] + d_inner, 0.0, 1.0),
                            boundary[:, None]], axis=1)
  labels = jnp.zeros(inner + 2, jnp.int32).at[-1].set(1)
  return points, labels


def fit_readout(features: Array, labels: Array, *, steps: int = 3000, lr: float = 2.0
                ) -> Readout:
  """Logistic regression of ``labels`` (M,) in {0, 1} on ``features`` (M, D).

  The features are centred on the mean of class 0 and scaled so the longest
  is 1; both classes weigh half of the loss (one boundary point against many
  clean ones). Gradient descent of ``steps`` (unregularised: the points are
  meant to be separable) starts from the minimum-norm least-squares fit of
  -1 / +1 labels (closed form in the points' kernel), which already
  separates them when their features span the points. Logistic regression
  converges slowly on separable points: from that start, on a small CNN's
  logits (10 features, 17 points), 300 steps left up to 3 of 12 examples
  unseparated, 3000 none. With unit features and weights summing to 1 the
  loss's curvature is at most 1/2, so ``lr`` 2 is stable. The result is
  rescaled so that ``|s| <= 1`` on the fitted points (the authors' 'fixed'
  rescaling) and returned in the raw feature space. Whether it separates the points is
  for the caller to check (:func:`separates`).
  """
  features = features.reshape(features.shape[0], -1).astype(jnp.float32)
  is1 = (labels == 1).astype(jnp.float32)
  weights = 0.5 * is1 / jnp.maximum(is1.sum(), 1.0) \
      + 0.5 * (1 - is1) / jnp.maximum((1 - is1).sum(), 1.0)
  mu = ((1 - is1) / jnp.maximum((1 - is1).sum(), 1.0)) @ features
  scale = jnp.max(jnp.linalg.norm(features - mu, axis=1)) + 1e-12
  f = (features - mu) / scale
  sign = 2 * is1 - 1

  def loss(params):
    w, b = params
    return weights @ jax.nn.softplus(-sign * (f @ w + b))

  # Start: the minimum-norm least-squares fit of the labels as -1 / +1, in the
  # (M, M) kernel of the points (with a bias column); it separates them at once
  # whenever their features span M - 1 dimensions (penultimate features do).
  f1 = jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)
  gram = f1 @ f1.T
  jitter = 1e-6 * jnp.trace(gram) / gram.shape[0] * jnp.eye(gram.shape[0])
  alpha = jnp.linalg.solve(gram + jitter, sign)
  params = (f.T @ alpha, alpha.sum())
  params = jax.lax.fori_loop(
      0, steps, lambda _, p: jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(loss)(p)),
      params)
  w, b = params
  s = f @ w + b
  top = jnp.max(jnp.abs(s)) + 1e-12
  w, b = w / (top * scale), b / top
  return Readout(weight=w, bias=b - mu @ w)


def readout_logit(readout: Readout, features: Array) -> Array:
  """``s`` (N,) of a readout on features (N, ...)."""
  return features.reshape(features.shape[0], -1) @ readout.weight + readout.bias


def binarized_logits(readout: Readout, features: Array) -> Array:
  """Two-class logits (N, 2) ``(-s/2, s/2)``: class 1 where ``s > 0``, margin ``s``."""
  s = readout_logit(readout, features)
  return jnp.stack([-0.5 * s, 0.5 * s], axis=-1)


def separates(readout: Readout, features: Array, labels: Array) -> Array:
  """Whether the readout classifies every point as labelled (a () bool)."""
  return jnp.all((readout_logit(readout, features) > 0) == (labels == 1))


def feature_fns(target: Target, x: Array) -> tuple[str, FeaturesFn, FeaturesFn]:
  """``(kind, deployed, attacked)``: the features the readout is fitted on (those of
  ``predict``) and those the attacks differentiate (those of the attack view),
  each ``(x, key) -> (N, D)``; ``kind`` is 'penultimate' or 'logits' (see the
  module docstring)."""
  if target.outputs is not None and target.attack_view is None and not target.randomized:
    taps = jax.eval_shape(target.outputs, x[:1])["features"]
    if "penultimate" in taps:
      penultimate = lambda z, key: target.outputs(z)["features"]["penultimate"]
      return "penultimate", penultimate, penultimate
  return ("logits", keyed(target.predict, target.randomized),
          keyed(target.view, target.randomized))


def binarized_target(target: Target, readout: Readout, deployed: FeaturesFn,
                     attacked: FeaturesFn) -> Target:
  """The evaluated model with its classes replaced by ``readout`` on its features:
  a :class:`Target` with the same randomness (and EOT draws) as ``target``."""
  predict = lambda z, key: binarized_logits(readout, deployed(z, key))
  view = lambda z, key: binarized_logits(readout, attacked(z, key))
  if not target.randomized:
    return Target(predict=lambda z: predict(z, None), attack_view=lambda z: view(z, None))
  return Target(predict=predict, attack_view=view, randomized=True,
                eot_samples=target.eot_samples)


def _binarize_and_attack(target: Target, attacks: dict[str, SuiteAttack],
                         deployed: FeaturesFn, attacked: FeaturesFn, xb: Array, key: Array, *,
                         eps: float, norm: str, inner: int, fit_steps: int) -> dict[str, Array]:
  """Per example of ``xb`` (B, H, W, C): fit its readout, check it, attack it.

  Returns (B,) arrays: 'valid' (the readout separates its points) and, per
  attack, whether the attack's point is in the ball, in [0, 1] and classified
  1 by the binarized deployed model.
  """
  k_pts, k_feat, k_att = jax.random.split(key, 3)
  points, labels = ball_points(k_pts, xb, eps=eps, norm=norm, inner=inner)
  feats = deployed(points.reshape((-1,) + xb.shape[1:]), k_feat)
  feats = feats.reshape(points.shape[:2] + (-1,))
  zero = jnp.zeros(1, jnp.int32)

  def one(x, f, k_example):
    readout = fit_readout(f, labels, steps=fit_steps)
    binary = binarized_target(target, readout, deployed, attacked)
    predict = keyed(binary.predict, binary.randomized)
    out = {"valid": separates(readout, f, labels)}
    for i, (name, attack) in enumerate(attacks.items()):
      k = jax.random.fold_in(k_example, i)
      x_adv, _ = attack(binary, x[None], zero, k, eps)
      inside = lp_norm(x_adv - x[None], norm)[0] <= eps * (1 + 1e-5) + 1e-7
      in_box = (jnp.min(x_adv) >= 0.0) & (jnp.max(x_adv) <= 1.0)
      found = jnp.argmax(predict(x_adv, jax.random.fold_in(k, 1 << 20)), -1)[0] == 1
      out[name] = found & inside & in_box
    return out

  return jax.vmap(one)(xb, feats, jax.random.split(k_att, xb.shape[0]))


def binarization_test(target: "Target | LogitsFn", x: np.ndarray, *, eps: float, norm: str,
                      attacks: dict[str, SuiteAttack], key: Array, inner: int = 15,
                      fit_steps: int = 3000, threshold: float = PASS_THRESHOLD,
                      batch_size: int = 64, stop: Optional[signals.StopFlag] = None
                      ) -> dict[str, Any]:
  """The binarization test of ``attacks`` on ``target`` at the images ``x``.

  Args:
    target: the evaluated model (a :class:`Target` or ``x -> logits``).
    x: test images (N, H, W, C), uint8 or float in [0, 1]; their labels play
      no part (the binarized model's clean label is 0 by construction).
    eps, norm: the threat model.
    attacks: ``{name: suite attack}`` (:func:`jaxdef.evaluate.suite_attack`),
      each called as the suite calls it, on the binarized target, label 0.
    key: randomness of the points, the readouts' features and the attacks.
    inner: inner points sampled per example (``x`` itself is added).
    fit_steps: gradient steps of the readout's logistic regression.
    threshold: the share of valid examples the attacks must find to pass.
    batch_size: examples binarized and attacked per compiled call.
    stop: a stop flag, checked between batches.

  Returns:
    ``{'examples', 'valid', 'fit_failed', 'features', 'attacks': {name:
    {'found', 'success_rate'}}, 'found', 'success_rate', 'threshold',
    'passed', 'per_example': {'valid', name...: (N,) bool}}``: rates are over
    the valid examples; 'found' and 'success_rate' count an example found when
    any attack finds it (the suite's worst case over attacks); 'passed' also
    needs at least one valid example.
  """
  target = as_target(target)
  if not attacks:
    raise ConfigError("the attack unit test needs at least one attack")
  n = len(x)
  kind, deployed, attacked = feature_fns(target, jnp.asarray(to_float(x[:1])))
  run = jax.jit(lambda xb, k: _binarize_and_attack(
      target, attacks, deployed, attacked, xb, k, eps=float(eps), norm=norm, inner=inner,
      fit_steps=fit_steps))
  parts = []
  for b, (start, end, xb, _) in enumerate(padded_batches(x, np.zeros(n, np.int32),
                                                          min(batch_size, n))):
    signals.check(stop)
    flags = run(xb, jax.random.fold_in(key, b))
    parts.append({k: np.asarray(v)[:end - start] for k, v in flags.items()})
  valid = np.concatenate([p["valid"] for p in parts])
  found = {name: np.concatenate([p[name] for p in parts]) & valid for name in attacks}
  anyone = np.logical_or.reduce(list(found.values()))
  rate = lambda hits: float(hits.sum() / max(valid.sum(), 1))
  return {
      "examples": n, "valid": int(valid.sum()), "fit_failed": int(n - valid.sum()),
      "features": kind,
      "attacks": {name: {"found": int(hits.sum()), "success_rate": rate(hits)}
                  for name, hits in found.items()},
      "found": int(anyone.sum()), "success_rate": rate(anyone), "threshold": float(threshold),
      "passed": bool(valid.any() and rate(anyone) >= threshold),
      "per_example": {**found, "valid": valid},
  }


def unit_test_attacks(names: Sequence[str], mode: str) -> list[str]:
  """Which of the suite's attacks ``names`` the unit test runs: 'cheap' the
  strongest of them, APGD-CE when AutoAttack (or APGD-CE) is in the suite,
  else its PGD column with the most steps (else its first attack defined on
  two classes); 'full' every attack defined on two classes, 'autoattack' as
  its APGD-CE stage (module docstring); none for 'off'. The cheap test asks
  whether the attack the worst case leans on finds what exists (testing a
  PGD-20 that APGD outdoes failed evaluations APGD had made sound)."""
  if mode not in UNIT_TEST_MODES:
    raise unknown_name("eval.unit_test", mode, UNIT_TEST_MODES)
  usable = []
  for name in names:
    name = AUTOATTACK_AS if name == "autoattack" else name
    if (name in BINARY_ATTACKS or re.fullmatch(r"pgd\d+", name)) and name not in usable:
      usable.append(name)
  if mode == "off":
    return []
  if mode == "full":
    return usable
  # The strongest: APGD-CE (AutoAttack's first stage), else the longest PGD.
  if AUTOATTACK_AS in usable:
    return [AUTOATTACK_AS]
  pgd = sorted((n for n in usable if n.startswith("pgd")), key=lambda n: -int(n[3:]))
  return (pgd or usable)[:1]


def unit_test(target: "Target | LogitsFn", x: np.ndarray, *,
              suite_config: ml_collections.ConfigDict, names: Sequence[str], key: Array,
              stop: Optional[signals.StopFlag] = None) -> Optional[dict[str, Any]]:
  """``eval.unit_test`` of the suite ``suite_config`` on ``target``, whose attacks
  were ``names``: the record ``results['unit_test']`` holds (None when 'off').

  'cheap' tests the suite's strongest attack (:func:`unit_test_attacks`) on
  the first :data:`CHEAP_EXAMPLES` images, 'full' every attack defined on two
  classes on the first
  ``eval.unit_test_examples``; ``eval.unit_test_threshold`` is the pass mark.
  The attacks are the suite's own (:func:`jaxdef.evaluate.suite_attack` of
  ``suite_config``: steps, step size, restarts, EOT), without the indicators
  of attack failure, which the test does not read.
  """
  cfg = suite_config
  mode = cfg.get("unit_test", "cheap")
  chosen = unit_test_attacks(names, mode)
  if mode == "off":
    return None
  record: dict[str, Any] = {"test": TEST_NAME, "mode": mode}
  if not chosen:
    return {**record, "passed": None,
            "skipped": f"none of the attacks {', '.join(names)} is a gradient attack "
                       f"defined on a two-class model"}
  quiet = ml_collections.ConfigDict(cfg.to_dict())
  quiet.indicators = False
  n = CHEAP_EXAMPLES if mode == "cheap" else int(cfg.get("unit_test_examples", 200))
  n = min(n, len(x))
  t0 = time.time()
  result = binarization_test(target, x[:n], eps=float(cfg.eps), norm=cfg.norm,
                             attacks={a: suite_attack(a, quiet) for a in chosen}, key=key,
                             threshold=float(cfg.get("unit_test_threshold", PASS_THRESHOLD)),
                             batch_size=int(cfg.batch_size), stop=stop)
  result.pop("per_example")
  return {**record, **result, "seconds": round(time.time() - t0, 2)}


def failure_reason(record: dict[str, Any]) -> str:
  """The sentence that marks a headline unreliable for a failed unit test."""
  pct = lambda a: f"{100 * a:.1f}%"
  if not record["valid"]:
    return (f"{TEST_NAME} could not run: the binary readout could not be fitted on any of "
            f"the {record['examples']} examples, so no attack was shown able to find an "
            f"adversarial example that exists")
  each = ", ".join(f"{name} {pct(a['success_rate'])}" for name, a in record["attacks"].items())
  return (f"{TEST_NAME} failed: the attacks found {record['found']} of {record['valid']} "
          f"adversarial examples that exist by construction ({pct(record['success_rate'])}; "
          f"{each}), below the pass mark of {pct(record['threshold'])}"
          + (f"; {record['fit_failed']} examples left out (readout not fitted)"
             if record["fit_failed"] else ""))
