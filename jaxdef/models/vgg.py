"""VGG-16 with BatchNorm (Simonyan & Zisserman 2015), CIFAR style.

Five groups of 3x3 convolutions, each followed by BN and ReLU, with 2x2
max-pooling after every group: [64, 64], [128, 128], [256, 256, 256],
[512, 512, 512], [512, 512, 512]. The ImageNet model's three fully
connected layers are replaced, as in the CIFAR robustness literature (CAS,
FSR), by a single linear layer on the flattened final map, which is 1x1x512
for a 32x32 input. The convolutions have no bias (BN follows), so there are
14.72M parameters for 10 classes.

Tap points (shapes at 32x32 input, N images):

* ``block{g}.conv{c}`` (g = 1..5, c = 0..1 for g <= 2, 0..2 otherwise):
  each convolution after its BN-ReLU, (N, 32, 32, 64), (N, 16, 16, 128),
  (N, 8, 8, 256), (N, 4, 4, 512), (N, 2, 2, 512) for g = 1..5.
* ``block{g}``: alias of the group's last convolution (before pooling).
* ``penultimate`` (N, 512): the flattened last pooled map.
"""

from __future__ import annotations

import flax.linen as nn

from jaxdef.models.base import Array, ModelOutput, Normalize, Taps
from jaxdef.models.layers import (Classifier, batch_norm, classify, conv,
                                  tap_names)
from jaxdef.models.registry import register

VGG16_GROUPS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                (512, 512, 512))


@register("vgg16")
class VGG16(Classifier):
  """VGG-16-BN with a linear classifier; see the module docstring."""

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               labels: Array | None = None) -> ModelOutput:
    taps = Taps(self, self.insert, train, labels)
    h = Normalize(self.mean, self.std)(x)
    for g, widths in enumerate(VGG16_GROUPS, start=1):
      for c, width in enumerate(widths):
        h = conv(width, 3, dtype=self.dtype)(h)
        h = nn.relu(batch_norm(train, self.dtype)(h))
        h = taps(tap_names(f"block{g}.conv{c}", f"block{g}",
                           c == len(widths) - 1), h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    return classify(taps, h.reshape(h.shape[0], -1), self.num_classes,
                    self.dtype)
