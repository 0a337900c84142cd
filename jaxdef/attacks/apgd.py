"""Auto-PGD: APGD-CE, APGD-DLR and APGD-T (Croce & Hein, ICML 2020, sec. 3).

APGD is PGD with a budget-aware step size: it starts at 2 eps, takes a
momentum step (alpha = 0.75, eq. 2), and at checkpoints (sec. 3.2) halves the
step and restarts from the best point found when the loss rose in at most a
fraction ``rho`` of the steps since the last checkpoint, or when the best loss
did not improve and the step was not just halved (conditions 1 and 2). It is a
different algorithm from :func:`jaxdef.attacks.pgd.perturb` and so has its own
``lax.fori_loop``; it reuses that module's projection and ascent direction.

Checkpoint schedule, start point and bookkeeping follow the authors' reference
implementation: first check after ``int(0.22 n)`` steps, each later window
``int(0.03 n)`` shorter down to ``int(0.06 n)``; the start is ``x + eps *
t / ||t||`` (t uniform in [-1, 1]^d for L-inf, Gaussian for L2); a fooled
example reports the last iterate that fooled the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef.attacks import losses
from jaxdef.attacks.common import (Best, KeyedLogitsFn, attack_from_clean, eot_value_and_grad,
                                   example_ids, lp_norm, per_example, repeat, run_on_robust,
                                   select, target_ranks, with_flag_slots)
from jaxdef.attacks.eager import compiles_itself
from jaxdef.attacks.indicators import Trace, failure_indicators, gradient_state
from jaxdef.attacks.pgd import ascent_direction, check_budget, project
from jaxdef.errors import ConfigError, unknown_name

Array = jax.Array
# objective(x_adv, key) -> (loss to maximise (N,), fooled (N,) bool)
Objective = Callable[[Array, Array], tuple[Array, Array]]

APGD_LOSSES = ("ce", "dlr")


def checkpoints(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Which iterations are APGD checkpoints, and the window length at each.

  Returns two (steps,) arrays: ``is_check[i]`` and ``window[i]`` (the number
  of steps since the previous checkpoint, 0 where ``i`` is not one).
  """
  window_len = max(int(0.22 * steps), 1)
  min_len = max(int(0.06 * steps), 1)
  shrink = max(int(0.03 * steps), 1)
  is_check = np.zeros(steps, bool)
  window = np.zeros(steps, np.int32)
  since = 0
  for i in range(steps):
    since += 1
    if since == window_len:
      is_check[i], window[i] = True, window_len
      window_len, since = max(window_len - shrink, min_len), 0
  return is_check, window


def _start(key: Array, x: Array, ids: Array, eps: float, norm: str) -> Array:
  """A random point on the eps-sphere around ``x``, clipped to [0, 1] (drawn per example)."""
  if norm == "linf":
    draw = lambda k, shape: jax.random.uniform(k, shape, x.dtype, -1.0, 1.0)
  else:
    draw = lambda k, shape: jax.random.normal(k, shape, x.dtype)
  t = per_example(draw, key, ids, x.shape[1:])
  scale = eps / (lp_norm(t, norm) + 1e-12)
  return jnp.clip(x + t * scale[:, None, None, None], 0.0, 1.0)


def _loss_and_grad(objective: Objective, z: Array, key: Array, eot_iter: int):
  """(loss, fooled, gradient) at ``z``; the gradient averaged over ``eot_iter`` draws (EOT)."""
  def total(z, k):
    loss, fooled = objective(z, k)
    return jnp.sum(loss), (loss, fooled)

  (_, (loss, fooled)), g = eot_value_and_grad(total, z, key, eot_iter)
  return loss, fooled, g


def apgd_run(objective: Objective, x: Array, *, key: Array, eps: float, norm: str,
             steps: int, rho: float = 0.75, momentum: float = 0.75,
             eot_iter: int = 1, ids: Optional[Array] = None, record: bool = False) -> Best:
  """One APGD run (Croce & Hein 2020, Algorithm 1) maximising ``objective``.

  Args:
    objective: ``(x_adv, key) -> (loss (N,), fooled (N,))``.
    x: clean images (N, H, W, C) in [0, 1].
    key: randomness of the start point (and of a randomized model).
    eps, norm, steps: the budget.
    rho: checkpoint threshold on the fraction of steps that raised the loss.
    momentum: weight of the new step in eq. (2) (the previous step gets
      ``1 - momentum``); the first step has none.
    eot_iter: gradient samples averaged per step (Expectation over
      Transformation, for randomized models).
    ids: (N,) which example each row is (default ``0 .. N-1``): the start
      point is drawn per example (:func:`jaxdef.attacks.common.per_example`).
    record: also return the indicators of attack failure of this run in
      ``Best.flags`` (:mod:`jaxdef.attacks.indicators`), read from what the
      loop already has (the loss history) and two reductions of each
      gradient. APGD returns its best iterate, so its curve is the best loss
      so far: "incomplete optimisation" means the best was still rising at
      the end; "silent success" and "non-converging attack" cannot fire (a
      fooling or the best iterate is what it returns).

  Returns:
    :class:`Best`: the last iterate that fooled the model where one did, else
    the highest-loss iterate; whether it fooled; the highest loss.
  """
  x = jax.lax.stop_gradient(x)
  is_check, window = (jnp.asarray(a) for a in checkpoints(steps))
  k_start, k_grad = jax.random.split(key)
  x0 = _start(k_start, x, example_ids(x.shape[0], ids), eps, norm)
  loss0, fooled0, grad0 = _loss_and_grad(objective, x0, jax.random.fold_in(k_grad, 0), eot_iter)
  n = x.shape[0]
  init = dict(
      x_adv=x0, x_prev=x0, grad=grad0, step=jnp.full((n, 1, 1, 1), 2.0 * eps, x.dtype),
      x_best=x0, grad_best=grad0, loss_best=loss0, x_fool=x0, fooled=fooled0,
      history=jnp.zeros((steps, n), jnp.float32), loss_at_check=loss0,
      halved_at_check=jnp.ones(n, bool))
  if record:
    init["zero"], init["nonfinite"] = gradient_state(grad0)
  age = jnp.arange(steps)[:, None]

  def iteration(i, c):
    a = jnp.where(i > 0, momentum, 1.0)
    z = project(c["x_adv"] + c["step"] * ascent_direction(c["grad"], norm), x, eps, norm)
    x_new = project(c["x_adv"] + a * (z - c["x_adv"]) + (1.0 - a) * (c["x_adv"] - c["x_prev"]),
                    x, eps, norm)
    loss, fooled, grad = _loss_and_grad(objective, x_new, jax.random.fold_in(k_grad, i + 1),
                                        eot_iter)
    improved = loss > c["loss_best"]
    x_best = select(improved, x_new, c["x_best"])
    grad_best = select(improved, grad, c["grad_best"])
    loss_best = jnp.where(improved, loss, c["loss_best"])
    history = c["history"].at[i].set(loss)

    # Checkpoint: condition 1 counts loss increases in the window (the first
    # window compares step 0 with the zero-initialised history, as the
    # reference does); condition 2 is "no progress and not just halved".
    rises = history > jnp.roll(history, 1, axis=0)
    in_window = (age <= i) & (age > i - window[i])
    n_rises = jnp.sum(rises & in_window, axis=0)
    halve = (n_rises <= window[i] * rho) | (~c["halved_at_check"] & (c["loss_at_check"] >= loss_best))
    check = is_check[i]
    restart = check & halve
    recorded = {}
    if record:
      g_zero, g_nonfinite = gradient_state(grad)
      recorded = dict(zero=c["zero"] & g_zero, nonfinite=c["nonfinite"] | g_nonfinite)
    return dict(**recorded,
        x_adv=select(restart, x_best, x_new), x_prev=c["x_adv"],
        grad=select(restart, grad_best, grad),
        step=jnp.where(restart[:, None, None, None], c["step"] / 2.0, c["step"]),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_fool=select(fooled, x_new, c["x_fool"]), fooled=c["fooled"] | fooled,
        history=history, loss_at_check=jnp.where(check, loss_best, c["loss_at_check"]),
        halved_at_check=jnp.where(check, halve, c["halved_at_check"]))

  c = jax.lax.fori_loop(0, steps, iteration, init)
  x_out = select(c["fooled"], c["x_fool"], c["x_best"])
  flags = None
  if record:
    curve = jax.lax.cummax(jnp.concatenate([loss0[None].astype(jnp.float32), c["history"]]),
                           axis=0)
    flags = failure_indicators(Trace(losses=curve, fooled_any=c["fooled"],
                                     fooled_last=c["fooled"], zero_gradient=c["zero"],
                                     nonfinite_gradient=c["nonfinite"]))
  return Best(jax.lax.stop_gradient(x_out), c["fooled"], c["loss_best"], flags)


def _check(eps: float, norm: str, steps: int, restarts: int) -> None:
  check_budget(eps=eps, step_size=eps, steps=steps, norm=norm)
  if int(restarts) != restarts or restarts < 1:
    raise ConfigError(f"attack restarts must be a positive integer, got {restarts}")


def apgd_update(best: Best, model: KeyedLogitsFn, x: Array, y: Array, *, key: Array,
                eps: float, norm: str = "linf", steps: int = 100, loss: str = "ce",
                restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
                eot_iter: int = 1, chunks: int = 1, ids: Optional[Array] = None,
                record: bool = False) -> Best:
  """Refines ``best`` with untargeted APGD on the examples it has not fooled yet
  (``ids``: which example each row is; ``record``: the indicators of attack
  failure of every run, OR-ed into ``best.flags``; see :func:`apgd_run`)."""
  _check(eps, norm, steps, restarts)
  if loss not in APGD_LOSSES:
    raise unknown_name("APGD loss", loss, APGD_LOSSES)
  loss_fn = losses.named_loss(loss)

  def attack(batch, k):
    xb, yb, ib = batch

    def objective(z, kk):
      logits = model(z, kk)
      return loss_fn(logits, yb), jnp.argmax(logits, -1) != yb

    return apgd_run(objective, xb, key=k, eps=eps, norm=norm, steps=steps, rho=rho,
                    momentum=momentum, eot_iter=eot_iter, ids=ib, record=record)

  batch = (x, y, example_ids(x.shape[0], ids))
  best = with_flag_slots(best) if record else best

  def restart(r, b):
    return run_on_robust(attack, batch, b, jax.random.fold_in(key, r), chunks)

  return repeat(restarts, restart, best)


def apgd_t_update(best: Best, model: KeyedLogitsFn, x: Array, y: Array, *, key: Array,
                  eps: float, norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
                  restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
                  eot_iter: int = 1, chunks: int = 1, ids: Optional[Array] = None,
                  record: bool = False) -> Best:
  """Refines ``best`` with APGD-T: targeted DLR towards each of the classes
  ranked 2nd .. (n_target_classes+1)-th on the clean input, in that order
  (``record``: as :func:`apgd_update`)."""
  _check(eps, norm, steps, restarts)
  k_clean, key = jax.random.split(key)
  logits = model(x, k_clean)
  num_classes = logits.shape[-1]
  if num_classes < 4:
    raise ConfigError(f"APGD-T's targeted DLR loss needs at least 4 classes, got {num_classes}")
  n_targets = min(n_target_classes, num_classes - 1)
  ranks = target_ranks(jax.lax.stop_gradient(logits), n_targets)

  def attack(batch, k):
    xb, yb, tb, ib = batch

    def objective(z, kk):
      logits = model(z, kk)
      return losses.dlr_targeted_loss(logits, yb, tb), jnp.argmax(logits, -1) != yb

    return apgd_run(objective, xb, key=k, eps=eps, norm=norm, steps=steps, rho=rho,
                    momentum=momentum, eot_iter=eot_iter, ids=ib, record=record)

  ids = example_ids(x.shape[0], ids)
  best = with_flag_slots(best) if record else best

  def run(j, b):
    target = jax.lax.dynamic_index_in_dim(ranks, j // restarts, axis=1, keepdims=False)
    return run_on_robust(attack, (x, y, target, ids), b, jax.random.fold_in(key, j), chunks)

  return repeat(n_targets * restarts, run, best)


@compiles_itself
def apgd(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
         norm: str = "linf", steps: int = 100, loss: str = "ce", restarts: int = 1,
         rho: float = 0.75, momentum: float = 0.75, eot_iter: int = 1,
         randomized: bool = False, chunks: int = 1) -> Array:
  """APGD-CE (``loss='ce'``) or APGD-DLR (``loss='dlr'``), Croce & Hein 2020.

  Each restart attacks only the examples not fooled by earlier ones. An
  example the model misclassifies on ``x`` is returned as ``x``; one never
  fooled gets its highest-loss iterate.

  Args:
    logits_fn: ``x -> logits``, or ``(x, key) -> logits`` if ``randomized``.
    x: (N, H, W, C) images in [0, 1]; y: (N,) labels.
    key: all randomness; the result is a deterministic function of it.
    eps, norm, steps, restarts: the budget ('linf' or 'l2').
    rho, momentum: APGD's checkpoint threshold and momentum (0.75 each).
    eot_iter: gradient samples per step (EOT, for randomized models).
    chunks: see :func:`jaxdef.attacks.common.run_on_robust`.

  Returns:
    ``x_adv`` (N, H, W, C) within the eps-ball of ``x`` and in [0, 1].
  """
  return attack_from_clean(apgd_update, logits_fn, x, y, key=key, randomized=randomized,
                           eps=eps, norm=norm, steps=steps, loss=loss, restarts=restarts,
                           rho=rho, momentum=momentum, eot_iter=eot_iter, chunks=chunks)


@compiles_itself
def apgd_t(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
           norm: str = "linf", steps: int = 100, n_target_classes: int = 9,
           restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
           eot_iter: int = 1, randomized: bool = False, chunks: int = 1) -> Array:
  """APGD-T: APGD on the targeted DLR loss over the top ``n_target_classes``
  other classes (Croce & Hein 2020, sec. 3.3 and 4); arguments as :func:`apgd`."""
  return attack_from_clean(apgd_t_update, logits_fn, x, y, key=key, randomized=randomized,
                           eps=eps, norm=norm, steps=steps, n_target_classes=n_target_classes,
                           restarts=restarts, rho=rho, momentum=momentum, eot_iter=eot_iter,
                           chunks=chunks)
