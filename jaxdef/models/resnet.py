"""ResNet-18 and PreAct ResNet-18, CIFAR variants, on one residual trunk.

The trunk (:class:`ResidualNetwork`) is shared with the wide ResNets of
``wide_resnet.py``: a 3x3 stem convolution, stages of residual blocks whose
first block may downsample, global average pooling and one linear layer. A
:class:`ResidualSpec` says which block and which widths.

Tap points (shapes at 32x32 input, N images):

* ``stem`` (N, 32, 32, 64): after BN-ReLU in ResNet-18; the bare convolution
  in PreAct ResNet-18, whose blocks normalise their own input.
* ``stage{s}.{b}`` (s = 1..4, b = 0, 1): block outputs, (N, 32, 32, 64),
  (N, 16, 16, 128), (N, 8, 8, 256), (N, 4, 4, 512) for s = 1..4. The last
  block of a stage is also called ``stage{s}``.
* ``final`` (N, 4, 4, 512), PreAct only: the last BN-ReLU.
* ``penultimate`` (N, 512): the globally average-pooled features.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxdef.models.base import Array, ModelOutput, Normalize, Taps
from jaxdef.models.layers import (Classifier, batch_norm, classify, conv,
                                  tap_names)
from jaxdef.models.registry import register


class ResidualBlock(nn.Module):
  """Fields of a residual block: output channels, stride, compute dtype."""
  features: int
  strides: int
  dtype: Any

  def _needs_projection(self, x: Array) -> bool:
    return self.strides != 1 or x.shape[-1] != self.features


class BasicBlock(ResidualBlock):
  """Post-activation basic block (He et al. 2016, "Deep Residual Learning").

  ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; the shortcut is
  a 1x1 convolution + BN when the stride or width changes (option B).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = conv(self.features, 3, self.strides, dtype=self.dtype)(x)
    h = nn.relu(batch_norm(train, self.dtype)(h))
    h = conv(self.features, 3, dtype=self.dtype)(h)
    h = batch_norm(train, self.dtype)(h)
    shortcut = x
    if self._needs_projection(x):
      shortcut = conv(self.features, 1, self.strides, dtype=self.dtype)(x)
      shortcut = batch_norm(train, self.dtype)(shortcut)
    return nn.relu(h + shortcut)


class PreActBlock(ResidualBlock):
  """Pre-activation block (He et al. 2016, "Identity Mappings in Deep ResNets").

  ``conv3x3(relu(bn(conv3x3(a)))) + shortcut`` with ``a = relu(bn(x))``. The
  identity shortcut carries the raw ``x``; a projection (1x1 conv, when stride
  or width changes) reads ``a``, as in the reference CIFAR code. This is also
  the wide block of Zagoruyko & Komodakis (2016) without dropout.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    a = nn.relu(batch_norm(train, self.dtype)(x))
    shortcut = x
    if self._needs_projection(x):
      shortcut = conv(self.features, 1, self.strides, dtype=self.dtype)(a)
    h = conv(self.features, 3, self.strides, dtype=self.dtype)(a)
    h = nn.relu(batch_norm(train, self.dtype)(h))
    return conv(self.features, 3, dtype=self.dtype)(h) + shortcut


class ResidualSpec(NamedTuple):
  """The shape of a residual network.

  Attributes:
    stem_width: channels of the 3x3 stem convolution.
    widths: channels of each stage.
    strides: stride of the first block of each stage.
    blocks_per_stage: residual blocks in every stage.
    preact: pre-activation blocks (and a final BN-ReLU) instead of basic ones.
  """
  stem_width: int
  widths: tuple[int, ...]
  strides: tuple[int, ...]
  blocks_per_stage: int
  preact: bool


class ResidualNetwork(Classifier):
  """The residual trunk; subclasses set ``spec`` (see the module docstring)."""
  spec: ClassVar[ResidualSpec]

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               labels: Array | None = None) -> ModelOutput:
    spec = self.spec
    taps = Taps(self, self.insert, train, labels)
    h = Normalize(self.mean, self.std)(x)
    h = conv(spec.stem_width, 3, dtype=self.dtype)(h)
    if not spec.preact:  # pre-activation blocks normalise their own input
      h = nn.relu(batch_norm(train, self.dtype)(h))
    h = taps("stem", h)
    block = PreActBlock if spec.preact else BasicBlock
    stages = zip(spec.widths, spec.strides)
    for s, (width, stride) in enumerate(stages, start=1):
      for b in range(spec.blocks_per_stage):
        h = block(width, stride if b == 0 else 1, self.dtype)(h, train)
        h = taps(tap_names(f"stage{s}.{b}", f"stage{s}",
                           b == spec.blocks_per_stage - 1), h)
    if spec.preact:
      # Pre-activation blocks end on an un-normalised sum.
      h = taps("final", nn.relu(batch_norm(train, self.dtype)(h)))
    return classify(taps, jnp.mean(h, axis=(1, 2)), self.num_classes,
                    self.dtype)


@register("resnet18")
class ResNet18(ResidualNetwork):
  """ResNet-18 for 32x32 inputs (He et al. 2016), as used by CAS/FSR/MART.

  CIFAR variant: 3x3 stem convolution (64) + BN + ReLU and no max-pool, four
  stages of two :class:`BasicBlock` (64, 128, 256, 512 channels, strides 1,
  2, 2, 2), global average pooling, one linear layer; 11.17M parameters for
  10 classes.
  """
  spec: ClassVar[ResidualSpec] = ResidualSpec(
      64, (64, 128, 256, 512), (1, 2, 2, 2), 2, preact=False)


@register("preact_resnet18")
class PreActResNet18(ResidualNetwork):
  """PreAct ResNet-18 for 32x32 inputs (He et al. 2016, "Identity Mappings").

  As :class:`ResNet18` with :class:`PreActBlock`, a bare stem convolution and
  a final BN-ReLU (tap ``final``) before pooling.
  """
  spec: ClassVar[ResidualSpec] = ResidualSpec(
      64, (64, 128, 256, 512), (1, 2, 2, 2), 2, preact=True)
