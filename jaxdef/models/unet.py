"""A small conditional U-Net, the regenerator ``G(x_s, M, c)`` of PSSR (docs/methods.md 5.2).

The paper (Fu et al., arXiv 2402.00304) names a "conditional alignment
extrapolator" and gives no architecture; this one is jaxdef's reconstruction.
Input: the image with its salient pixels removed ``x_s`` (N, H, W, C), the
removal mask ``M`` (N, H, W) as one more channel, and a condition vector
``c`` (N, K) (the classifier's soft prediction or penultimate features of
``x_s``). Output: an image (N, H, W, C) in [0, 1] (sigmoid).

Layout (``width`` w, ``levels`` L = 2): encoder blocks of w, 2w, ..., each
followed by 2x2 average pooling; a bottleneck block of ``w * 2**L`` channels
modulated by FiLM (Perez et al. 2018) from ``c``; decoder blocks that upsample
by 2 (nearest neighbour), concatenate the encoder's skip connection and halve
the width; a 1x1 convolution to C channels and a sigmoid. A block is two
3x3 convolutions, each followed by GroupNorm and ReLU (GroupNorm, not
BatchNorm, so a restoration depends on its own image only and the model has
no running statistics to freeze). Dropout (``dropout``) follows the FiLM
modulation and every decoder block: it is the randomness of the two
restorations that the R-drop term compares (docs/methods.md 5.3).

Sizes that are not multiples of ``2**L`` (28 x 28 with L = 3, say) are
zero-padded at the bottom and right before the encoder and cropped back after
the last convolution; 28 x 28 and 32 x 32 need no padding at L = 2 (28 -> 14
-> 7, 32 -> 16 -> 8).

FiLM: ``h <- h * (1 + gamma(c)) + beta(c)`` with the dense layer that gives
``gamma, beta`` initialised to zero, so an untrained regenerator starts
unconditioned.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _groups(channels: int) -> int:
  """GroupNorm groups: up to 8, dividing ``channels``."""
  return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Module):
  """Two (3x3 conv -> GroupNorm -> ReLU) layers; (N, H, W, *) -> (N, H, W, features)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    for _ in range(2):
      h = nn.Conv(self.features, (3, 3), padding=1, dtype=self.dtype)(h)
      h = nn.relu(nn.GroupNorm(num_groups=_groups(self.features), dtype=self.dtype)(h))
    return h


class ConditionalUNet(nn.Module):
  """``G(x_s, M, c)``: see the module docstring.

  Attributes:
    width: channels of the first encoder block (doubled at every level).
    levels: number of 2x poolings (the bottleneck is ``H / 2**levels``).
    dropout: dropout rate in the bottleneck and decoder (training only).
    dtype: compute dtype (parameters float32, output float32).
  """
  width: int = 16
  levels: int = 2
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_s: Array, mask: Array, cond: Array, *, train: bool) -> Array:
    """x_s (N, H, W, C), mask (N, H, W), cond (N, K) -> (N, H, W, C) in [0, 1]."""
    _, height, width, channels = x_s.shape
    multiple = 2 ** self.levels
    pad = ((0, 0), (0, -height % multiple), (0, -width % multiple), (0, 0))
    h = jnp.pad(jnp.concatenate([x_s, mask[..., None].astype(x_s.dtype)], axis=-1), pad)
    drop = nn.Dropout(self.dropout, deterministic=not train)

    skips = []
    for level in range(self.levels):
      h = ConvBlock(self.width * 2 ** level, self.dtype)(h)
      skips.append(h)
      h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    bottleneck = self.width * 2 ** self.levels
    h = ConvBlock(bottleneck, self.dtype)(h)
    film = nn.Dense(2 * bottleneck, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                    name="film")(cond.astype(self.dtype))
    gamma, beta = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = drop(h * (1.0 + gamma) + beta)
    for level in reversed(range(self.levels)):
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = jnp.concatenate([h, skips[level]], axis=-1)
      h = drop(ConvBlock(self.width * 2 ** level, self.dtype)(h))
    out = nn.Conv(channels, (1, 1), dtype=self.dtype, name="to_image")(h)
    return jax.nn.sigmoid(out.astype(jnp.float32))[:, :height, :width, :]
