"""Augmentation: on device for NHWC batches (jit-able), on the host for single images.

``crop_flip`` is the standard CIFAR augmentation of the adversarial-training
literature (e.g. Madry et al. 2018; Rice et al. 2020): zero-pad 4 pixels on
every side, crop a random HxW window, flip horizontally with probability 1/2.
It runs on device, inside the train step.

``rrc_flip`` is the ImageNet one (Szegedy et al. 2015, "Going deeper with
convolutions", the Inception crop; used by the ImageNet adversarial-training
codes of Wong et al. 2020, Salman et al. 2020 and Singh et al. 2023): a random
crop of 8%-100% of the image's area with aspect ratio in [3/4, 4/3],
resized to ``size`` x ``size``, flipped with probability 1/2. It runs on the
host, per image, for images of any stored size (:func:`random_resized_crop`),
in the data loader's workers; evaluation images get the matching centre crop
(:func:`center_crop`: the shorter side resized to ``size / 0.875``, the
central ``size`` x ``size`` kept). Both take numpy uint8 (H, W, C) images and
a numpy Generator, so a draw is a pure function of the generator's seed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

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
  ``'crop_flip'`` is :func:`random_crop_flip` with pad 4; ``'rrc_flip'``
  returns ``x`` (the data loader already cropped and flipped it on the host).
  """
  if kind in ("none", "rrc_flip"):  # rrc_flip is done on the host
    return x
  if kind == "crop_flip":
    return random_crop_flip(key, x)
  raise unknown_name("augmentation", kind, AUGMENTATIONS)


# The Inception crop's ranges (Szegedy et al. 2015) and the evaluation crop's
# share of the resized image (224 of 256 px).
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875
_RRC_TRIES = 10


def rrc_window(height: int, width: int, rng: np.random.Generator,
               scale: tuple[float, float] = RRC_SCALE,
               ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of a random-resized-crop window inside a height x width image.

  Draws an area fraction uniform in ``scale`` and an aspect ratio (w / h)
  log-uniform in ``ratio`` until the window fits (10 tries); then falls back
  to the largest central window whose ratio is clamped into ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(_RRC_TRIES):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  shape_ratio = width / height
  if shape_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif shape_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, C) -> (height, width, C), bilinear (PIL, antialiased when shrinking)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel

  if image.shape[:2] == (height, width):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
  return out.reshape(height, width, channels)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        flip: bool = True) -> np.ndarray:
  """The Inception crop of a uint8 (H, W, C) image: (size, size, C) uint8.

  The window from :func:`rrc_window`, resized bilinearly to ``size`` x
  ``size``, mirrored left-right with probability 1/2 when ``flip``.
  """
  top, left, h, w = rrc_window(image.shape[0], image.shape[1], rng)
  out = resize(image[top:top + h, left:left + w], size, size)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def center_crop(image: np.ndarray, size: int,
                fraction: float = EVAL_CROP_FRACTION) -> np.ndarray:
  """The evaluation crop at resolution ``size``: (size, size, C) uint8.

  The shorter side is resized to ``round(size / fraction)`` (256 for 224),
  keeping the aspect ratio, and the central ``size`` x ``size`` is kept.
  """
  height, width = image.shape[:2]
  short = int(round(size / fraction))
  scale = short / min(height, width)
  new_h, new_w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
  out = resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(out[top:top + size, left:left + size])
