"""Downloads a TFDS dataset and writes it as ArrayRecord (needs network).

  python -m jaxdef.data.prepare --dataset cifar10 --data_dir ~/tensorflow_datasets

Run once per dataset and data_dir; training then reads the files offline.
Encoding the images while preparing uses TensorFlow (``pip install
tensorflow-cpu``); reading them for training does not.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxdef.data.tfds_source import DEFAULT_DATA_DIR, SPECS


def prepare(name: str, data_dir: str = DEFAULT_DATA_DIR) -> str:
  """Downloads ``name`` and writes ArrayRecord files; returns their folder."""
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir))
  builder.download_and_prepare(file_format="array_record")
  return str(builder.data_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description="Download a TFDS dataset and write it as ArrayRecord (needs network).")
  parser.add_argument("--dataset", required=True, choices=sorted(SPECS))
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR)
  args = parser.parse_args(argv)
  try:
    where = prepare(args.dataset, args.data_dir)
  except ImportError as e:
    if "tensorflow" not in str(e):
      raise
    print(f"error: preparing {args.dataset} needs TensorFlow to encode images "
          f"(pip install tensorflow-cpu): {e}".replace("\n", " "), file=sys.stderr)
    return 2
  print(f"prepared {args.dataset} in {where}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
