"""ResNet-18 and PreAct ResNet-18 (CIFAR variants) and ResNet-50, on one residual trunk.

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

ResNet-50 (torchvision's, :class:`ResNet50`) has the same tap names; its
docstring gives their shapes.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from jaxdef.errors import unknown_name
from jaxdef.models.base import Array, ModelOutput, Normalize, Taps
from jaxdef.models.layers import (Classifier, activation, batch_norm, classify,
                                  conv, tap_names)
from jaxdef.models.registry import register


class ResidualBlock(nn.Module):
  """Fields of a residual block: output channels, stride, compute dtype, and
  the network's :class:`ResidualSpec` (activation, padding, shortcut form)."""
  features: int
  strides: int
  dtype: Any
  spec: "ResidualSpec"

  def _needs_projection(self, x: Array) -> bool:
    return self.strides != 1 or x.shape[-1] != self.features

  def _act(self, h: Array) -> Array:
    return activation(self.spec.activation)(h)

  def _projected(self, x: Array, train: bool) -> Array:
    """A post-activation block's shortcut: ``x``, or a 1x1 convolution + BN of
    it when the stride or width changes (option B). Called after the main
    path, so that its layers are numbered after the main path's."""
    if not self._needs_projection(x):
      return x
    h = conv(self.features, 1, self.strides, dtype=self.dtype)(x)
    return batch_norm(train, self.dtype, self.spec.bn_decay)(h)

  def _strided_conv(self, features: int) -> nn.Conv:
    """The block's 3x3 convolution that carries its stride.

    With ``spec.downsample_padding == 'same'`` a stride-2 convolution pads
    one row and column after the input and none before (TensorFlow's SAME
    at even sizes, the DeepMind WRNs'); otherwise one on every side.
    """
    padding = (((0, 1), (0, 1)) if self.strides == 2 and self.spec.downsample_padding == "same"
               else None)
    return conv(features, 3, self.strides, dtype=self.dtype, padding=padding)


class BasicBlock(ResidualBlock):
  """Post-activation basic block (He et al. 2016, "Deep Residual Learning").

  ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; the shortcut is
  a 1x1 convolution + BN when the stride or width changes (option B).
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    h = self._strided_conv(self.features)(x)
    h = self._act(batch_norm(train, self.dtype, self.spec.bn_decay)(h))
    h = conv(self.features, 3, dtype=self.dtype)(h)
    h = batch_norm(train, self.dtype, self.spec.bn_decay)(h)
    return self._act(h + self._projected(x, train))


class Bottleneck(ResidualBlock):
  """Post-activation bottleneck block (He et al. 2016), torchvision's form.

  ``relu(bn(conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(x)))))))) + shortcut(x))``
  with ``features / 4`` channels inside; the stride sits on the 3x3
  convolution (torchvision's "ResNet v1.5"); the shortcut is a 1x1
  convolution + BN when the stride or width changes.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    inner = self.features // 4
    h = conv(inner, 1, dtype=self.dtype)(x)
    h = self._act(batch_norm(train, self.dtype, self.spec.bn_decay)(h))
    h = self._strided_conv(inner)(h)
    h = self._act(batch_norm(train, self.dtype, self.spec.bn_decay)(h))
    h = conv(self.features, 1, dtype=self.dtype)(h)
    h = batch_norm(train, self.dtype, self.spec.bn_decay)(h)
    return self._act(h + self._projected(x, train))


class PreActBlock(ResidualBlock):
  """Pre-activation block (He et al. 2016, "Identity Mappings in Deep ResNets").

  ``conv3x3(relu(bn(conv3x3(a)))) + shortcut`` with ``a = relu(bn(x))``. The
  identity shortcut carries the raw ``x``; a projection (1x1 conv, when stride
  or width changes) reads ``a``, as in the reference CIFAR code, or ``x`` with
  ``spec.projection_input == 'raw'`` (RobustBench's ``PreActBlock``). This is
  also the wide block of Zagoruyko & Komodakis (2016) without dropout.
  """

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    a = self._act(batch_norm(train, self.dtype, self.spec.bn_decay)(x))
    shortcut = x
    if self._needs_projection(x):
      source = x if self.spec.projection_input == "raw" else a
      shortcut = conv(self.features, 1, self.strides, dtype=self.dtype)(source)
    h = self._strided_conv(self.features)(a)
    h = self._act(batch_norm(train, self.dtype, self.spec.bn_decay)(h))
    return conv(self.features, 3, dtype=self.dtype)(h) + shortcut


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact": PreActBlock}
PROJECTION_INPUTS = ("activated", "raw")
DOWNSAMPLE_PADDINGS = ("torch", "same")


class ResidualSpec(NamedTuple):
  """The shape of a residual network.

  Attributes:
    stem_width: channels of the stem convolution.
    widths: output channels of each stage.
    strides: stride of the first block of each stage.
    blocks_per_stage: residual blocks in every stage, or one count per stage.
    preact: pre-activation blocks (and a final BN-activation, see
      ``final_norm``) instead of post-activation ones.
    bottleneck: post-activation bottleneck blocks (``preact`` False).
    imagenet_stem: a 7x7 stride-2 stem convolution, BN-ReLU and a 3x3
      stride-2 max-pool (torchvision) instead of a 3x3 convolution.
    activation: 'relu' or 'swish' (:data:`jaxdef.models.layers.ACTIVATIONS`).
    final_norm: pre-activation networks end on BN-activation before pooling.
    projection_input: what a pre-activation projection shortcut reads,
      'activated' (``relu(bn(x))``) or 'raw' (``x``).
    downsample_padding: 'torch' (one pixel on every side) or 'same' (stride-2
      3x3 convolutions pad one row and column after the input only).
    bn_decay: the BatchNorm running statistics' decay
      (:func:`jaxdef.models.layers.batch_norm`).
  """
  stem_width: int
  widths: tuple[int, ...]
  strides: tuple[int, ...]
  blocks_per_stage: int | tuple[int, ...]
  preact: bool
  bottleneck: bool = False
  imagenet_stem: bool = False
  activation: str = "relu"
  final_norm: bool = True
  projection_input: str = "activated"
  downsample_padding: str = "torch"
  bn_decay: float = 0.9

  @property
  def block(self) -> str:
    """The block's name in :data:`BLOCKS`."""
    return "preact" if self.preact else "bottleneck" if self.bottleneck else "basic"

  def stage_blocks(self) -> tuple[int, ...]:
    """Blocks in each stage."""
    n = self.blocks_per_stage
    return tuple(n) if isinstance(n, (tuple, list)) else (n,) * len(self.widths)

  def check(self) -> None:
    """One-line ConfigError for a field outside its choices."""
    activation(self.activation)
    for field, value, valid in (("projection_input", self.projection_input, PROJECTION_INPUTS),
                                ("downsample_padding", self.downsample_padding,
                                 DOWNSAMPLE_PADDINGS)):
      if value not in valid:
        raise unknown_name(field, str(value), valid)


class ResidualNetwork(Classifier):
  """The residual trunk; subclasses set ``spec`` (see the module docstring).

  Attributes:
    remat: rematerialise every residual block (``flax.linen.remat``): its
      activations are recomputed in the backward pass instead of kept, so a
      larger batch fits in memory for about one more forward pass of compute.
      Same parameters, outputs and gradients.
    zero_logits: the classifier layer's weights start at zero (the DeepMind
      WRNs of Gowal et al. 2020 / Rebuffi et al. 2021: every class has logit
      0, a uniform prediction, at initialisation).
  """
  spec: ClassVar[ResidualSpec]
  remat: bool = False
  zero_logits: bool = False

  def __post_init__(self):
    self.spec.check()
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               labels: Array | None = None) -> ModelOutput:
    spec = self.spec
    act = activation(spec.activation)
    taps = Taps(self, self.insert, train, labels)
    h = Normalize(self.mean, self.std)(x)
    if spec.imagenet_stem:
      h = conv(spec.stem_width, 7, 2, dtype=self.dtype)(h)
      h = act(batch_norm(train, self.dtype, spec.bn_decay)(h))
      h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      h = conv(spec.stem_width, 3, dtype=self.dtype)(h)
      if not spec.preact:  # pre-activation blocks normalise their own input
        h = act(batch_norm(train, self.dtype, spec.bn_decay)(h))
    h = taps("stem", h)
    block = BLOCKS[spec.block]
    # Named as Flax names the plain blocks, so remat changes no parameter path.
    named = lambda n: f"{BLOCKS[spec.block].__name__}_{n}"
    if self.remat:
      block = nn.remat(block, static_argnums=(2,))  # (self, x, train): train is static
    stages = zip(spec.widths, spec.strides, spec.stage_blocks())
    n = 0
    for s, (width, stride, blocks) in enumerate(stages, start=1):
      for b in range(blocks):
        h = block(width, stride if b == 0 else 1, self.dtype, spec, name=named(n))(h, train)
        n += 1
        h = taps(tap_names(f"stage{s}.{b}", f"stage{s}", b == blocks - 1), h)
    if spec.preact and spec.final_norm:
      # Pre-activation blocks end on an un-normalised sum.
      h = taps("final", act(batch_norm(train, self.dtype, spec.bn_decay)(h)))
    return classify(taps, jnp.mean(h, axis=(1, 2)), self.num_classes,
                    self.dtype, zero_init=self.zero_logits)


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

  Attributes:
    final_norm: the final BN-ReLU (False: pooling reads the last block's sum,
      as RobustBench's ``PreActResNet18()``, which has no tap ``final``).
    projection_input: what a projection shortcut reads: 'activated' (the
      block's BN-ReLU) or 'raw' (its input, as RobustBench's ``PreActBlock``).
  """
  final_norm: bool = True
  projection_input: str = "activated"

  @property
  def spec(self) -> ResidualSpec:
    return ResidualSpec(64, (64, 128, 256, 512), (1, 2, 2, 2), 2, preact=True,
                        final_norm=self.final_norm, projection_input=self.projection_input)


@register("resnet50")
class ResNet50(ResidualNetwork):
  """ResNet-50 (He et al. 2016) as torchvision builds it, for ImageNet-size inputs.

  7x7 stride-2 stem convolution (64) + BN + ReLU + 3x3 stride-2 max-pool,
  four stages of 3, 4, 6, 3 :class:`Bottleneck` blocks (256, 512, 1024, 2048
  channels out, strides 1, 2, 2, 2, the stride on the 3x3 convolution),
  global average pooling, one linear layer; 25.56M parameters for 1000
  classes. Tap points at 224x224: ``stem`` (N, 56, 56, 64) after the
  max-pool, ``stage{s}.{b}`` (N, 56, 56, 256) ... (N, 7, 7, 2048) with the
  last block of a stage also ``stage{s}``, ``penultimate`` (N, 2048).
  """
  spec: ClassVar[ResidualSpec] = ResidualSpec(
      64, (256, 512, 1024, 2048), (1, 2, 2, 2), (3, 4, 6, 3), preact=False,
      bottleneck=True, imagenet_stem=True)
