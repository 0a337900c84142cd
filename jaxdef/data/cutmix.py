"""CutMix (Yun et al. 2019) as adversarial training uses it (Rebuffi et al. 2021).

One box per batch is cut from a shuffled copy of the batch and pasted into
every image; each label becomes a target distribution mixed by the box's
actual area. The draw follows both public codes (deepmind-research
``adversarial_robustness/jax/utils.py``, ``cutmix``; DM-Improves-AT
``gowal21uncovering/utils/cutmix.py``): lambda ~ Beta(1, 1); the box's sides
are ``int(H sqrt(1 - lambda))`` by ``int(W sqrt(1 - lambda))``, centred at a
uniform pixel and clipped to the image (each side spans ``2 * (side // 2)``
before the clip); lambda is then recomputed as one minus the clipped box's
area fraction, so the label weights match the pixels. Both codes mix every
batch when CutMix is on.

The step applies it on device, after augmentation (:func:`cutmix_batch`),
with a key derived from the step's augmentation key: a resumed run mixes the
same batches the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdef.attacks.losses import label_targets

Array = jax.Array


def cutmix_box(key: Array, height: int, width: int) -> tuple[Array, Array]:
  """``(box, lam)``: the box ``(top, left, h, w)`` (int32 (4,)) and the share
  of the image outside it, ``1 - h w / (H W)``, the weight of the image's own label."""
  k_box, k_lam = jax.random.split(key)
  lam = jax.random.beta(k_lam, 1.0, 1.0)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(k_box)
  cy = jax.random.randint(k_y, (), 0, height)
  cx = jax.random.randint(k_x, (), 0, width)
  top = jnp.clip(cy - cut_h // 2, 0, height)
  left = jnp.clip(cx - cut_w // 2, 0, width)
  h = jnp.clip(cy + cut_h // 2, 0, height) - top
  w = jnp.clip(cx + cut_w // 2, 0, width) - left
  lam = 1.0 - (h * w).astype(jnp.float32) / (height * width)
  return jnp.stack([top, left, h, w]), lam


def box_mask(box: Array, height: int, width: int) -> Array:
  """(H, W, 1) bool, True inside ``box`` = ``(top, left, h, w)``."""
  top, left, h, w = box
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def cutmix(key: Array, images: Array, targets: Array) -> tuple[Array, Array]:
  """Mixes a batch: ``(images (N, H, W, C), targets (N, K)) -> (images, targets)``.

  Image i keeps its pixels outside one box and takes image ``perm[i]``'s
  inside it; its target becomes ``lam * targets[i] + (1 - lam) *
  targets[perm[i]]`` with ``lam`` from :func:`cutmix_box`. ``perm`` is a
  uniform permutation of the batch (an image may be paired with itself).
  """
  n, height, width = images.shape[:3]
  k_box, k_perm = jax.random.split(key)
  box, lam = cutmix_box(k_box, height, width)
  perm = jax.random.permutation(k_perm, n)
  mixed = jnp.where(box_mask(box, height, width)[None], images[perm], images)
  return mixed, lam * targets + (1.0 - lam) * targets[perm]


def cutmix_batch(key: Array, images: Array, labels: Array, num_classes: int,
                 smoothing=None) -> tuple[Array, Array]:
  """The train step's CutMix: labels (N,) become (N, K) targets (smoothed by
  ``smoothing``, a float or (N,) floats, before the mix, as the DeepMind code
  smooths the extra data's labels), then :func:`cutmix`."""
  return cutmix(key, images, label_targets(labels, num_classes, smoothing))
