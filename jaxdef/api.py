"""The public entry points other programs use: ``restore(workdir)``."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaxdef.build import DataMeta, build
from jaxdef.train import checkpoint as ckpt


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


def restore_model(workdir: str, *, step: Optional[int] = None, use_ema: Optional[bool] = None
                  ) -> tuple[ml_collections.ConfigDict, Any, dict, DataMeta]:
  """``(config, model, variables, data meta)`` of a checkpoint in ``workdir``.

  ``model`` includes every defense module of the config; ``variables`` are
  the weights to evaluate: EMA when the run kept one, unless ``use_ema`` says
  otherwise. ``step`` defaults to the newest checkpoint.
  """
  config, meta_dict = ckpt.read_run_config(workdir)
  meta = DataMeta.from_dict(meta_dict)
  model, _, _ = build(config, meta)
  step = ckpt.latest_step(workdir) if step is None else step
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=config.train.max_to_keep,
                                    async_save=False, read_only=True)
  try:
    saved = ckpt.restore_local(manager, step)
  finally:
    manager.close()
  ema = config.train.ema_decay > 0 if use_ema is None else use_ema
  prefix = "ema_" if ema else ""
  variables = {"params": saved[prefix + "params"],
               "batch_stats": saved.get(prefix + "batch_stats", {})}
  return config, model, jax.tree.map(jnp.asarray, variables), meta


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
  config, model, variables, meta = restore_model(workdir, step=step, use_ema=use_ema)

  def logits_fn(x: jax.Array) -> jax.Array:
    check_images(x, meta.image_shape)
    return model.apply(variables, x, train=False)["logits"]

  return config, logits_fn
