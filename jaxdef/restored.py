"""A trained run, loaded once: :func:`load_run` and the public :func:`restore`.

    run = load_run("runs/x")                 # Restored(config, meta, model, variables, ...)
    config, logits_fn = restore("runs/x")    # the public entry point

One :class:`Restored` record serves everything that reads a run directory:
:func:`restore`, ``jaxdef eval`` (:mod:`jaxdef.evaluate`), the
attention report, NIP's statistics and ``train.init_from``. It reads
``config.json`` once, builds the model (defense modules included) once and
restores one checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxdef import checkpoint as ckpt
from jaxdef.build import DataMeta, build
from jaxdef.defenses import Defense


@dataclasses.dataclass(frozen=True)
class Restored:
  """One checkpoint of a run, ready to evaluate.

  Attributes:
    workdir: the run's ``--workdir``.
    config: the run's own config (``workdir/config.json``).
    meta: the data metadata saved with it.
    model: the model with every defense module of the config.
    defense: the config's :class:`~jaxdef.defenses.Defense` (hooks, joint loss).
    variables: ``{'params', 'batch_stats'}`` to evaluate (EMA when chosen).
    step: the checkpoint's step.
    weights: 'ema' or 'params', which weights ``variables`` holds.
    select: how the checkpoint was chosen ('final', 'best_val', 'best_test',
      or 'step' when asked for by number).
  """
  workdir: str
  config: ml_collections.ConfigDict
  meta: DataMeta
  model: Any
  defense: Defense
  variables: dict
  step: int
  weights: str
  select: str = "final"

  def describe(self) -> str:
    """One line: which checkpoint this is, and how it was chosen."""
    how = {"final": "the last", "step": "as asked",
           "best_val": "best PGD accuracy on held-out training data",
           "best_test": "best PGD accuracy on the TEST split: optimistic, the CAS "
                        "authors' rule"}[self.select]
    return f"checkpoint at step {self.step} ({self.select}: {how}), {self.weights} weights"

  def outputs(self, x: jax.Array) -> dict:
    """The model's output record on ``x`` (NHWC floats in [0, 1]), eval mode."""
    check_images(x, self.meta.image_shape)
    return self.model.apply(self.variables, x, train=False)

  def logits(self, x: jax.Array) -> jax.Array:
    """Logits (N, classes) on ``x``: pure in ``x``, jit-able and differentiable."""
    return self.outputs(x)["logits"]


def check_images(x: jax.Array, image_shape: tuple[int, ...]) -> None:
  """NHWC floats of the trained size, in [0, 1].

  Shape and dtype are checked always (also on tracers, at trace time); the
  value range only for concrete arrays, since a traced value is unknown.
  """
  if x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape):
    raise ValueError(f"images must be NHWC of shape (N, {', '.join(map(str, image_shape))}), "
                     f"got {tuple(x.shape)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"images must be floats in [0, 1], got dtype {x.dtype}")
  if not isinstance(x, jax.core.Tracer):
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    if lo < 0.0 or hi > 1.0:
      raise ValueError(f"images must be in [0, 1] (divide uint8 images by 255), "
                       f"got values in [{lo:.3g}, {hi:.3g}]")


def load_run(workdir: str, *, step: Optional[int] = None, use_ema: Optional[bool] = None,
             select: Optional[str] = None) -> Restored:
  """A checkpoint of the run in ``workdir``.

  Which one: ``step`` if given; else the run's ``train.select`` (or
  ``select``): 'final' the newest, 'best_val' / 'best_test' the one the
  training kept for its best PGD accuracy on held-out training data / on
  the test split. ``variables`` are the EMA weights when the run kept an
  EMA, unless ``use_ema`` says otherwise.
  """
  config, meta_dict = ckpt.read_run_config(workdir)
  meta = DataMeta.from_dict(meta_dict)
  model, _, defense = build(config, meta)
  select = "step" if step is not None else (select or config.train.get("select", "final"))
  subdir = ckpt.CHECKPOINTS if select in ("final", "step") else ckpt.SELECTED
  step = ckpt.latest_step(workdir, subdir) if step is None else int(step)
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=config.train.max_to_keep,
                                    async_save=False, read_only=True, subdir=subdir)
  try:
    saved = ckpt.restore_local(manager, step)
  finally:
    manager.close()
  ema = config.train.ema_decay > 0 if use_ema is None else use_ema
  prefix = "ema_" if ema else ""
  variables = {"params": saved[prefix + "params"],
               "batch_stats": saved.get(prefix + "batch_stats", {})}
  return Restored(workdir=workdir, config=config, meta=meta, model=model, defense=defense,
                  variables=jax.tree.map(jnp.asarray, variables), step=step,
                  weights="ema" if ema else "params", select=select)


def restore(workdir: str, *, step: Optional[int] = None, use_ema: Optional[bool] = None
            ) -> tuple[ml_collections.ConfigDict, Callable[[jax.Array], jax.Array]]:
  """Loads the run in ``workdir``: ``(config, logits_fn)``.

  ``logits_fn(x)`` maps NHWC float images in [0, 1] to logits (N, classes)
  with the trained weights (the EMA weights when the run kept an EMA, unless
  ``use_ema=False``) in evaluation mode, every defense module of the config
  included. It is a pure function of ``x``: jit-able and differentiable.

  Args:
    workdir: the ``--workdir`` of a training run.
    step: which checkpoint (default: the newest).
    use_ema: override the choice of EMA vs raw weights.
  """
  run = load_run(workdir, step=step, use_ema=use_ema)
  return run.config, run.logits
