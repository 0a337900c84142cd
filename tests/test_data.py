"""Specification of jaxdef.data: sources, deterministic batches, sharding, augmentation.

The TFDS path is checked offline twice: through ``tfds.testing.mock_data``
(the public ``load_dataset`` for cifar10/mnist with fake records), and on real
ArrayRecord files that a tiny in-test TFDS builder writes to a tmp dir
(``prepare``, the "not prepared" error, PIL decoding of the stored PNGs).
"""

import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdef.data import (Dataset, augment_batch, check_last_batch, dataset_names,
                         epoch_permutation,
                         eval_batches, load_dataset, random_crop_flip, shard_batch,
                         steps_per_epoch, to_float, train_batch_indices)
from jaxdef.data import prepare as prepare_lib
from jaxdef.data import tfds_source
from jaxdef.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**fields):
  return ml_collections.ConfigDict({"name": "mnist5k", "augment": "none", **fields})


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
  return load_dataset(data_config())


@pytest.fixture(scope="module")
def batch_sharding() -> NamedSharding:
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  return NamedSharding(mesh, PartitionSpec("data"))


def write_npz(path, **overrides):
  rng = np.random.default_rng(0)
  arrays = {
      "x_train": rng.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8),
      "y_train": rng.integers(0, 4, (20,)).astype(np.int64),
      "x_test": rng.integers(0, 256, (7, 8, 6, 3), dtype=np.uint8),
      "y_test": np.array([0, 1, 2, 3, 4, 0, 1]),
  }
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return arrays


# --- mnist5k ---------------------------------------------------------------


def test_mnist5k_has_4000_train_and_1000_test_uint8_nhwc_images(mnist5k):
  chex.assert_shape(mnist5k.x_train, (4000, 28, 28, 1))
  chex.assert_shape(mnist5k.x_test, (1000, 28, 28, 1))
  chex.assert_shape(mnist5k.y_train, (4000,))
  chex.assert_shape(mnist5k.y_test, (1000,))
  assert mnist5k.x_train.dtype == mnist5k.x_test.dtype == np.uint8
  assert mnist5k.y_train.dtype == mnist5k.y_test.dtype == np.int32
  assert mnist5k.image_shape == (28, 28, 1)
  assert mnist5k.num_classes == 10 and mnist5k.name == "mnist5k"


def test_mnist5k_has_400_train_and_100_test_examples_per_digit(mnist5k):
  np.testing.assert_array_equal(np.bincount(mnist5k.y_train), [400] * 10)
  np.testing.assert_array_equal(np.bincount(mnist5k.y_test), [100] * 10)
  assert mnist5k.y_train[0] == 0 and mnist5k.y_train[-1] == 9
  assert np.all(np.diff(mnist5k.y_train) >= 0)


def test_mnist5k_test_prefixes_cover_every_digit_in_a_fixed_order(mnist5k):
  """Evaluating the first N test images must not mean evaluating digits 0-4 only."""
  assert set(mnist5k.y_test[:100].tolist()) == set(range(10))
  counts = np.bincount(mnist5k.y_test[:500], minlength=10)
  assert counts.min() >= 35 and counts.max() <= 65
  again = load_dataset(data_config())
  np.testing.assert_array_equal(again.y_test, mnist5k.y_test)
  np.testing.assert_array_equal(again.x_test, mnist5k.x_test)


def test_mnist5k_mean_and_std_are_those_of_mnist(mnist5k):
  assert mnist5k.mean[0] == pytest.approx(0.1307, abs=0.01)
  assert mnist5k.std[0] == pytest.approx(0.3081, abs=0.01)
  assert mnist5k.x_train.max() == 255 and mnist5k.x_train.min() == 0


def test_max_train_and_max_test_keep_a_fixed_subset_with_every_class():
  small = load_dataset(data_config(max_train=200, max_test=50))
  again = load_dataset(data_config(max_train=200, max_test=50))
  assert len(small.x_train) == 200 and len(small.x_test) == 50
  np.testing.assert_array_equal(small.x_train, again.x_train)
  assert set(small.y_train.tolist()) == set(range(10))


# --- npz -------------------------------------------------------------------


def test_npz_round_trips_and_computes_mean_std_and_num_classes(tmp_path):
  path = tmp_path / "toy.npz"
  arrays = write_npz(path)
  ds = load_dataset(data_config(name="npz", path=str(path)))
  np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 5
  x = arrays["x_train"].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-9)


def test_npz_grayscale_images_get_a_channel_axis_and_num_classes_can_be_given(tmp_path):
  path = tmp_path / "gray.npz"
  write_npz(path, x_train=np.zeros((20, 5, 5), np.uint8), x_test=np.zeros((7, 5, 5), np.uint8))
  ds = load_dataset(data_config(name="npz", path=str(path), num_classes=12))
  assert ds.image_shape == (5, 5, 1) and ds.num_classes == 12 and len(ds.mean) == 1


def test_npz_missing_key_is_a_config_error_naming_the_key(tmp_path):
  path = tmp_path / "bad.npz"
  write_npz(path, y_test=None)
  with pytest.raises(ConfigError, match="missing key.*y_test"):
    load_dataset(data_config(name="npz", path=str(path)))


def test_npz_float_images_are_a_config_error(tmp_path):
  path = tmp_path / "float.npz"
  write_npz(path, x_train=np.zeros((20, 8, 6, 3), np.float32))
  with pytest.raises(ConfigError, match="x_train must be uint8"):
    load_dataset(data_config(name="npz", path=str(path)))


def test_npz_missing_file_is_a_config_error_naming_the_file(tmp_path):
  path = str(tmp_path / "nowhere.npz")
  with pytest.raises(ConfigError, match="not found") as info:
    load_dataset(data_config(name="npz", path=path))
  assert path in str(info.value) and "\n" not in str(info.value)


def test_unknown_dataset_name_lists_the_valid_names():
  with pytest.raises(ConfigError) as info:
    load_dataset(data_config(name="imagenet"))
  message = str(info.value)
  assert "'imagenet'" in message
  for name in ("mnist5k", "npz", "cifar10", "cifar100", "svhn_cropped", "mnist",
               "fashion_mnist"):
    assert name in message and name in dataset_names()


def test_unknown_augmentation_is_a_config_error_before_loading():
  with pytest.raises(ConfigError, match="unknown augmentation 'flip'"):
    load_dataset(data_config(augment="flip"))


# --- TFDS ------------------------------------------------------------------


def test_tfds_cifar10_loads_offline_through_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    ds = load_dataset(data_config(name="cifar10", data_dir=str(tmp_path), max_test=4))
  chex.assert_shape(ds.x_train, (6, 32, 32, 3))
  chex.assert_shape(ds.x_test, (4, 32, 32, 3))
  assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10 and ds.mean == tfds_source.SPECS["cifar10"].mean
  assert 0 <= ds.y_train.min() and ds.y_train.max() < 10


def test_tfds_mnist_loads_offline_through_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=3):
    ds = load_dataset(data_config(name="mnist", data_dir=str(tmp_path)))
  assert ds.image_shape == (28, 28, 1) and len(ds.mean) == 1


def test_tfds_dataset_not_prepared_is_a_one_line_error_with_the_prepare_command(tmp_path):
  with pytest.raises(ConfigError) as info:
    load_dataset(data_config(name="svhn_cropped", data_dir=str(tmp_path)))
  message = str(info.value)
  assert "not prepared" in message and "\n" not in message
  assert (f"python -m jaxdef.data.prepare --dataset svhn_cropped --data_dir {tmp_path}"
          in message)
  assert not any(tmp_path.iterdir()), "checking must not download or write anything"


def _tiny_builder_cls():
  """A registered TFDS builder with no downloads: 12 train and 5 test 8x8x3 images.

  Image i of a split is filled with ``offset + i`` and labelled ``i % 3``, so
  a read record can be checked on its own (TFDS shuffles record order).
  """
  import tensorflow_datasets as tfds
  from PIL import Image

  existing = getattr(_tiny_builder_cls, "cls", None)
  if existing is not None:
    return existing

  class JaxdefTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(0, 12), "test": self._generate_examples(100, 5)}

    def _generate_examples(self, offset, count):
      for i in range(count):
        # PIL images are stored as PNG without TensorFlow (numpy images need it).
        yield i, {"image": Image.fromarray(np.full((8, 8, 3), offset + i, np.uint8)),
                  "label": i % 3}

  _tiny_builder_cls.cls = JaxdefTinyImages
  return JaxdefTinyImages


def test_tfds_reads_real_array_record_files_prepared_offline(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("PIL")
  _tiny_builder_cls()
  name, spec = "jaxdef_tiny_images", tfds_source.TfdsSpec(3, (0.5,) * 3, (0.25,) * 3)
  with pytest.raises(ConfigError, match="not prepared"):
    tfds_source.load_tfds(name, spec, data_dir=str(tmp_path))

  where = prepare_lib.prepare(name, str(tmp_path))
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(where))
  ds = tfds_source.load_tfds(name, spec, data_dir=str(tmp_path), progress=False)
  chex.assert_shape(ds.x_train, (12, 8, 8, 3))
  chex.assert_shape(ds.x_test, (5, 8, 8, 3))
  np.testing.assert_array_equal(np.sort(ds.x_train[:, 0, 0, 0]), np.arange(12))
  np.testing.assert_array_equal(np.sort(ds.x_test[:, 0, 0, 0]), 100 + np.arange(5))
  np.testing.assert_array_equal(ds.y_train, ds.x_train[:, 0, 0, 0] % 3)
  assert np.all(ds.x_train == ds.x_train[:, :1, :1, :1])

  first = tfds_source.load_tfds(name, spec, data_dir=str(tmp_path), max_train=4, max_test=2,
                                progress=False)
  np.testing.assert_array_equal(first.x_train, ds.x_train[:4])
  assert len(first.x_test) == 2


def test_loading_mnist5k_imports_neither_tensorflow_nor_tfds():
  code = ("import sys, ml_collections; from jaxdef.data import load_dataset; "
          "load_dataset(ml_collections.ConfigDict({'name': 'mnist5k'})); "
          "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, timeout=60)
  assert out.stdout.strip() == "[]"


# --- batches ---------------------------------------------------------------


def test_epoch_permutation_is_deterministic_and_differs_across_epochs():
  first = epoch_permutation(1000, seed=3, epoch=0)
  np.testing.assert_array_equal(first, epoch_permutation(1000, seed=3, epoch=0))
  np.testing.assert_array_equal(np.sort(first), np.arange(1000))
  assert not np.array_equal(first, epoch_permutation(1000, seed=3, epoch=1))
  assert not np.array_equal(first, epoch_permutation(1000, seed=4, epoch=0))


def test_train_batch_indices_of_a_resumed_run_equal_those_of_an_uninterrupted_run():
  num, batch, seed = 103, 10, 7
  run = [train_batch_indices(num, batch, seed, step) for step in range(35)]
  epoch_permutation(num, seed=99, epoch=5)  # Whatever was computed before must not matter.
  for step in (0, 9, 10, 23, 34):
    np.testing.assert_array_equal(train_batch_indices(num, batch, seed, step), run[step])


def test_train_batches_of_an_epoch_cover_distinct_examples_and_drop_the_remainder():
  num, batch = 103, 10
  assert steps_per_epoch(num, batch) == 10
  epoch0 = np.concatenate([train_batch_indices(num, batch, 0, s) for s in range(10)])
  assert len(set(epoch0.tolist())) == 100
  np.testing.assert_array_equal(epoch0, epoch_permutation(num, 0, 0)[:100])
  np.testing.assert_array_equal(train_batch_indices(num, batch, 0, 10),
                                epoch_permutation(num, 0, 1)[:10])


def test_batch_larger_than_the_dataset_is_a_config_error():
  with pytest.raises(ConfigError, match="global batch 64 is larger than the 10"):
    train_batch_indices(10, 64, 0, 0)


def test_a_kept_last_batch_shows_every_example_exactly_once_per_epoch():
  """data.keep_last_batch: ceil(N / B) steps, the last one the N % B remaining
  examples of the epoch's permutation; the next step starts the next epoch."""
  num, batch, seed = 103, 10, 5
  assert steps_per_epoch(num, batch, keep_last=True) == 11
  assert steps_per_epoch(100, 10, keep_last=True) == 10  # no remainder: no extra step
  for epoch in (0, 1):
    batches = [train_batch_indices(num, batch, seed, epoch * 11 + s, keep_last=True)
               for s in range(11)]
    assert [len(b) for b in batches] == [10] * 10 + [3]
    seen = np.concatenate(batches)
    np.testing.assert_array_equal(np.sort(seen), np.arange(num))  # each once
    np.testing.assert_array_equal(seen, epoch_permutation(num, seed, epoch))
  # The default is unchanged: full batches, the remainder dropped.
  assert steps_per_epoch(num, batch) == 10 and len(train_batch_indices(num, batch, 0, 10)) == 10


def test_a_kept_last_batch_that_does_not_split_over_the_devices_is_a_one_line_error():
  check_last_batch(104, 10, 2)  # 4 left: 2 per device
  check_last_batch(100, 10, 8)  # nothing left
  with pytest.raises(ConfigError, match="103 % 10 = 3 examples.*2 devices") as err:
    check_last_batch(103, 10, 2)
  assert "\n" not in str(err.value) and "keep_last_batch" in str(err.value)


def _tiny_kept_last_batch(**overrides):
  # 56 training digits in batches of 16: 3 full batches and one of 8 per epoch.
  from conftest import tiny_config
  return tiny_config(**{"data.max_train": 56, "data.keep_last_batch": True,
                        "train.checkpoint_every_steps": 100, **overrides})


def test_training_with_a_kept_last_batch_runs_its_smaller_step(tmp_path):
  """The jitted step sees a second batch shape at the end of each epoch."""
  from jaxdef.train import loop
  summary = loop.train_and_evaluate(_tiny_kept_last_batch(), str(tmp_path), progress=False)
  assert summary["steps"] == 8 and summary["epochs"] == 2
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in records if r.get("split") == "test"] == [1.0, 2.0]


def test_training_refuses_a_kept_last_batch_the_devices_cannot_split(tmp_path, monkeypatch):
  from jaxdef.train import loop
  # As if on 8 devices (the mesh is not built): 56 % 16 = 8 would split, 52 % 16 = 4 not.
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  monkeypatch.setattr(loop, "data_mesh", lambda: None)
  with pytest.raises(ConfigError, match="52 % 16 = 4 examples, which do not split over 8"):
    loop.prepare(_tiny_kept_last_batch(**{"data.max_train": 52}))


def test_shard_batch_returns_uint8_arrays_with_the_requested_sharding(mnist5k, batch_sharding):
  indices = train_batch_indices(len(mnist5k.x_train), 8, 0, 3)
  x, y = shard_batch(mnist5k.x_train, mnist5k.y_train, indices, batch_sharding)
  chex.assert_shape(x, (8, 28, 28, 1))
  assert x.dtype == jnp.uint8 and y.dtype == jnp.int32
  assert x.sharding.is_equivalent_to(batch_sharding, x.ndim)
  assert y.sharding.is_equivalent_to(batch_sharding, y.ndim)
  np.testing.assert_array_equal(np.asarray(x), mnist5k.x_train[indices])
  np.testing.assert_array_equal(np.asarray(y), mnist5k.y_train[indices])


def test_eval_batches_pad_the_last_batch_and_mask_counts_equal_the_split_size(
    mnist5k, batch_sharding):
  x_test, y_test = mnist5k.x_test[:250], mnist5k.y_test[:250]
  batches = list(eval_batches(x_test, y_test, 64, batch_sharding))
  assert len(batches) == 4
  masks = np.concatenate([np.asarray(m) for _, _, m in batches])
  assert masks.dtype == bool and masks.sum() == 250 and masks[:250].all()
  labels = np.concatenate([np.asarray(y) for _, y, _ in batches])
  np.testing.assert_array_equal(labels[masks], y_test)
  assert all(x.shape == (64, 28, 28, 1) for x, _, _ in batches)
  assert batches[-1][2].sharding.is_equivalent_to(batch_sharding, 1)


# --- augmentation ----------------------------------------------------------


# Jitted once: eager dispatch of the per-offset selects is slower than compiling.
crop_flip = jax.jit(random_crop_flip, static_argnames=("pad", "flip"))


def _images(n=6, h=8, w=8, c=3):
  return jnp.asarray(np.random.default_rng(1).integers(1, 256, (n, h, w, c), dtype=np.uint8))


def test_to_float_maps_uint8_to_unit_interval():
  out = to_float(jnp.array([0, 51, 255], jnp.uint8))
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(out, jnp.array([0.0, 0.2, 1.0]))


def test_random_crop_flip_keeps_shape_and_dtype_and_is_deterministic_per_key():
  x = _images()
  out = crop_flip(jax.random.key(0), x)
  chex.assert_shape(out, x.shape)
  assert out.dtype == x.dtype
  chex.assert_trees_all_equal(out, crop_flip(jax.random.key(0), x))
  assert not np.array_equal(out, crop_flip(jax.random.key(1), x))


def test_random_crop_flip_without_pad_or_flip_is_the_identity():
  x = _images()
  chex.assert_trees_all_equal(crop_flip(jax.random.key(0), x, pad=0, flip=False), x)


def test_random_crop_flip_with_pad_zero_only_flips_some_examples_left_right():
  x = np.asarray(_images(n=32))
  out = np.asarray(crop_flip(jax.random.key(0), jnp.asarray(x), pad=0))
  same = np.all(out == x, axis=(1, 2, 3))
  flipped = np.all(out == x[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | flipped) and same.any() and flipped.any()


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
  x = np.asarray(_images(n=16))
  pad, h, w = 4, 8, 8
  out = np.asarray(crop_flip(jax.random.key(2), jnp.asarray(x), pad=pad, flip=False))
  padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for i in range(len(x)):
    matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
               if np.array_equal(out[i], padded[i, dy:dy + h, dx:dx + w])]
    assert matches, f"example {i} is not a window of its padded image"
    offsets.add(matches[0])
  assert len(offsets) > 1


def test_augment_batch_dispatches_on_a_static_kind_under_jit():
  x = _images()
  augment = jax.jit(augment_batch, static_argnames="kind")
  chex.assert_trees_all_equal(augment(jax.random.key(0), x, "none"), x)
  chex.assert_trees_all_equal(augment(jax.random.key(0), x, kind="crop_flip"),
                              crop_flip(jax.random.key(0), x))
  with pytest.raises(ConfigError, match="valid: crop_flip, none"):
    augment_batch(jax.random.key(0), x, "mixup")


# --- four host devices (subprocess) ----------------------------------------

_FOUR_DEVICES = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxdef.data import augment_batch, eval_batches, shard_batch, to_float
    from jaxdef.errors import ConfigError

    mesh = jax.make_mesh((4,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    x = np.arange(20 * 2 * 2 * 1, dtype=np.uint8).reshape(20, 2, 2, 1)
    y = np.arange(20, dtype=np.int32)
    indices = np.array([5, 3, 19, 0, 7, 7, 12, 1])
    xb, yb = shard_batch(x, y, indices, sharding)
    shards = sorted(yb.addressable_shards, key=lambda s: s.index[0].start)
    result = {
        "devices": len(jax.devices()),
        "label_shards": [np.asarray(s.data).tolist() for s in shards],
        "image_shard_devices": len({s.device for s in xb.addressable_shards}),
        "images_ok": bool(np.array_equal(np.asarray(xb), x[indices])),
        "mask_sums": [int(np.asarray(m).sum()) for _, _, m in eval_batches(x, y, 8, sharding)],
    }
    augmented = jax.jit(lambda k, v: to_float(augment_batch(k, v, "crop_flip")))(
        jax.random.key(0), xb)
    auto_mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    auto_sharding = NamedSharding(auto_mesh, PartitionSpec("data"))
    xa, _ = shard_batch(x, y, indices, auto_sharding)
    augmented_auto = jax.jit(lambda k, v: to_float(augment_batch(k, v, "crop_flip")))(
        jax.random.key(0), xa)
    result["augmented_sharded"] = [augmented.sharding.is_equivalent_to(sharding, 4),
                                   augmented_auto.sharding.is_equivalent_to(auto_sharding, 4)]
    try:
        shard_batch(x, y, np.arange(6), sharding)
    except ConfigError as e:
        result["error"] = str(e)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_shard_batch_splits_the_batch_in_order_across_four_devices(four_devices):
  assert four_devices["devices"] == 4 and four_devices["image_shard_devices"] == 4
  assert four_devices["label_shards"] == [[5, 3], [19, 0], [7, 7], [12, 1]]
  assert four_devices["images_ok"]


def test_eval_batches_masks_count_the_split_on_four_devices(four_devices):
  assert four_devices["mask_sums"] == [8, 8, 4]


def test_augmentation_keeps_the_batch_sharding_on_explicit_and_auto_meshes(four_devices):
  assert four_devices["augmented_sharded"] == [True, True]


def test_batch_not_divisible_by_the_devices_is_a_config_error_naming_both(four_devices):
  assert "global batch 6 is not divisible by the 4 devices" in four_devices["error"]
