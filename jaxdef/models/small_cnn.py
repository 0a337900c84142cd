"""The small CNN of the MNIST robustness literature (TRADES, Zhang et al. 2019).

conv3x3 32 - ReLU - conv3x3 32 - ReLU - maxpool 2 - conv3x3 64 - ReLU -
conv3x3 64 - ReLU - maxpool 2 - flatten - dense 200 - ReLU - dense 200 - ReLU
- dense num_classes. Convolutions are unpadded ('VALID') and have biases; there
is no BatchNorm (and no dropout). ``width`` multiplies every hidden width.

Tap points (N images, ``width`` 1; MNIST 28x28x1 / CIFAR 32x32x3):

* ``conv1`` (N, 26, 26, 32) / (N, 30, 30, 32), after ReLU, as all convs
* ``conv2`` (N, 24, 24, 32) / (N, 28, 28, 32)
* ``pool1`` (N, 12, 12, 32) / (N, 14, 14, 32)
* ``conv3`` (N, 10, 10, 64) / (N, 12, 12, 64)
* ``conv4`` (N, 8, 8, 64) / (N, 10, 10, 64)
* ``pool2`` (N, 4, 4, 64) / (N, 5, 5, 64)
* ``fc1`` (N, 200), after ReLU
* ``fc2`` = ``penultimate`` (N, 200), after ReLU
"""

from __future__ import annotations

import flax.linen as nn

from jaxdef.models.base import Array, ModelOutput, Normalize, Taps
from jaxdef.models.layers import Classifier, classify, conv
from jaxdef.models.registry import register


@register("small_cnn")
class SmallCNN(Classifier):
  """Four convolutions and three dense layers; see the module docstring.

  Attributes:
    width: multiplier of every hidden width (32, 64 channels; 200 units);
      fractions (e.g. 0.25) give quick test models.
  """
  width: float = 1

  def _units(self, n: int) -> int:
    return max(1, int(round(n * self.width)))

  @nn.compact
  def __call__(self, x: Array, train: bool = False,
               labels: Array | None = None) -> ModelOutput:
    # No BatchNorm or dropout here, but inserted defenses still see ``train``.
    taps = Taps(self, self.insert, train, labels)
    h = Normalize(self.mean, self.std)(x)
    for i, channels in enumerate((32, 32, 64, 64), start=1):
      h = conv(self._units(channels), 3, dtype=self.dtype, padding="VALID",
               use_bias=True)(h)
      h = taps(f"conv{i}", nn.relu(h))
      if i % 2 == 0:
        h = taps(f"pool{i // 2}", nn.max_pool(h, (2, 2), strides=(2, 2)))
    h = h.reshape(h.shape[0], -1)
    h = taps("fc1", nn.relu(nn.Dense(self._units(200), dtype=self.dtype)(h)))
    h = nn.relu(nn.Dense(self._units(200), dtype=self.dtype)(h))
    return classify(taps, h, self.num_classes, self.dtype,
                    names=("fc2", "penultimate"))
