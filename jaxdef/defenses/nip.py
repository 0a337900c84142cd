"""NIP: Neuron-level Inverse Perturbation, deployable variant (docs/methods.md section 4).

"Fight Perturbations with Perturbations: Defending Adversarial Attacks via
Neuron Influence", Chen et al., IEEE TDSC 2024 (arXiv 2112.13060). A
test-time, training-free input transformation:

    run = load_run(workdir)                                     # jaxdef.restored
    stats = ensure_statistics(run, config.nip, data)            # once per checkpoint
    restore = nip_transform(run.model, run.variables, stats, config.nip)
    logits = run.logits(restore(x_prime))

or, as the evaluation does (``eval.transform = 'nip'``), through the
test-time transform registry: ``create_transform('nip', run=..., config=...,
data=...)`` (:func:`make_nip`).

1. **Neuron influence** (:func:`neuron_influence`): at a tap point ``a``
   (flattened to D neurons per example: D = H*W*C for a feature map, D for a
   vector), ``I_j(x) = a_j(x) * d z_c(x) / d a_j(x)`` with ``z_c`` the logit
   of the class ``c`` it is given (the true class, for training images).
2. **Statistics** (:func:`influence_statistics`): the mean of ``I`` over the
   correctly classified training images, overall (D,) and per class (C, D).
3. **Neuron sets** (:func:`neuron_sets`): front = the ``front`` neurons of
   highest mean influence, tail = the ``tail`` lowest (ints, or fractions
   ``0 < f < 1`` of D). docs/methods.md: k = 1 (CIFAR), t = 5.
4. **Inverse perturbation** (:func:`inverse_perturbation`): ``T`` steps of
   ``x' <- clip(x' + eta * g, 0, 1)``, ``g = grad_x J / (rms(grad_x J) + 1e-5)``,
   ``J(x') = sum_front a_j(x') - sum_tail a_j(x')`` (:func:`nip_objective`).

**Deployable** (required by docs/methods.md; the authors' code uses the paired
clean image and its label): the transform sees only ``x'``. By default the
front/tail sets come from the overall (class-agnostic) mean influence; with
``class_conditional`` each example uses the sets of its **predicted** class,
or, with ``top_classes = m > 1``, is restored once with the sets of each of
its m most likely classes, keeping the restoration whose prediction is most
confident (highest softmax probability) (:func:`class_conditional_restore`).

**The authors' protocol, as an oracle** (:func:`oracle_restore`, issue 15):
their code takes the perturbation's gradient and neuron sets from the
paired *clean* image, flips its sign when the result's prediction differs
from the clean prediction, and counts success as "prediction = clean
prediction". It needs the clean image, so it is not a defense; the
evaluation reports it in its own column (``TestTimeTransform.oracle``,
``eval.protocol = 'nip'``) beside the deployable NIP, on minimum-norm (FAB)
and full-budget (PGD) adversarial examples.

Choices jaxdef made where the spec leaves them open:

* **Layer** (``nip.layer = 'auto'``, :func:`default_layer`): the reference
  uses the flattened last convolutional features; for ResNet the pooled
  penultimate features. jaxdef: ``pool2`` for ``small_cnn`` (its last conv
  features, 4x4x64 = 1024 neurons on MNIST, 5x5xC on CIFAR; its
  ``penultimate`` is a hidden dense layer), and ``penultimate`` for every
  other model (ResNet-18, PreAct ResNet-18, WRN: global-average-pooled last
  stage; VGG-16: the flattened last pooled conv block). Any tap point, 4-D
  or 2-D, can be named instead.
* **Which training images**: ``num_train_examples`` evenly spaced over the
  training split (0 = all), so that a class-sorted split is still covered;
  only the correctly classified ones (prediction = label) enter the means.
  A class with no correctly classified image takes the overall mean.
* **Ties** in the ranking: ``jax.lax.top_k`` keeps the lower index first.
  ``front + tail`` may not exceed D (the two sets are disjoint).
* **The step** is :func:`jaxdef.attacks.pgd.perturb` (the one gradient loop)
  with its 'rms' ascent step ``g / rms(g)`` and step size ``eta``, no
  eps-ball (projection 'none'), no random start, clip to [0, 1]. The only
  difference to the formula is the guard: ``rms(g) + 1e-12`` instead of
  ``rms(g) + 1e-5``, i.e. the same step wherever ``rms(g) >> 1e-5``, and no
  step where ``g = 0``.
* **Gradients**: ``perturb`` stops the gradient of its result, so the
  transform has none; adaptive attacks must treat it as BPDA (identity in
  the backward pass), docs/methods.md section 6.
* **Weights**: those :func:`jaxdef.restored.load_run` evaluates (EMA when
  the run kept one), evaluation mode (BatchNorm running statistics).
* **eta, T**: the defaults are the paper's CIFAR setting (0.001, 1); its
  MNIST values were not available, ``configs/nip_mnist.py`` says how its
  own were chosen (on training digits) and what they reach.

Statistics live beside the checkpoint they were computed from,
``workdir/nip/influence_step_<step>.npz`` (:func:`statistics_path`), with
the layer, step, weights and number of training images inside;
:func:`load_statistics` refuses a file that does not match what is asked,
and :func:`ensure_statistics` recomputes it then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdef.attacks.common import select
from jaxdef.attacks.pgd import ASCENTS, perturb
from jaxdef import saliency
from jaxdef.saliency import layer_gradient
from jaxdef.data.augment import to_float
from jaxdef.defenses.base import (ApplyFn, TestTimeTransform, apply_fn, register_section,
                                  register_transform)
from jaxdef.errors import ConfigError

Array = jax.Array
# Where ``nip.layer = 'auto'`` points, by ``model.name``; other models: 'penultimate'.
AUTO_LAYERS = (("small_cnn", "pool2"),)
STATISTICS_FORMAT = 1


# ----------------------------------------------------------------------------
# Config.

def default_nip_config() -> ml_collections.ConfigDict:
  """``config.nip``: the NIP transform and its statistics (docs/methods.md section 4).

  Defaults are the paper's CIFAR-10 setting (32 px): front k = 1, tail t = 5,
  eta = 0.001, T = 1 step, class-agnostic sets.
  """
  c = ml_collections.ConfigDict()
  c.layer = "auto"              # a tap point name, or 'auto' (see default_layer)
  # Floats so that --config.nip.front=0.01 overrides: a whole number >= 1 is a count,
  # 0 < f < 1 a fraction of the layer's neurons.
  c.front = 1.0
  c.tail = 5.0
  c.eta = 0.001                 # step size of the inverse perturbation (rms-normalised)
  c.steps = 1                   # T
  c.class_conditional = False   # sets of the predicted class instead of the overall sets
  c.top_classes = 1             # > 1 (class_conditional): try the m most likely classes
  c.num_train_examples = 5000   # training images scanned for the statistics (0 = all)
  c.batch_size = 250            # batch of the statistics pass
  # The authors' oracle evaluation (reported beside the deployable NIP, never as
  # a defense): influence of the clean image's softmax probability or logit.
  c.oracle_signal = "probability"
  return c


def _check_count(field: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ConfigError(f"nip.{field} must be a whole number >= 1 or a fraction in (0, 1), "
                      f"got {value!r}")
  if isinstance(value, (int, np.integer)):
    ok = value >= 1
  else:
    ok = 0 < value < 1 or (value >= 1 and float(value).is_integer())
  if not ok:
    raise ConfigError(f"nip.{field} must be a whole number >= 1 or a fraction in (0, 1), "
                      f"got {value!r}")


def _check_int(field: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ConfigError(f"nip.{field} must be an int >= {minimum}, got {value!r}")


@register_section("nip")
def check_nip_config(nip: ml_collections.ConfigDict) -> None:
  """Raises a one-line :class:`ConfigError` for the first invalid field of ``config.nip``."""
  if not isinstance(nip.layer, str) or not nip.layer:
    raise ConfigError(f"nip.layer must be a tap point name or 'auto', got {nip.layer!r}")
  _check_count("front", nip.front)
  _check_count("tail", nip.tail)
  if isinstance(nip.eta, bool) or not isinstance(nip.eta, (int, float)) or not nip.eta > 0:
    raise ConfigError(f"nip.eta must be > 0, got {nip.eta!r}")
  _check_int("steps", nip.steps, 1)
  if not isinstance(nip.class_conditional, bool):
    raise ConfigError(f"nip.class_conditional must be True or False, got "
                      f"{nip.class_conditional!r}")
  _check_int("top_classes", nip.top_classes, 1)
  if nip.top_classes > 1 and not nip.class_conditional:
    raise ConfigError(f"nip.top_classes={nip.top_classes} needs nip.class_conditional=True "
                      f"(class-agnostic sets do not depend on a class)")
  _check_int("num_train_examples", nip.num_train_examples, 0)
  _check_int("batch_size", nip.batch_size, 1)
  signal = nip.get("oracle_signal", "probability")  # absent from runs written before it
  if signal not in saliency.SIGNALS:
    raise ConfigError(f"nip.oracle_signal must be one of {', '.join(saliency.SIGNALS)}, "
                      f"got {signal!r}")


def default_layer(model_name: str) -> str:
  """The tap point ``nip.layer = 'auto'`` means for ``model_name`` (see the module docstring)."""
  return dict(AUTO_LAYERS).get(model_name, "penultimate")


def resolve_tap(features: Mapping[str, Array], layer: str) -> str:
  """``layer`` if it is a tap point of the model (4-D or 2-D), else a one-line ConfigError."""
  return saliency.resolve_tap(features, layer, what="nip.layer", spatial=False)


def neuron_count(spec: int | float, size: int) -> int:
  """How many neurons ``spec`` (an int, or a fraction 0 < f < 1 of ``size``) selects.

  A fraction rounds to the nearest int, at least 1.
  """
  if 0 < spec < 1:
    return max(1, int(round(spec * size)))
  return int(spec)


# ----------------------------------------------------------------------------
# Neuron influence and its statistics.

def influence_and_logits(apply: ApplyFn, x: Array, labels: Array, layer: str,
                         signal: str = "logit") -> tuple[Array, Array]:
  """``(I (N, D), logits (N, classes))`` on ``x`` (N, H, W, C) for classes ``labels`` (N,).

  ``I_j = a_j * d z_c / d a_j`` at tap point ``layer`` flattened per example
  (D = H'*W'*K or the vector's length), ``c = labels``; one forward and one
  backward pass (:func:`jaxdef.saliency.layer_gradient`). ``signal =
  'probability'`` differentiates the softmax probability ``p_c`` instead of
  the logit ``z_c`` (the oracle protocol, :func:`oracle_restore`).
  """
  activation, gradient, logits = layer_gradient(apply, x, labels, layer, resolve=resolve_tap,
                                                signal=signal)
  influence = activation.astype(jnp.float32) * gradient.astype(jnp.float32)
  return influence.reshape(x.shape[0], -1), logits


def neuron_influence(apply: ApplyFn, x: Array, labels: Array, layer: str,
                     signal: str = "logit") -> Array:
  """Neuron influence ``I_j(x) = a_j(x) * d z_c(x) / d a_j(x)``, (N, D); see
  :func:`influence_and_logits`."""
  return influence_and_logits(apply, x, labels, layer, signal)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class NipStatistics:
  """Mean neuron influence of correctly classified training images (docs/methods.md 4).

  Attributes:
    layer: the tap point (a concrete name, never 'auto').
    step: the checkpoint step of the weights (-1: not from a checkpoint).
    weights: 'ema' or 'params': which weights of the checkpoint.
    num_train_examples: the ``nip.num_train_examples`` that chose the
      training images (0 = all).
    train_examples: training images scanned (correctly classified or not).
    overall: (D,) mean over all correctly classified images scanned.
    per_class: (C, D) mean per true class; a class with count 0 holds ``overall``.
    counts: (C,) correctly classified images per class.
  """
  layer: str
  step: int
  weights: str
  num_train_examples: int
  train_examples: int
  overall: np.ndarray
  per_class: np.ndarray
  counts: np.ndarray

  def identity(self) -> dict[str, Any]:
    """What ties these statistics to a run: layer, step, weights, training images."""
    return {"layer": self.layer, "step": int(self.step), "weights": self.weights,
            "num_train_examples": int(self.num_train_examples)}


def spread_indices(total: int, count: int) -> np.ndarray:
  """``count`` indices evenly spaced over ``range(total)`` (all of them if count is 0)."""
  if count <= 0 or count >= total:
    return np.arange(total)
  return np.linspace(0, total - 1, count).round().astype(np.int64)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("layer", "num_classes"))
def _influence_sums(apply: ApplyFn, x: Array, y: Array, valid: Array, *, layer: str,
                    num_classes: int) -> tuple[Array, Array]:
  """Per-class sums (C, D) of the influence of the valid, correctly classified
  examples of one batch, and their counts (C,); uint8 images are scaled to [0, 1]."""
  x = to_float(x)
  influence, logits = influence_and_logits(apply, x, y, layer)
  keep = valid & (jnp.argmax(logits, -1) == y)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * keep[:, None]
  return onehot.T @ influence, jnp.sum(onehot, axis=0)


def influence_statistics(apply: ApplyFn, x: np.ndarray, y: np.ndarray, *, layer: str,
                         num_classes: int, step: int = -1, weights: str = "params",
                         num_train_examples: int = 0, batch_size: int = 250, progress: bool = True) -> NipStatistics:
  """Means of :func:`neuron_influence` over the correctly classified ``x``.

  Args:
    apply: the classifier in evaluation mode (an :data:`ApplyFn`).
    x: (N, H, W, C) training images, uint8 (0..255) or float in [0, 1].
    y: (N,) integer labels.
    layer: a tap point name.
    num_classes: C.
    step, weights, num_train_examples: recorded in the result (see
      :class:`NipStatistics`).
    batch_size: images per jitted call; the last batch is padded (and the
      padding masked out), so the function compiles once (per ``apply``,
      layer, batch shape and dtype).
    progress: show progress (:mod:`jaxdef.progress`).

  Sums are taken per batch on the device in float32 and accumulated on the
  host in float64.
  """
  from jaxdef.progress import iterate
  x, y = np.asarray(x), np.asarray(y).astype(np.int32)
  n = len(x)
  if n == 0:
    raise ConfigError("NIP statistics need at least one training image")

  sums, counts = None, np.zeros(num_classes, np.float64)
  for start in iterate(range(0, n, batch_size), f"NIP influence ({layer})", "batch",
                       disable=not progress):
    index = np.arange(start, start + batch_size)
    valid = index < n
    index = np.where(valid, index, 0)
    s, c = _influence_sums(apply, x[index], y[index], valid, layer=layer,
                           num_classes=num_classes)
    s = np.asarray(s, np.float64)
    sums = s if sums is None else sums + s
    counts += np.asarray(c, np.float64)
  total = counts.sum()
  overall = sums.sum(0) / max(total, 1.0)
  per_class = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None],
                       overall[None, :])
  return NipStatistics(layer=layer, step=int(step), weights=weights,
                       num_train_examples=int(num_train_examples), train_examples=n,
                       overall=overall, per_class=per_class,
                       counts=counts.astype(np.int64))


# ----------------------------------------------------------------------------
# Front / tail neurons and the inverse perturbation.

def neuron_sets(influence: Array, front: int | float, tail: int | float
                ) -> tuple[Array, Array]:
  """Indices of the front (highest influence) and tail (lowest) neurons.

  Args:
    influence: (D,) or (C, D) mean influence (the ranking is along the last axis).
    front, tail: counts, ints >= 1 or fractions 0 < f < 1 of D (:func:`neuron_count`).

  Returns:
    ``(front (..., k), tail (..., t))`` int32, front in decreasing and tail in
    increasing order of influence.
  """
  influence = jnp.asarray(influence)
  size = influence.shape[-1]
  k, t = neuron_count(front, size), neuron_count(tail, size)
  if k + t > size:
    raise ConfigError(f"nip.front ({k}) + nip.tail ({t}) neurons exceed the layer's {size}")
  return jax.lax.top_k(influence, k)[1], jax.lax.top_k(-influence, t)[1]


def neuron_weights(front_index: Array, tail_index: Array, size: int) -> Array:
  """(..., D): +1 on front neurons, -1 on tail neurons, 0 elsewhere, so that
  ``J = sum_j w_j a_j`` (sets of shape (..., k) and (..., t))."""
  plus = jnp.sum(jax.nn.one_hot(front_index, size, dtype=jnp.float32), axis=-2)
  minus = jnp.sum(jax.nn.one_hot(tail_index, size, dtype=jnp.float32), axis=-2)
  return plus - minus


def flat_activation(apply: ApplyFn, x: Array, layer: str) -> Array:
  """Activations (N, D) at tap point ``layer``, flattened per example."""
  features = apply(x)["features"]
  return features[resolve_tap(features, layer)].reshape(x.shape[0], -1)


def nip_objective(apply: ApplyFn, x: Array, layer: str, weights: Array) -> Array:
  """``J(x') = sum_front a_j(x') - sum_tail a_j(x')``, (N,).

  ``weights``: (D,) shared by all examples or (N, D) per example
  (:func:`neuron_weights`).
  """
  a = flat_activation(apply, x, layer).astype(jnp.float32)
  return jnp.sum(a * weights, axis=-1)


def inverse_perturbation(apply: ApplyFn, x: Array, layer: str, weights: Array, *,
                         eta: float, steps: int) -> Array:
  """``steps`` ascent steps on :func:`nip_objective`: ``x' <- clip(x' + eta g, 0, 1)``,
  ``g = grad J / rms(grad J)`` per example; (N, H, W, C) -> same, in [0, 1].

  Runs :func:`jaxdef.attacks.pgd.perturb` with the 'rms' ascent step and no
  eps-ball (projection 'none': the [0, 1] box only).
  """
  return perturb(lambda z: nip_objective(apply, z, layer, weights), x,
                 key=jax.random.key(0),  # unused: no random start
                 eps=math.inf, step_size=eta, steps=steps, norm="none", ascent="rms",
                 init="none")


def class_conditional_restore(apply: ApplyFn, x: Array, layer: str, class_weights: Array, *,
                              eta: float, steps: int, top_classes: int = 1) -> Array:
  """Restores each example with the sets of its predicted class(es), no label used.

  ``class_weights`` (C, D) from :func:`neuron_weights` of per-class sets. With
  ``top_classes = m``: one restoration per class among the m highest logits
  of ``x``; each example keeps the one whose own prediction has the highest
  softmax probability (the first of equals). m = 1: the predicted class.
  """
  top = jax.lax.top_k(apply(x)["logits"], top_classes)[1]            # (N, m)
  candidates = [inverse_perturbation(apply, x, layer, class_weights[top[:, j]],
                                     eta=eta, steps=steps) for j in range(top_classes)]
  if top_classes == 1:
    return candidates[0]
  stacked = jnp.stack(candidates)                                     # (m, N, H, W, C)
  confidence = jnp.stack([jnp.max(jax.nn.softmax(apply(c)["logits"], -1), -1)
                          for c in candidates])                       # (m, N)
  best = jnp.argmax(confidence, axis=0)
  return jnp.take_along_axis(stacked, best[None, :, None, None, None], axis=0)[0]


def nip_transform(model, variables: Mapping[str, Any], stats: NipStatistics,
                  nip_config: ml_collections.ConfigDict) -> Callable[[Array], Array]:
  """The deployable NIP input transformation ``x' (N, H, W, C) -> restored x'``.

  Pure and jit-able; uses ``model`` with ``variables`` in evaluation mode,
  the front/tail sets of ``stats`` (overall, or per class when
  ``nip_config.class_conditional``) and ``eta``, ``steps``, ``top_classes``.
  It reads nothing but its input: no clean image, no label.
  """
  check_nip_config(nip_config)
  apply = apply_fn(model, dict(variables), train=False)
  eta, steps = float(nip_config.eta), int(nip_config.steps)
  if nip_config.class_conditional:
    num_classes = stats.per_class.shape[0]
    if nip_config.top_classes > num_classes:
      raise ConfigError(f"nip.top_classes={nip_config.top_classes} exceeds the "
                        f"{num_classes} classes")
    front, tail = neuron_sets(stats.per_class, nip_config.front, nip_config.tail)
    weights = neuron_weights(front, tail, stats.per_class.shape[-1])
    return lambda x: class_conditional_restore(apply, x, stats.layer, weights, eta=eta,
                                               steps=steps, top_classes=nip_config.top_classes)
  front, tail = neuron_sets(stats.overall, nip_config.front, nip_config.tail)
  weights = neuron_weights(front, tail, stats.overall.shape[-1])
  return lambda x: inverse_perturbation(apply, x, stats.layer, weights, eta=eta, steps=steps)


def oracle_restore(apply: ApplyFn, x_clean: Array, x_adv: Array, layer: str, *,
                   front: int | float, tail: int | float, eta: float, steps: int,
                   signal: str = "probability") -> Array:
  """The NIP authors' evaluation (docs/methods.md section 4): an ORACLE, not a defense.

  It reads the paired clean image ``x_clean`` of every adversarial ``x_adv``,
  which no deployed defense has, and reproduces what the authors' code does:

  1. the clean prediction ``c = argmax f(x_clean)``;
  2. the influence ``a_j * d s_c / d a_j`` on ``x_clean`` itself, with ``s_c``
     the softmax probability of ``c`` (``signal='probability'``, the Keras
     model's output; 'logit' for ``z_c``), and that one image's front and
     tail sets (``front``, ``tail`` as in :func:`neuron_sets`);
  3. ``g = grad_x J`` **at x_clean**, RMS-normalised per example, added to
     ``x_adv``: ``clip(x_adv + steps * eta * g, 0, 1)`` (the direction is
     fixed, so T steps are one step of ``T * eta`` clipped once);
  4. if the classifier's prediction of that result is not ``c``, the sign is
     flipped: ``clip(x_adv - steps * eta * g, 0, 1)``.

  Success, as the authors measure it, is "the prediction of the result equals
  the clean prediction" (:attr:`jaxdef.evaluate.Target.oracle`). (N, H, W, C)
  in, same out, in [0, 1].
  """
  pred = jnp.argmax(apply(x_clean)["logits"], axis=-1)
  influence, _ = influence_and_logits(apply, x_clean, pred, layer, signal)
  front_index, tail_index = neuron_sets(influence, front, tail)
  weights = neuron_weights(front_index, tail_index, influence.shape[-1])
  grad = jax.grad(lambda z: jnp.sum(nip_objective(apply, z, layer, weights)))(x_clean)
  step = (steps * eta) * ASCENTS["rms"](grad)
  plus = jnp.clip(x_adv + step, 0.0, 1.0)
  minus = jnp.clip(x_adv - step, 0.0, 1.0)
  keep_plus = jnp.argmax(apply(plus)["logits"], axis=-1) == pred
  return jax.lax.stop_gradient(select(keep_plus, plus, minus))


def nip_oracle(model, variables: Mapping[str, Any], layer: str,
               nip_config: ml_collections.ConfigDict) -> Callable[[Array, Array], Array]:
  """``(x_clean, x_adv) -> restored``: :func:`oracle_restore` with ``nip_config``'s
  front, tail, eta, steps and ``oracle_signal``, ``model`` in evaluation mode."""
  check_nip_config(nip_config)
  apply = apply_fn(model, dict(variables), train=False)
  settings = dict(front=nip_config.front, tail=nip_config.tail, eta=float(nip_config.eta),
                  steps=int(nip_config.steps),
                  signal=nip_config.get("oracle_signal", "probability"))
  return lambda x_clean, x_adv: oracle_restore(apply, x_clean, x_adv, layer, **settings)


# ----------------------------------------------------------------------------
# Statistics stored with the checkpoint.

def statistics_path(workdir: str, step: int) -> str:
  """``workdir/nip/influence_step_<step>.npz``."""
  return os.path.join(workdir, "nip", f"influence_step_{int(step)}.npz")


def save_statistics(path: str, stats: NipStatistics) -> None:
  """Writes ``stats`` to ``path`` (npz; the identity as JSON inside), atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  meta = json.dumps({"format": STATISTICS_FORMAT, "train_examples": int(stats.train_examples),
                     **stats.identity()}, sort_keys=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, overall=stats.overall, per_class=stats.per_class, counts=stats.counts,
           meta=np.array(meta))
  os.replace(tmp, path)


def load_statistics(path: str, expect: Optional[Mapping[str, Any]] = None) -> NipStatistics:
  """Reads what :func:`save_statistics` wrote, bit for bit.

  ``expect``: identity fields (see :meth:`NipStatistics.identity`) the file
  must hold; a difference is a one-line :class:`ConfigError`.
  """
  with np.load(path, allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    arrays = {k: f[k] for k in ("overall", "per_class", "counts")}
  if meta.get("format") != STATISTICS_FORMAT:
    raise ConfigError(f"{path} has NIP statistics format {meta.get('format')!r}, "
                      f"expected {STATISTICS_FORMAT}; delete it to recompute")
  for field, value in (expect or {}).items():
    if meta.get(field) != value:
      raise ConfigError(f"{path} holds NIP statistics for {field}={meta.get(field)!r}, "
                        f"not {value!r}")
  return NipStatistics(layer=meta["layer"], step=meta["step"], weights=meta["weights"],
                       num_train_examples=meta["num_train_examples"],
                       train_examples=meta["train_examples"], **arrays)


def nip_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.nip``, or :func:`default_nip_config` when the config has none; checked."""
  nip = config.nip if "nip" in config else default_nip_config()
  check_nip_config(nip)
  return nip


def ensure_statistics(run: Any, nip: ml_collections.ConfigDict, data: Any, *,
                      progress: bool = True) -> NipStatistics:
  """The NIP statistics of the restored checkpoint ``run``.

  Loaded from :func:`statistics_path` when a file there matches the layer,
  weights and number of training images that ``nip`` (the config's ``nip``
  section, see :func:`nip_section`) asks for; otherwise computed from the
  training split and saved there (replacing a mismatched file).

  Args:
    run: a :class:`jaxdef.restored.Restored` (workdir, step, config, model,
      weights); nothing is restored or loaded here.
    nip: the ``nip`` config section.
    data: the run's data (:class:`jaxdef.data.EvalData`: ``num_train``,
      ``train_examples``); its training split is only read when the
      statistics are computed.
    progress: a progress bar while computing.
  """
  check_nip_config(nip)
  layer = default_layer(run.config.model.name) if nip.layer == "auto" else nip.layer
  path = statistics_path(run.workdir, run.step)
  expect = {"layer": layer, "step": run.step, "weights": run.weights,
            "num_train_examples": int(nip.num_train_examples)}
  if os.path.exists(path):
    try:
      return load_statistics(path, expect)
    except ConfigError as e:
      print(f"recomputing NIP statistics: {e}")
  x_train, y_train = data.train_examples(spread_indices(data.num_train,
                                                        int(nip.num_train_examples)))
  stats = influence_statistics(apply_fn(run.model, dict(run.variables), train=False),
                               x_train, y_train, layer=layer,
                               num_classes=int(run.meta.num_classes), step=run.step,
                               weights=run.weights,
                               num_train_examples=int(nip.num_train_examples),
                               batch_size=int(nip.batch_size), progress=progress)
  save_statistics(path, stats)
  return stats


@register_transform("nip")
def make_nip(*, run: Any, config: ml_collections.ConfigDict, data: Any) -> TestTimeTransform:
  """``eval.transform = 'nip'``: the deployed pipeline ``classifier(NIP(x))`` of the
  restored checkpoint ``run``, with statistics from :func:`ensure_statistics`
  (``config.nip``; computed on ``data``'s training split when not saved yet)."""
  nip = nip_section(config)
  stats = ensure_statistics(run, nip, data)
  info = {**stats.identity(), "train_examples": stats.train_examples,
          "correct_train_examples": int(stats.counts.sum()),
          **{k: nip[k] for k in ("front", "tail", "eta", "steps", "class_conditional",
                                 "top_classes")}}
  return TestTimeTransform(
      classifier=run.logits,
      transform=nip_transform(run.model, run.variables, stats, nip), info=info,
      oracle=nip_oracle(run.model, run.variables, stats.layer, nip))
