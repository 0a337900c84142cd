"""On-device augmentation of uint8 or float NHWC batches: pure and jit-able.

``crop_flip`` is the standard CIFAR augmentation of the adversarial-training
literature (e.g. Madry et al. 2018; Rice et al. 2020): zero-pad 4 pixels on
every side, crop a random HxW window, flip horizontally with probability 1/2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdef.data.dataset import AUGMENTATIONS
from jaxdef.errors import unknown_name


def to_float(x: jax.Array) -> jax.Array:
  """Images as float32 on [0, 1]: uint8 0..255 scaled by 1/255, float images
  only cast (numpy or jax arrays, inside ``jit`` or not)."""
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)


def random_crop_flip(key: jax.Array, x: jax.Array, pad: int = 4,
                     flip: bool = True) -> jax.Array:
  """Random ``pad``-pixel translation and horizontal flip, per example.

  Args:
    key: PRNG key; the same key gives the same batch.
    x: (N, H, W, C) images of any dtype.
    pad: zero padding on each side; the crop offset is uniform in
      ``[0, 2 * pad]`` along each spatial axis.
    flip: whether to flip each example horizontally with probability 1/2.

  Returns:
    (N, H, W, C) images, same dtype: ``padded[i, dy:dy+H, dx:dx+W]``, then
    mirrored left-right where the coin came up.
  """
  n, h, w, _ = x.shape
  key_y, key_x, key_flip = jax.random.split(key, 3)
  dy = jax.random.randint(key_y, (n,), 0, 2 * pad + 1)
  dx = jax.random.randint(key_x, (n,), 0, 2 * pad + 1)
  do_flip = jax.random.bernoulli(key_flip, 0.5, (n,)) & flip
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = _window_at(_window_at(padded, dy, h, axis=1), dx, w, axis=2)
  return jnp.where(do_flip[:, None, None, None], out[:, :, ::-1], out)


def _window_at(x: jax.Array, offset: jax.Array, size: int, axis: int) -> jax.Array:
  """Per example i, ``x[i]`` sliced to ``[offset[i], offset[i] + size)`` along ``axis``.

  Written as a select over the few possible offsets rather than
  ``vmap(lax.dynamic_slice)``: the select is elementwise in the batch
  dimension, so it keeps a batch-sharded ``x`` sharded, also on meshes with
  explicit axis types (the default of ``jax.make_mesh``), where vmap rejects
  a sharded image batch mapped together with unsharded offsets.
  """
  chosen = offset.reshape((-1,) + (1,) * (x.ndim - 1))
  out = jax.lax.slice_in_dim(x, 0, size, axis=axis)
  for start in range(1, x.shape[axis] - size + 1):
    window = jax.lax.slice_in_dim(x, start, start + size, axis=axis)
    out = jnp.where(chosen == start, window, out)
  return out


def augment_batch(key: jax.Array, x: jax.Array, kind: str) -> jax.Array:
  """Applies augmentation ``kind`` (``config.data.augment``) to a batch.

  ``kind`` is a Python string (static under jit): ``'none'`` returns ``x``,
  ``'crop_flip'`` is :func:`random_crop_flip` with pad 4.
  """
  if kind == "none":
    return x
  if kind == "crop_flip":
    return random_crop_flip(key, x)
  raise unknown_name("augmentation", kind, AUGMENTATIONS)
