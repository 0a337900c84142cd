"""The one projected-gradient loop of jaxdef (Madry et al. 2018).

:func:`perturb` is the only iterative first-order attack loop in the project:
adversarial training (every objective and defense), FGSM, PGD, the C&W-inf
margin attack, the least-likely-class attacks, NIP's inverse perturbation and
the adaptive attacks all call it. An attack is built from four parts: a
per-example loss (``loss_fn``), an ascent step (``ascent``: :data:`ASCENTS`;
or ``step_rule='adam'``, :func:`adam_ascent`), a start (``init``:
:func:`random_init`) and a projection (``norm``: :func:`project`; 'none'
keeps only the [0, 1] box). It differentiates with
respect to the input only, runs as a ``lax.fori_loop`` inside whatever
``jit`` calls it (called with concrete arrays it compiles itself,
:mod:`jaxdef.attacks.eager`), and its result is
inside the eps-ball around ``x`` (unless ``project_eps=False``) and always
inside [0, 1].

The single-step training attacks are compositions of the same parts:
FGSM-RS (Wong et al. 2020) is one step of 1.25 eps from a uniform start,
projected; N-FGSM (de Jorge et al. 2022) one step of eps from a uniform start
of twice the radius (``init_scale=2``) with ``project_eps=False``: its
perturbation may reach 3 eps, as in the authors' code (clipped to the image
range only).

The DeepMind recipe (Gowal et al. 2020, Rebuffi et al. 2021; their JAX code,
``adversarial_robustness/jax/attacks.py`` and ``experiment.py``) trains with
an Adam attack instead of sign steps: 10 Adam steps (b1 0.9, b2 0.999, eps
1e-9) on the raw input gradient, learning rate 0.1 for the first 5 steps and
0.01 for the last 5, from U(-eps, eps), every iterate projected onto the
eps-ball and [0, 1]: ``step_rule='adam'`` with the defaults of
:func:`adam_ascent`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxdef.attacks import losses
from jaxdef.attacks.common import attacked_model, eot_value_and_grad
from jaxdef.attacks.eager import check_inputs, compiles_itself
from jaxdef.attacks.indicators import Trace, gradient_state
from jaxdef.errors import ConfigError, unknown_name

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
# Projections: an eps-ball of NORMS, or 'none' (the [0, 1] box only, no budget).
PROJECTIONS = NORMS + ("none",)
INITS = ("uniform", "normal", "half_sign", "none")
# How an iterate moves: 'steepest' (a step of ``step_size`` along the ascent
# direction, :data:`ASCENTS`) or 'adam' (:func:`adam_ascent`).
STEP_RULES = ("steepest", "adam")
# The DeepMind training attack's Adam (experiment.py): lr 0.1, x0.1 from step 5.
ADAM_LR = 0.1
ADAM_BOUNDARIES = (5,)
ADAM_SCALES = (0.1,)
ADAM_EPS = 1e-9


def check_budget(*, eps: float, step_size: float, steps: int, norm: str) -> None:
  """One-line errors for an attack budget that cannot be right.

  ``eps`` and ``step_size`` may be traced (one compiled attack for a whole
  eps curve); their values are then checked by whoever chose them.
  """
  if norm not in NORMS:
    raise unknown_name("norm", norm, NORMS)
  if int(steps) != steps or steps < 1:
    raise ConfigError(f"attack steps must be a positive integer, got {steps}")
  if isinstance(eps, jax.core.Tracer) or isinstance(step_size, jax.core.Tracer):
    return
  if not eps > 0:
    raise ConfigError(f"eps must be > 0, got {eps}")
  if norm == "linf" and eps > 1:
    raise ConfigError(f"L-inf eps is on the [0, 1] pixel scale and must be <= 1, got {eps}")
  if not step_size > 0:
    raise ConfigError(f"attack step_size must be > 0, got {step_size}")


def _l2_norm(v: Array) -> Array:
  """Per-example L2 norm broadcastable against NHWC ``v``."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2, 3), keepdims=True))


def project(x_adv: Array, x: Array, eps: float, norm: str) -> Array:
  """Nearest point to ``x_adv`` in the ``norm`` eps-ball around ``x``, then [0, 1].

  For L2 the ball projection is applied before the box clip; the clip can
  only shorten the perturbation, so the result stays in the ball.
  """
  delta = x_adv - x
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l2":
    delta = delta * jnp.minimum(1.0, eps / (_l2_norm(delta) + 1e-12))
  elif norm != "none":
    raise unknown_name("projection", norm, PROJECTIONS)
  return jnp.clip(x + delta, 0.0, 1.0)


def _rms(v: Array) -> Array:
  """Per-example root mean square broadcastable against NHWC ``v``."""
  return jnp.sqrt(jnp.mean(jnp.square(v), axis=(1, 2, 3), keepdims=True))


# Ascent steps, ``grad -> direction``: 'sign' (steepest ascent of unit L-inf
# norm), 'l2' (unit L2 norm), 'rms' (unit root mean square, NIP's step).
ASCENTS = {
    "sign": jnp.sign,
    "l2": lambda g: g / (_l2_norm(g) + 1e-12),
    "rms": lambda g: g / (_rms(g) + 1e-12),
}


def ascent_direction(grad: Array, norm: str) -> Array:
  """Steepest ascent direction of unit ``norm``: sign(g) or g / ||g||_2."""
  return ASCENTS["sign" if norm == "linf" else "l2"](grad)


def check_adam_schedule(lr: float, boundaries, scales) -> None:
  """One-line errors for an Adam attack's learning-rate schedule: ``lr`` > 0,
  one positive ``scale`` per increasing, positive integer step ``boundary``."""
  if not lr > 0:
    raise ConfigError(f"the Adam attack's learning rate must be > 0, got {lr}")
  boundaries, scales = tuple(boundaries), tuple(scales)
  if len(boundaries) != len(scales):
    raise ConfigError(f"the Adam attack's schedule needs one scale per boundary, got "
                      f"boundaries {boundaries} and scales {scales}")
  if any(int(b) != b or b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
    raise ConfigError(f"the Adam attack's boundaries must be increasing positive step "
                      f"numbers, got {boundaries}")
  if not all(c > 0 for c in scales):
    raise ConfigError(f"the Adam attack's scales must be > 0, got {scales}")


def adam_ascent(lr: float = ADAM_LR, boundaries=ADAM_BOUNDARIES, scales=ADAM_SCALES, *,
                b1: float = 0.9, b2: float = 0.999,
                eps: float = ADAM_EPS) -> optax.GradientTransformation:
  """Adam (Kingma & Ba 2015) on the ascent gradient, as an optax transformation.

  ``update(g, state)`` returns ``lr_t * m_hat / (sqrt(v_hat) + eps)``: added
  to the iterate it ascends the loss (Adam is odd in the gradient, so this is
  the DeepMind code's descent on the negated loss). ``lr_t`` is piecewise
  constant: ``lr`` times every ``scales[i]`` whose ``boundaries[i]`` <= the
  attack step t (counted from 0), optax's ``piecewise_constant_schedule``.
  The moments are per pixel and never see the projection.
  """
  check_adam_schedule(lr, boundaries, scales)
  schedule = optax.piecewise_constant_schedule(
      lr, {int(b): float(c) for b, c in zip(boundaries, scales)})
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.scale_by_schedule(schedule))


# The Gaussian start's scale: TRADES' and MART's reference codes start from
# x + 0.001 N(0, 1).
NORMAL_INIT_SIGMA = 0.001


def random_init(key: Array, x: Array, eps: float, norm: str, init: str,
                sigma: float = NORMAL_INIT_SIGMA, scale: float = 1.0) -> Array:
  """Starting point of the attack.

  'uniform': uniform in the L-inf ball of radius ``scale * eps`` (Madry et
  al.; N-FGSM's noise U(-2 eps, 2 eps) with ``scale=2``), or uniform radius
  in a random L2 direction, clipped to [0, 1]; 'normal': ``x + sigma * N(0, 1)`` clipped to [0, 1]
  (the TRADES and MART start, sigma 0.001; not projected onto the ball, as
  in their codes: the first step's projection does that);
  'half_sign': ``x + eps/2 * sign(N(0, 1))`` (the random step of R+FGSM and
  R+StepLL, Tramer et al. 2018, alpha = eps/2; L-inf); 'none': ``x`` itself.
  """
  if init == "none":
    return x
  if init == "half_sign":
    return project(x + 0.5 * eps * jnp.sign(jax.random.normal(key, x.shape, x.dtype)), x, eps,
                   norm)
  if init == "normal":
    return jnp.clip(x + sigma * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)
  if init != "uniform":
    raise unknown_name("attack init", init, INITS)
  eps = scale * eps
  if norm == "linf":
    delta = jax.random.uniform(key, x.shape, x.dtype, -eps, eps)
  else:
    k_dir, k_rad = jax.random.split(key)
    direction = jax.random.normal(k_dir, x.shape, x.dtype)
    radius = eps * jax.random.uniform(k_rad, (x.shape[0], 1, 1, 1), x.dtype)
    delta = direction / (_l2_norm(direction) + 1e-12) * radius
  return project(x + delta, x, eps, norm)


# Longest loop that "auto" unrolls on CPU: PGD-10 training and PGD-20
# evaluation unroll; PGD-100 would take ~26 s to compile unrolled (small CNN,
# 400 convolutions in the program), so it stays a loop.
MAX_CPU_UNROLL = 20


def loop_unroll(unroll: Optional[int | bool], steps: int) -> int | bool:
  """How far to unroll an attack's ``fori_loop``; None means by backend.

  On XLA:CPU a convolution's input gradient inside a ``while`` body keeps a
  transposed kernel layout and misses the fast convolution path: measured
  14x slower per conv, 4x per PGD step of the small CNN (jaxlib 0.10.2, 2
  cores). Unrolled, the kernel transpose is materialised once and the fast
  path is used. So CPU unrolls loops of up to ``MAX_CPU_UNROLL`` steps
  (compile time grows with the unrolled length); accelerators keep the
  rolled loop (small program, fast compile). The attacks' own model
  (:func:`jaxdef.attacks.common.attacked_model`) removes the cause instead
  (:mod:`jaxdef.attacks.conv_layout`): through it a rolled loop is as fast as
  an unrolled one (faster, on the benchmark CNN), so APGD, FAB and Square
  need no unrolling. Training's attack goes through the same rewrite
  (:func:`jaxdef.train.step.adversarial_examples`) and keeps the unroll by
  backend; whether it still gains from it is not measured.
  """
  if unroll is not None:
    return unroll
  return steps <= MAX_CPU_UNROLL if jax.default_backend() == "cpu" else 1


def _step_rule(rule: str, start: Array, *, ascent: Optional[str], norm: str, step_size,
               lr: float, boundaries, scales) -> tuple[Callable, Any]:
  """``(update(grad, state) -> (step, state), initial state)`` of ``rule``
  (:data:`STEP_RULES`): the step is added to the iterate before its projection."""
  if rule == "steepest":
    direction = ASCENTS[ascent] if ascent else lambda g: ascent_direction(g, norm)
    return (lambda g, s: (step_size * direction(g), s)), ()
  if rule != "adam":
    raise unknown_name("attack step_rule", rule, STEP_RULES)
  if ascent is not None:
    raise ConfigError(f"step_rule='adam' steps on the raw gradient; ascent={ascent!r} "
                      f"applies to step_rule='steepest' only")
  tx = adam_ascent(lr, boundaries, scales)
  return (lambda g, s: tx.update(g, s)), tx.init(start)


@compiles_itself
def perturb(loss_fn: Callable[..., Array], x: Array, *, key: Array, eps: float,
            step_size: float, steps: int, norm: str = "linf",
            init: str = "uniform", init_sigma: float = NORMAL_INIT_SIGMA,
            init_scale: float = 1.0, project_eps: bool = True,
            unroll: Optional[int | bool] = None,
            eot_samples: Optional[int] = None, ascent: Optional[str] = None,
            fooled: Optional[Callable[[Array], Array]] = None,
            step_rule: str = "steepest", adam_lr: float = ADAM_LR,
            adam_boundaries=ADAM_BOUNDARIES, adam_scales=ADAM_SCALES):
  """Projected gradient ascent on ``loss_fn`` around ``x``; returns the last iterate.

  Args:
    loss_fn: ``x_adv (N, H, W, C) -> (N,)`` per-example loss to maximise, or
      ``(x_adv, key) -> (N,)`` for a randomized model when ``eot_samples``
      is set. Its gradient with respect to ``x_adv`` is all that is taken:
      model weights are closed over and never differentiated here.
    x: clean images in [0, 1].
    key: randomness of the start point (and of the model's draws with EOT).
    eps, step_size, steps, norm: the budget (``steps`` iterations of
      ``x <- Proj(x + step_size * dir(grad))``); ``norm`` 'none' projects
      onto [0, 1] only (``eps`` unused).
    init: 'uniform' | 'normal' | 'half_sign' | 'none', see :func:`random_init`;
      ``init_sigma`` is the 'normal' start's scale, ``init_scale`` the
      'uniform' start's radius in units of eps.
    project_eps: False projects every iterate onto [0, 1] only, not onto the
      eps-ball (N-FGSM); the start is then not projected either.
    unroll: ``fori_loop`` unrolling, see :func:`loop_unroll` (None: by backend).
    eot_samples: if set, each step follows the gradient averaged over this
      many draws of the model's randomness (EOT, Athalye et al. 2018), with
      fresh draws at every step.
    ascent: ``dir`` (:data:`ASCENTS`); default the steepest ascent of ``norm``
      ('sign' for L-inf, 'l2' otherwise).
    fooled: optional ``x_adv -> (N,) bool`` (the model is fooled there); when
      given the loop also records a :class:`jaxdef.attacks.indicators.Trace`
      (one more forward pass per step, for the indicators of attack failure).
    step_rule: 'steepest' (``x + step_size * dir(grad)``) or 'adam' (``x +
      adam(grad)``, :func:`adam_ascent` with ``adam_lr`` scaled by each of
      ``adam_scales`` from its step in ``adam_boundaries`` on; ``step_size``
      and ``ascent`` unused), both then projected.

  Returns:
    ``x_adv`` with ``||x_adv - x|| <= eps`` (``project_eps``; else at most
    ``(init_scale + steps) * eps`` for a 'uniform' start) and values in [0, 1], with
    ``stop_gradient`` applied; ``(x_adv, trace)`` when ``fooled`` is given.
  """
  x = jax.lax.stop_gradient(x)
  k_init, k_eot = (key, None) if eot_samples is None else jax.random.split(key)

  def summed(z, *k):
    per_example = loss_fn(z, *k)
    return jnp.sum(per_example), per_example

  def loss_and_grad(z, i):
    """The per-example loss (N,) at ``z`` and the gradient of its sum (EOT: of
    the mean over the draws, with the loss of the last draw)."""
    if eot_samples is None:
      (_, per_example), g = jax.value_and_grad(summed, has_aux=True)(z)
    else:
      (_, per_example), g = eot_value_and_grad(summed, z, jax.random.fold_in(k_eot, i),
                                               int(eot_samples))
    return per_example, g

  if ascent is not None and ascent not in ASCENTS:
    raise unknown_name("ascent step", ascent, ASCENTS)
  ball = norm if project_eps else "none"
  start = random_init(k_init, x, eps, norm, init, init_sigma, init_scale)
  update, rule_state = _step_rule(step_rule, start, ascent=ascent, norm=norm,
                                  step_size=step_size, lr=adam_lr, boundaries=adam_boundaries,
                                  scales=adam_scales)
  unrolled = loop_unroll(unroll, steps)

  def advance(z, g, s):
    """The next iterate from ``z`` with gradient ``g`` and the rule's state ``s``."""
    u, s = update(g, s)
    return project(z + u, x, eps, ball), s

  if fooled is None:
    def body(i, carry):
      z, s = carry
      return advance(z, loss_and_grad(z, i)[1], s)

    x_adv, _ = jax.lax.fori_loop(0, steps, body, (start, rule_state), unroll=unrolled)
    return jax.lax.stop_gradient(x_adv)

  n = x.shape[0]

  def traced_step(i, carry):
    z, s, losses, fooled_any, zero, nonfinite = carry
    loss, g = loss_and_grad(z, i)
    g_zero, g_nonfinite = gradient_state(g)
    return (*advance(z, g, s), losses.at[i].set(loss.astype(jnp.float32)),
            fooled_any | fooled(z), zero & g_zero, nonfinite | g_nonfinite)

  carry = (start, rule_state, jnp.zeros((steps + 1, n), jnp.float32), jnp.zeros(n, bool),
           jnp.ones(n, bool), jnp.zeros(n, bool))
  x_adv, _, losses, fooled_any, zero, nonfinite = jax.lax.fori_loop(0, steps, traced_step,
                                                                    carry, unroll=unrolled)
  last_loss = loss_and_grad(x_adv, steps)[0]
  fooled_last = fooled(x_adv)
  trace = Trace(losses=losses.at[steps].set(last_loss.astype(jnp.float32)),
                fooled_any=fooled_any | fooled_last, fooled_last=fooled_last,
                zero_gradient=zero, nonfinite_gradient=nonfinite)
  return jax.lax.stop_gradient(x_adv), jax.tree.map(jax.lax.stop_gradient, trace)


def logits_loss(logits_fn: Callable[..., Array], x: Array, y: Array, loss: str, *,
                kappa: float = 50.0, targeted: bool = False,
                randomized: bool = False) -> Callable[[Array, Array], Array]:
  """``(x_adv, key) -> (N,)`` loss to maximise for a classifier and a named loss.

  'kl' measures KL(f(x) || f(x_adv)) against the clean prediction (TRADES).
  ``targeted`` makes ``y`` the target class: the attacker then minimises the
  loss towards ``y``. ``logits_fn`` takes ``(x, key)`` when ``randomized``;
  a deterministic one ignores the key.
  """
  model = attacked_model(logits_fn, randomized)
  if loss == "kl":
    if randomized:
      raise ConfigError("the 'kl' attack loss needs a deterministic model")
    ref = jax.lax.stop_gradient(logits_fn(x))
    return lambda z, key: losses.kl_divergence(ref, logits_fn(z))
  fn = losses.named_loss(loss, kappa=kappa)
  sign = -1.0 if targeted else 1.0
  return lambda z, key: sign * fn(model(z, key), y)


@compiles_itself
def pgd(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
        step_size: float, steps: int, norm: str = "linf", loss: str = "ce",
        random_start: bool = True, restarts: int = 1, kappa: float = 50.0,
        targeted: bool = False, init: Optional[str] = None,
        unroll: Optional[int | bool] = None, randomized: bool = False,
        eot_samples: int = 1, loss_fn: Optional[Callable[[Array, Array], Array]] = None,
        return_trace: bool = False):
  """PGD with random restarts, keeping the worst case per example.

  Across restarts an example keeps a restart that misclassifies it (the one
  with the highest loss if several do); if none does, the restart with the
  highest attack loss. ``init`` overrides
  ``random_start`` ('uniform' if True, 'none' if False).

  Adaptive attacks: ``randomized`` makes ``logits_fn`` ``(x, key) -> logits``
  and each step averages the gradient over ``eot_samples`` draws (EOT);
  ``loss_fn`` ``(x_adv, key) -> (N,)`` replaces the named ``loss`` (e.g. the
  joint loss over a model's auxiliary heads), while ``logits_fn`` still
  decides which restart fools the model.

  ``return_trace`` (one run, ``restarts=1``): returns ``(x_adv, trace)``, the
  :class:`jaxdef.attacks.indicators.Trace` the indicators of attack failure
  read (:func:`jaxdef.attacks.indicators.failure_indicators`).
  """
  check_budget(eps=eps, step_size=step_size, steps=steps, norm=norm)
  if return_trace and restarts != 1:
    raise ConfigError(f"an attack's trace (the indicators of attack failure) needs one run, "
                      f"got restarts={restarts}")
  check_inputs(logits_fn, x, y, randomized=randomized)
  if int(eot_samples) != eot_samples or eot_samples < 1:
    raise ConfigError(f"eot_samples must be a positive integer, got {eot_samples}")
  init = init or ("uniform" if random_start else "none")
  model = attacked_model(logits_fn, randomized)
  if loss_fn is None:
    loss_fn = logits_loss(logits_fn, x, y, loss, kappa=kappa, targeted=targeted,
                          randomized=randomized)
  eot = int(eot_samples) if randomized else None

  def score(x_adv, k):
    logits = model(x_adv, k)
    fooled = jnp.argmax(logits, -1) == y if targeted else jnp.argmax(logits, -1) != y
    return fooled, loss_fn(x_adv, k)

  def attack(k, trace=False):
    step_loss = loss_fn if randomized else (lambda z: loss_fn(z, k))
    return perturb(step_loss, x, key=k, eps=eps, step_size=step_size, steps=steps,
                   norm=norm, init=init, unroll=unroll, eot_samples=eot,
                   fooled=(lambda z: score(z, k)[0]) if trace else None)

  keys = jax.random.split(key, restarts)
  best = attack(keys[0], return_trace)
  if restarts == 1:
    return best

  def restart(i, carry):
    best, best_fooled, best_loss = carry
    cand = attack(keys[i])
    fooled, cand_loss = score(cand, keys[i])
    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (cand_loss > best_loss))
    pick = better[:, None, None, None]
    return (jnp.where(pick, cand, best), best_fooled | fooled,
            jnp.where(better, cand_loss, best_loss))

  fooled, loss0 = score(best, keys[0])
  best, _, _ = jax.lax.fori_loop(1, restarts, restart, (best, fooled, loss0),
                                 unroll=loop_unroll(unroll, restarts))
  return best


@compiles_itself
def fgsm(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Optional[Array] = None,
         eps: float, norm: str = "linf", loss: str = "ce", random_start: bool = False,
         **adaptive) -> Array:
  """Fast gradient sign method (Goodfellow et al. 2015): one PGD step of size eps.

  From ``x`` itself, or with ``random_start`` from a uniform point of the
  eps-ball (the CAS authors' evaluation: its one step of eps is then
  projected back onto the ball). ``adaptive``: ``randomized``,
  ``eot_samples``, ``loss_fn`` as in :func:`pgd`.
  """
  key = jax.random.key(0) if key is None else key
  return pgd(logits_fn, x, y, key=key, eps=eps, step_size=eps, steps=1, norm=norm,
             loss=loss, random_start=random_start, **adaptive)


@compiles_itself
def cw_linf(logits_fn: Callable[..., Array], x: Array, y: Array, *, key: Array, eps: float,
            step_size: float, steps: int = 30, kappa: float = 50.0,
            random_start: bool = True, **adaptive) -> Array:
  """C&W-inf: PGD on the C&W margin loss capped at ``kappa``. The FSR
  evaluation runs 30 steps with kappa 50 from the clean image; the CAS
  authors' 20 steps of 0.003 with kappa 0 from a random start.

  ``adaptive``: ``randomized``, ``eot_samples``, ``loss_fn`` as in :func:`pgd`.
  """
  return pgd(logits_fn, x, y, key=key, eps=eps, step_size=step_size, steps=steps,
             loss="cw", kappa=kappa, random_start=random_start, **adaptive)
