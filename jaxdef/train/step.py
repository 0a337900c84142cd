"""The adversarial training step and the evaluation step, as pure functions.

``make_train_step`` returns ``train_step(state, images, labels) ->
(state, metrics)``: augmentation, the PGD inner loop (``attacks.perturb``, a
``lax.fori_loop`` differentiating with respect to the input only) and one
optimizer update. A defense may replace the generator, make several updates
per batch and add loss terms that call the model (``Defense.generate``,
``updates_per_batch``, ``objective_weight``, ``model_loss``); left at their
defaults the step is exactly PGD training. The loop in :mod:`jaxdef.train.loop`
jits it once over the device mesh with the batch sharded on ``data`` and the
state replicated and donated; BatchNorm statistics in the update are then
over the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdef import attacks
from jaxdef.attacks.conv_layout import canonical_input_gradients
from jaxdef.attacks.losses import dominant_label
from jaxdef.attacks.pgd import ADAM_BOUNDARIES, ADAM_LR, ADAM_SCALES, NORMAL_INIT_SIGMA
from jaxdef.config import BN_UPDATES
from jaxdef.data.augment import augment_batch, to_float
from jaxdef.data.cutmix import cutmix_batch
from jaxdef.defenses.base import Defense, apply_fn
from jaxdef.errors import ConfigError, unknown_name
from jaxdef.models.base import precast_params
from jaxdef.objectives.base import Objective, check_soft_labels
from jaxdef.train.state import TrainState, ema_update, stop_frozen_gradients
from jaxdef.train import free as free_lib
from jaxdef.train import awp as awp_lib

Array = jax.Array
ATTACK_BN = ("eval", "train_no_update")
# Independent random streams derived from the run's seed.
INIT_STREAM, TRAIN_STREAM, EVAL_STREAM = 0, 1, 2


def stream_key(seed: int, stream: int, *counters: Array) -> Array:
  """``fold_in(key(seed), stream)`` then each counter: made inside ``jit``, so no
  key array crosses hosts (only the seed and small integers do)."""
  key = jax.random.fold_in(jax.random.key(seed), stream)
  for c in counters:
    key = jax.random.fold_in(key, c)
  return key


@dataclasses.dataclass(frozen=True)
class AttackBudget:
  """The training attack (docs/methods.md section 0): PGD, L-inf by default."""
  eps: float
  step_size: float
  steps: int
  norm: str = "linf"
  bn: str = "eval"
  warmup_steps: int = 0
  unroll: Optional[int] = None
  # The start: '' takes the objective's own (``Objective.attack_init``);
  # 'normal' starts from x + init_sigma N(0, 1) (:func:`jaxdef.attacks.pgd.random_init`).
  init: str = ""
  init_sigma: float = NORMAL_INIT_SIGMA
  # The uniform start's radius in units of eps, and whether iterates are projected
  # onto the eps-ball: FGSM-RS is steps=1, step_size=1.25 eps; N-FGSM steps=1,
  # step_size=eps, init_scale=2, project_eps=False (jaxdef.attacks.pgd).
  init_scale: float = 1.0
  project_eps: bool = True
  # How iterates move: 'steepest' (sign steps of step_size for L-inf) or 'adam'
  # (the DeepMind recipe: Adam at adam_lr, times each scale from its boundary step
  # on; jaxdef.attacks.pgd.adam_ascent, step_size unused).
  step_rule: str = "steepest"
  adam_lr: float = ADAM_LR
  adam_boundaries: tuple = ADAM_BOUNDARIES
  adam_scales: tuple = ADAM_SCALES

  def at_step(self, step: Array) -> tuple[Array, Array]:
    """(eps, step_size) at a training step: both ramp linearly from 0 over
    ``warmup_steps`` (the usual MNIST eps-0.3 schedule; 0 = no ramp)."""
    if self.warmup_steps <= 0:
      return jnp.float32(self.eps), jnp.float32(self.step_size)
    scale = jnp.minimum(1.0, (step + 1.0) / self.warmup_steps)
    return self.eps * scale, self.step_size * scale


# ``(x, perturbations=None) -> ModelOutput`` with fixed weights; in training mode
# BatchNorm uses batch statistics and discards the running-statistics update
# (the attack's 'train_no_update' mode; the weight update threads statistics
# itself). Defined beside the Defense hooks that receive such functions.
model_fn = apply_fn


def rng_streams(key: Array, names: tuple[str, ...]) -> dict[str, Array]:
  """One key per Flax RNG stream the model's defense modules draw from."""
  return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def adversarial_examples(forward: Callable[[Array], dict], x: Array, y: Array, key: Array, *,
                         objective: Objective, defense: Defense, budget: AttackBudget,
                         step: Array) -> Array:
  """The inner maximisation: PGD on the objective's inner loss + the defense's term.

  The attack differentiates the model with its convolutions' input gradients
  in the layout XLA:CPU runs fast (:mod:`jaxdef.attacks.conv_layout`; same
  values): without it a one-step attack (FGSM-RS, N-FGSM) made the whole
  train step about 2x slower on CPU than a two-step one.
  """
  out_clean = jax.lax.stop_gradient(forward(x))
  attacked = canonical_input_gradients(forward)

  def loss(z):
    out = attacked(z)
    return (objective.inner_loss(out["logits"], out_clean["logits"], y)
            + defense.attack_term(out_clean, out, y))

  eps, step_size = budget.at_step(step)
  return attacks.perturb(loss, x, key=key, eps=eps, step_size=step_size, steps=budget.steps,
                         norm=budget.norm, init=budget.init or objective.attack_init,
                         init_sigma=budget.init_sigma, init_scale=budget.init_scale,
                         project_eps=budget.project_eps, unroll=budget.unroll,
                         step_rule=budget.step_rule, adam_lr=budget.adam_lr,
                         adam_boundaries=budget.adam_boundaries, adam_scales=budget.adam_scales)


def _num_classes(model: nn.Module, state: TrainState, x: Array) -> int:
  """The model's number of logits, read from its output shape (nothing is computed)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return jax.eval_shape(lambda v, z: model.apply(v, z, train=False), variables,
                        x)["logits"].shape[-1]


def _with_counts_of(opt_state, source):
  """``opt_state`` with every ``count`` field (optax's schedule step counters)
  taken from ``source``: how several updates on one batch share its learning rate."""
  def pick(path, new, old):
    return old if getattr(path[-1], "name", None) == "count" else new
  return jax.tree_util.tree_map_with_path(pick, opt_state, source)


def _mean_metrics(history: list[dict]) -> dict:
  """Metrics of several updates on one batch: averages; finite if all were."""
  merged = jax.tree.map(lambda *v: jnp.mean(jnp.stack(v).astype(jnp.float32)), *history)
  merged["finite"] = jnp.all(jnp.stack([m["finite"] for m in history]))
  return merged


def adversarial_loss(params, x_adv: Array, *, model: nn.Module,
                     objective: Objective, defense: Defense, batch_stats, x: Array,
                     labels: Array, rngs: dict, smoothing, trainable: str, needs_clean: bool,
                     bn_update: str):
  """``(mean loss, (adversarial logits, new batch statistics))`` of one
  update at ``params``: the clean pass when ``needs_clean`` (its statistics
  kept when ``bn_update`` is 'both'), the adversarial pass on ``x_adv``, the
  objective's outer loss weighted by the defense, its loss term and its
  model loss. Frozen parameters (``trainable``) are held constant."""
  params = stop_frozen_gradients(params, trainable)
  stats = batch_stats

  def run(inputs, stats):
    out, new = model.apply({"params": params, "batch_stats": stats}, inputs, train=True,
                           labels=labels, rngs=rngs, mutable=["batch_stats"])
    return out, new.get("batch_stats", stats)

  out_clean = None
  if needs_clean:
    out_clean, clean_stats = run(x, stats)
    stats = clean_stats if bn_update == "both" else stats
  out_adv, stats = run(x_adv, stats)
  per_example = (defense.objective_weight
                 * objective.outer_loss(out_clean, out_adv, labels, smoothing)
                 + defense.loss_term(out_clean, out_adv, labels))
  if defense.model_loss is not None:
    apply = model_fn(model, {"params": params, "batch_stats": batch_stats}, train=True,
                     labels=labels, rngs=rngs)
    per_example = per_example + defense.model_loss(apply, x, x_adv, labels)
  return jnp.mean(per_example), (out_adv["logits"], stats)


def applied(state: TrainState, tx: optax.GradientTransformation, grads, params_at,
            loss: Array, *, batch_stats, free_delta, awp_undo, ema_decay: float,
            ema_warmup_steps: float) -> tuple[TrainState, dict]:
  """``(state after the update, {'grad_norm', 'finite'})``: the optimizer's
  step from ``params_at`` along ``grads``, AWP's perturbation taken back
  (``awp_undo``: ``(v, gamma)`` or None), the EMA moved, the new statistics
  and Free perturbation kept. A non-finite ``loss`` or gradient leaves
  ``state`` as it was (no checkpoint can hold NaN; the host decides whether
  to stop or go on, ``train.on_nonfinite``)."""
  updates, opt_state = tx.update(grads, state.opt_state, params_at)
  params = optax.apply_updates(params_at, updates)
  if awp_undo is not None:
    params = awp_lib.restore(params, *awp_undo)
  if ema_decay > 0:
    ema_params = ema_update(state.ema_params, params, ema_decay, state.step, ema_warmup_steps)
    ema_stats = ema_update(state.ema_batch_stats, batch_stats, ema_decay, state.step,
                           ema_warmup_steps)
  else:
    ema_params, ema_stats = params, batch_stats
  updated = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                          ema_params=ema_params, ema_batch_stats=ema_stats,
                          free_delta=free_delta)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return (jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state),
          {"grad_norm": grad_norm, "finite": finite})


def make_train_step(*, model: nn.Module, tx: optax.GradientTransformation,
                    objective: Objective, defense: Defense, budget: AttackBudget,
                    augment: str, ema_decay: float, seed: int, trainable: str = "",
                    label_smoothing: Optional[np.ndarray] = None, free_replays: int = 1,
                    cast_params_once: bool = False,
                    ema_warmup_steps: float = 0.0,
                    awp: Optional[awp_lib.WeightPerturbation] = None,
                    cutmix: bool = False, bn_update: str = "both") -> Callable:
  """Builds ``train_step(state, images_uint8, labels) -> (state, metrics)``.

  Randomness is ``stream_key(seed, TRAIN_STREAM, state.step)``, so a resumed
  run repeats the
  uninterrupted one exactly. A step whose loss or gradient is not finite
  leaves the weights, optimizer and EMA unchanged (only ``step`` advances) and
  reports ``metrics["finite"] = False``. The clean forward pass runs only when the
  objective or the defense needs it (TRADES, MART, ...); then the clean and
  adversarial passes run one after the other, by default each updating
  BatchNorm statistics, as the reference PyTorch codes do (``bn_update``,
  below). ``defense.updates_per_batch``
  updates are made per batch by the chaining rule of
  :class:`jaxdef.defenses.base.Defense`. Parameters that ``trainable``
  (``train.trainable``, the optimizer's pattern) leaves frozen are held
  constant inside the loss, so their gradients are not computed.
  ``label_smoothing`` (None, (global batch,) floats fixed for every step, or
  one float for every row) smooths the label of each row of the batch in the
  objective's CE term: ``train.label_smoothing`` on every row, composed with
  ``data.extra_label_smoothing`` on the extra data's rows of a mixed batch
  (:meth:`jaxdef.data.mixing.BatchPlan.label_smoothing`).
  The EMA (``ema_decay`` > 0) follows :func:`jaxdef.train.state.ema_decay_at`:
  it copies the weights for the first ``ema_warmup_steps`` steps.
  ``free_replays`` > 1: Free-m (:mod:`jaxdef.train.free`): no separate attack;
  each batch is replayed that many times (a ``lax.scan``), each replay one
  forward-backward pass at ``state.free_delta`` that makes one optimizer
  update (the schedule counts every one) and one ascent step of the
  perturbation; metrics are averaged over the replays.
  ``cast_params_once``: the attack reads the weights already cast to the
  model's compute dtype, cast once per update outside its loop
  (:func:`jaxdef.models.base.precast_params`; same values, fewer casts).
  ``awp`` (gamma > 0): Adversarial Weight Perturbation (:mod:`jaxdef.train.awp`)
  around each update; None or gamma 0 leaves the step as it is.

  BatchNorm statistics (``bn_update``, ``train.bn_update``): 'both' updates
  the running statistics with the clean pass and then the adversarial one
  (DM-Improves-AT, Wang et al. 2023); 'adversarial' only with the
  adversarial pass, the clean pass normalising with its batch's statistics
  without keeping them (the DeepMind JAX code, Gowal et al. 2020). Without a
  clean pass (AT) both are the same. The attack's side is ``budget.bn``
  (``attack.bn``): 'eval' attacks with the running statistics, 'train_no_update'
  with the batch's statistics and keeps nothing (both reference codes).
  ``cutmix`` (``data.cutmix``): after augmentation every batch is mixed by
  :func:`jaxdef.data.cutmix.cutmix_batch` (its key derived from the step's
  augmentation key); labels become (N, K) target distributions, smoothed by
  ``label_smoothing`` before the mix, which the objective's losses, its
  attack included, take as they are (:func:`jaxdef.objectives.base.check_soft_labels`);
  ``adv_acc`` is then against each row's dominant label.
  """
  awp = awp if awp is not None and awp.gamma > 0 else None
  free = free_replays > 1
  if budget.bn not in ATTACK_BN:
    raise unknown_name("attack_bn", budget.bn, ATTACK_BN)
  n_updates = defense.updates_per_batch
  if int(n_updates) != n_updates or n_updates < 1:
    raise ConfigError(f"defense {defense.name!r}: updates_per_batch must be a positive "
                      f"integer, got {n_updates}")
  needs_clean = objective.needs_clean_pass or defense.needs_clean_pass
  # A numpy array: a constant of the traced program (no device array captured).
  smoothing = None if label_smoothing is None else np.asarray(label_smoothing, np.float32)
  if bn_update not in BN_UPDATES:
    raise unknown_name("train.bn_update", bn_update, BN_UPDATES)
  mix_smoothing = None
  if cutmix:  # the smoothing goes into the mixed targets
    check_soft_labels(objective, defense.name, "data.cutmix=True (CutMix)")
    mix_smoothing, smoothing = smoothing, None

  def pgd_generator(forward, x, y, key, budget, step, x_start):
    return adversarial_examples(forward, x, y, key, objective=objective, defense=defense,
                                budget=budget, step=step)

  generate = defense.generate or pgd_generator
  if free:  # Free-m: the replay's own pass perturbs the batch (free_lib.replay)
    generate = lambda forward, x, *_: x

  def update(state: TrainState, x: Array, x_start: Array, labels: Array, key: Array,
             rngs: dict):
    """One optimizer update on the batch; ``state.step`` is left as it is."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward_of = lambda v: model_fn(model, v, train=budget.bn == "train_no_update",
                                    labels=labels, rngs=rngs)
    if cast_params_once:
      variables = precast_params(lambda v: forward_of(v)(x), variables)
    forward = forward_of(variables)
    x_adv = jax.lax.stop_gradient(generate(forward, x, labels, key, budget, state.step,
                                            x_start))
    # AWP: loss, gradient and optimizer update at theta + gamma v (v from x_adv), then - gamma v.
    v = None if awp is None else awp_lib.weight_perturbation(awp_lib.objective_loss(
        model, objective, batch_stats=state.batch_stats, x=x, x_adv=x_adv, labels=labels,
        rngs=rngs, smoothing=smoothing, trainable=trainable), state.params, state.step, awp)
    params_at = state.params if v is None else awp_lib.perturb(state.params, v, awp.gamma)

    loss_fn = functools.partial(  # (params, x_adv): a Free replay passes its own point
        adversarial_loss, model=model, objective=objective, defense=defense,
        batch_stats=state.batch_stats, x=x, labels=labels, rngs=rngs, smoothing=smoothing,
        trainable=trainable, needs_clean=needs_clean, bn_update=bn_update)

    free_delta = state.free_delta
    if free:  # one pass: the weights' gradient and the persistent perturbation's step
      eps, step_size = budget.at_step(state.step)
      (loss, (logits_adv, batch_stats)), grads, x_adv, free_delta = free_lib.replay(
          loss_fn, params_at, x, free_delta, eps=eps, step_size=step_size, norm=budget.norm)
    else:
      (loss, (logits_adv, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params_at, x_adv)
    new_state, checks = applied(
        state, tx, grads, params_at, loss, batch_stats=batch_stats, free_delta=free_delta,
        awp_undo=None if v is None else (v, awp.gamma), ema_decay=ema_decay,
        ema_warmup_steps=ema_warmup_steps)
    metrics = {"loss": loss,
               "adv_acc": jnp.mean(jnp.argmax(logits_adv, -1) == dominant_label(labels)),
               **checks}
    return new_state, x_adv, metrics

  def train_step(state: TrainState, images: Array, labels: Array):
    key = stream_key(seed, TRAIN_STREAM, state.step)
    k_aug, k_attack, k_model = jax.random.split(key, 3)
    rngs = rng_streams(k_model, defense.rng_collections)
    x = augment_batch(k_aug, to_float(images), augment)
    if cutmix:
      x, labels = cutmix_batch(jax.random.fold_in(k_aug, 1), x, labels,
                               _num_classes(model, state, x), mix_smoothing)
    if free:  # Free-m: m updates on the batch, each with its own learning rate
      def replay(s, u):
        rngs_u = rng_streams(jax.random.fold_in(k_model, u), defense.rng_collections)
        s, _, metrics = update(s, x, x, labels, k_attack, rngs_u)
        return s, metrics
      new_state, history = free_lib.replay_batch(replay, state, free_replays, budget.unroll)
      return new_state.replace(step=state.step + 1), _mean_metrics(history)
    new_state, x_adv, history = state, x, []
    for u in range(n_updates):
      k_u = k_attack if u == 0 else jax.random.fold_in(k_attack, u)
      before = new_state.opt_state
      new_state, x_adv, metrics = update(new_state, x, x_adv, labels, k_u, rngs)
      if u < n_updates - 1:  # the learning-rate schedule counts batches, not updates
        new_state = new_state.replace(opt_state=_with_counts_of(new_state.opt_state, before))
      history.append(metrics)
    metrics = history[0] if n_updates == 1 else _mean_metrics(history)
    return new_state.replace(step=state.step + 1), metrics

  return train_step


# ``train.eval_pgd_loss`` -> the arguments of :func:`jaxdef.attacks.pgd` that name it.
# 'margin' is the C&W margin capped at 0, min(max_{k != y} z_k - z_y, 0): the
# CWLoss (confidence 0) of Wang et al. 2023's checkpoint attack (DM-Improves-AT,
# watrain.py: PGD-40 on it, from a uniform start, on the averaged model).
EVAL_PGD_LOSSES = {"ce": dict(loss="ce"), "margin": dict(loss="cw", kappa=0.0)}


def make_eval_step(*, model: nn.Module, eps: float, step_size: float, steps: int,
                   norm: str = "linf", use_ema: bool = True, seed: int = 0,
                   unroll: Optional[int | bool] = None, random_start: bool = True,
                   cast_params_once: bool = False,
                   joint_loss: Optional[Callable[..., Array]] = None,
                   loss: str = "ce") -> Callable:
  """Builds ``eval_step(state, images_uint8, labels, mask, step, batch) -> counts``.

  The PGD start is drawn from ``stream_key(seed, EVAL_STREAM, step, batch)``.

  Counts correct clean predictions and correct predictions under PGD-``steps``
  among the examples where ``mask`` is True. A robust example must be correct
  on both. The model is ``state``'s EMA weights and statistics when
  ``use_ema`` (the loop sets it when ``train.ema_decay`` > 0), else its live
  ones. The attack ascends ``loss`` (:data:`EVAL_PGD_LOSSES`: 'ce' or
  'margin') on the final logits, or with ``joint_loss``
  (a defense's ``joint_attack_loss``, ``(ModelOutput, y) -> (N,)``) the final
  and auxiliary heads' losses together; it starts from a uniform point of the
  eps-ball (``random_start``) or from the clean image. ``unroll``: the PGD
  loop's unrolling (:func:`jaxdef.attacks.pgd.loop_unroll`; None: by backend).
  ``cast_params_once``: as in :func:`make_train_step`.
  """
  if loss not in EVAL_PGD_LOSSES:
    raise unknown_name("train.eval_pgd_loss", loss, EVAL_PGD_LOSSES)
  named_loss = EVAL_PGD_LOSSES[loss]

  def eval_step(state: TrainState, images: Array, labels: Array, mask: Array, step: Array,
                batch: Array):
    key = stream_key(seed, EVAL_STREAM, step, batch)
    variables = state.eval_variables(use_ema)
    x = to_float(images)
    if cast_params_once:
      variables = precast_params(lambda v: model.apply(v, x, train=False), variables)
    outputs = lambda z: model.apply(variables, z, train=False)
    logits_fn = lambda z: outputs(z)["logits"]
    clean_ok = jnp.argmax(logits_fn(x), -1) == labels
    joint = {} if joint_loss is None else dict(
        loss_fn=lambda z, k: joint_loss(outputs(z), labels))
    x_adv = attacks.pgd(logits_fn, x, labels, key=key, eps=eps, step_size=step_size,
                        steps=steps, norm=norm, unroll=unroll, random_start=random_start,
                        **named_loss, **joint)
    adv_ok = clean_ok & (jnp.argmax(logits_fn(x_adv), -1) == labels)
    return {"clean": jnp.sum(clean_ok & mask), "pgd": jnp.sum(adv_ok & mask),
            "count": jnp.sum(mask)}

  return eval_step
