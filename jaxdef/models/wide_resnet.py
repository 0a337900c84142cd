"""Wide residual networks WRN-depth-width (Zagoruyko & Komodakis 2016).

The CIFAR WRN used by TRADES, MART, CAS and FSR: a 3x3 stem convolution of
16 channels, three stages of ``(depth - 4) / 6`` pre-activation wide blocks
(:class:`~jaxdef.models.resnet.PreActBlock`) with 16w, 32w, 64w channels and
strides 1, 2, 2, a final BN-ReLU, global average pooling and one linear
layer. Dropout inside the blocks is left out: the robust-training recipes
run with a drop rate of 0. WRN-34-10 has 46.16M parameters for 10 classes;
WRN-28-10 and WRN-70-16 are ``depth``/``width`` settings. The DeepMind form
(:class:`DMWideResNet`, ``dm_wide_resnet``) differs in its activation and
the padding of its strided convolutions; it has the same tap points.

Tap points (shapes at 32x32 input for WRN-34-10, N images; with ``n``
blocks per stage and width ``w`` in general):

* ``stem`` (N, 32, 32, 16): the bare stem convolution.
* ``stage{s}.{b}`` (s = 1..3, b = 0..n-1): block outputs, (N, 32, 32, 160),
  (N, 16, 16, 320), (N, 8, 8, 640) for s = 1..3. The last block of a stage
  is also called ``stage{s}``.
* ``final`` (N, 8, 8, 640): the last BN-ReLU, where FSR is placed.
* ``penultimate`` (N, 640): the globally average-pooled features.
"""

from __future__ import annotations

from typing import ClassVar

from jaxdef.errors import ConfigError
from jaxdef.models.registry import register
from jaxdef.models.resnet import ResidualNetwork, ResidualSpec


@register("wide_resnet")
class WideResNet(ResidualNetwork):
  """WRN-``depth``-``width``; see the module docstring.

  Attributes:
    depth: total depth, ``6 n + 4`` for ``n`` blocks per stage (34: n = 5).
    width: widening factor ``w`` (channels 16w, 32w, 64w).
    activation: 'relu' or 'swish'.
    bn_decay: the BatchNorm running statistics' decay: 0.9 (PyTorch's
      momentum 0.1, the TRADES/MART/CAS/FSR WRNs), 0.99 (momentum 0.01, the
      DeepMind and Wang et al. 2023 WRNs).
  """
  depth: int = 34
  width: int = 10
  activation: str = "relu"
  bn_decay: float = 0.9
  downsample_padding: ClassVar[str] = "torch"

  def __post_init__(self):
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ConfigError(f"wide_resnet depth must be 6n + 4 with n >= 1, "
                        f"got {self.depth} (e.g. 16, 28, 34, 70)")
    if self.width < 1:
      raise ConfigError(f"wide_resnet width must be >= 1, got {self.width}")
    if not 0.0 <= self.bn_decay < 1.0:
      raise ConfigError(f"wide_resnet bn_decay must be in [0, 1) (Flax's BatchNorm "
                        f"momentum; PyTorch's momentum m is 1 - m), got {self.bn_decay}")
    super().__post_init__()

  @property
  def spec(self) -> ResidualSpec:
    w = self.width
    return ResidualSpec(16, (16 * w, 32 * w, 64 * w), (1, 2, 2),
                        (self.depth - 4) // 6, preact=True, activation=self.activation,
                        downsample_padding=self.downsample_padding, bn_decay=self.bn_decay)



@register("dm_wide_resnet")
class DMWideResNet(WideResNet):
  """The DeepMind WRN-``depth``-``width`` (Gowal et al. 2020, Rebuffi et al. 2021).

  As :class:`WideResNet` with swish (SiLU) by default and stride-2
  convolutions padded one row and column after the input only (TensorFlow's
  SAME, which the DeepMind models were trained with); the input
  normalisation is the model's ``mean``/``std`` as for every jaxdef model.
  WRN-28-10 has 36.48M parameters and WRN-70-16 266.8M for 10 classes.
  """
  depth: int = 28
  width: int = 10
  activation: str = "swish"
  downsample_padding: ClassVar[str] = "same"


@register("wrn34_10")
def wrn34_10(**kwargs) -> WideResNet:
  """WRN-34-10, the usual CIFAR robustness benchmark network."""
  return WideResNet(depth=34, width=10, **kwargs)
