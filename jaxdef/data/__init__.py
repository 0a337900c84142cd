"""Datasets as host numpy arrays, deterministic sharded batches, on-device augmentation.

  ds = load_dataset(config.data)                    # uint8 NHWC, int32 labels
  idx = train_batch_indices(len(ds.x_train), batch, seed, step)
  x, y = shard_batch(ds.x_train, ds.y_train, idx, sharding)
  x = to_float(augment_batch(key, x, config.data.augment))   # inside jit

  data, _ = train_data(config.data, seed=0, global_batch=128)   # in memory or streamed
  for x, y in data.batches(start_step, stop_step, sharding): ...  # the same batches
  test = eval_data(config.data, num_examples=200)   # jaxdef eval's test images, no train split
"""

from jaxdef.data.augment import augment_batch, random_crop_flip, to_float
from jaxdef.data.dataset import (AUGMENTATIONS, Dataset, dataset_names, load_dataset,  # noqa: F401
                                 split_validation)
from jaxdef.data.mixing import BatchPlan
from jaxdef.data.streamed import EvalData, TrainData, eval_data, is_streamed, train_data
from jaxdef.data.pipeline import (batch_axis_size, check_last_batch, epoch_permutation,
                                  eval_batches, shard_batch, steps_per_epoch,
                                  train_batch_indices)

__all__ = [
    "AUGMENTATIONS",
    "BatchPlan",
    "Dataset",
    "augment_batch",
    "batch_axis_size",
    "check_last_batch",
    "dataset_names",
    "EvalData",
    "eval_data",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "random_crop_flip",
    "shard_batch",
    "steps_per_epoch",
    "TrainData",
    "is_streamed",
    "to_float",
    "train_batch_indices",
    "train_data",
]
