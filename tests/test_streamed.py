"""The streamed source: the same batches as in memory, exact resume, mixing, host crops.

Every dataset here is written by the test (random uint8 images, or the
embedded MNIST subset) into a temporary folder in the imported-dataset
format of :mod:`jaxdef.data.records`.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdef import checkpoint as ckpt
from jaxdef.data import records
from jaxdef.data.augment import center_crop, random_resized_crop, rrc_window
from jaxdef.data.dataset import Dataset, channel_mean_std, load_dataset
from jaxdef.data.mixing import EXTRA, REAL, BatchPlan
from jaxdef.data.pipeline import train_batch_indices
from jaxdef.data.streamed import LocalBatches, RecordRows, in_memory_train_data, train_data
from jaxdef.errors import ConfigError
from jaxdef.objectives import create_objective


def write_folder(dest, splits: dict, num_classes: int, encoding: str = "raw") -> str:
  """An imported-dataset folder holding ``splits`` ({name: (images, labels)})."""
  os.makedirs(dest, exist_ok=True)
  metas = {}
  for name, (x, y) in splits.items():
    with records.SplitWriter(str(dest), name, shards=2, expected=len(y),
                             num_classes=num_classes) as writer:
      for image, label in zip(x, y):
        writer.write(records.encode_record(image, int(label), encoding=encoding), int(label))
      metas[name] = writer.finish()
  pixels = np.concatenate([np.reshape(im, (-1, np.shape(im)[-1])) for im in splits["train"][0]])
  mean, std = channel_mean_std(pixels[None, None])
  shapes = {tuple(im.shape) for x, _ in splits.values() for im in x}
  channels = next(iter(shapes))[-1]
  records.write_metadata(str(dest), records.RecordsMeta(
      format=records.FORMAT, version=records.VERSION, num_classes=num_classes,
      class_names=tuple(str(i) for i in range(num_classes)),
      image_shape=shapes.pop() if len(shapes) == 1 else None, channels=channels,
      mean=mean, std=std, splits=metas, skipped=(), source={"format": "test", "path": ""},
      created="2026-01-01T00:00:00Z"))
  return str(dest)


def random_images(seed: int, n: int, shape=(8, 8, 3), classes: int = 4):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
          rng.integers(0, classes, n).astype(np.int32))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A real set (60 train, 12 test) and an extra set (90), 8x8x3, 4 classes."""
  root = tmp_path_factory.mktemp("data")
  train, test, extra = random_images(0, 60), random_images(1, 12), random_images(2, 90)
  real = write_folder(root / "real", {"train": train, "test": test}, 4)
  more = write_folder(root / "extra", {"train": extra}, 4)
  dataset = Dataset("real", *train, *test, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
  return real, more, dataset, extra


@pytest.fixture(scope="module")
def sharding():
  return NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)),
                       PartitionSpec("data"))


def data_config(path, **fields):
  return ml_collections.ConfigDict({
      "name": "arrayrecord", "path": path, "augment": "crop_flip", "max_train": 0,
      "max_test": 0, "val_size": 0, "streamed": None, "workers": 0, "image_size": 0,
      "extra": {"path": ""}, "extra_fraction": 0.0, "extra_label_smoothing": 0.0,
      **fields})


def host_batches(data, start, stop, sharding):
  batches = data.batches(start, stop, sharding)
  out = [(np.asarray(x), np.asarray(y)) for x, y in batches]
  batches.close()
  return out


@pytest.mark.parametrize("fields", [
    {},
    {"extra_fraction": 0.7},
    {"extra_fraction": 0.5, "augment": "rrc_flip", "image_size": 6},
], ids=["plain", "mixed", "mixed_rrc"])
def test_streamed_and_in_memory_sources_give_the_same_batches(folders, sharding, fields):
  real, more, dataset, _ = folders
  fields = {**fields, "extra": {"path": more if fields else ""}}
  streamed, _ = train_data(data_config(real, **fields), seed=5, global_batch=10)
  in_memory, _ = train_data(data_config(real, streamed=False, **fields), seed=5,
                            global_batch=10, dataset=dataset)
  assert streamed.streamed and not in_memory.streamed
  assert streamed.steps_per_epoch == in_memory.steps_per_epoch
  steps = 2 * streamed.steps_per_epoch + 1  # crosses two epoch boundaries
  a = host_batches(streamed, 0, steps, sharding)
  b = host_batches(in_memory, 0, steps, sharding)
  assert len(a) == len(b) == steps
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  if not fields.get("extra_fraction"):
    # The one index function of the in-memory path names these examples.
    for step, (x, y) in enumerate(a):
      idx = train_batch_indices(60, 10, 5, step)
      np.testing.assert_array_equal(x, dataset.x_train[idx])
      np.testing.assert_array_equal(y, dataset.y_train[idx])


def test_grain_worker_processes_give_the_batches_of_the_training_process(folders, sharding):
  real, more, _, _ = folders
  fields = dict(extra={"path": more}, extra_fraction=0.5, augment="rrc_flip", image_size=6)
  inline, _ = train_data(data_config(real, **fields), seed=1, global_batch=10)
  workers, _ = train_data(data_config(real, workers=2, **fields), seed=1, global_batch=10)
  for (xa, ya), (xb, yb) in zip(host_batches(inline, 3, 9, sharding),
                                host_batches(workers, 3, 9, sharding)):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(folders):
  real, more, _, _ = folders
  plan = BatchPlan(num_real=60, global_batch=10, seed=3, num_extra=90, extra_fraction=0.5)
  sources = (RecordRows(records.split_files(records.read_metadata(real), real, "train"), 60),
             RecordRows(records.split_files(records.read_metadata(more), more, "train"), 90))

  def rows_of(first, stop):
    return LocalBatches(plan, sources, {10: (first, stop)}, (6, 6, 3), "rrc_flip", seed=3)

  single, halves = rows_of(0, 10), (rows_of(0, 5), rows_of(5, 10))
  seen_real = []
  for step in range(plan.steps_per_epoch):
    whole = single(step)
    parts = [half(step) for half in halves]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    source, index = plan.batch(step)
    first, second = index[:5][source[:5] == REAL], index[5:][source[5:] == REAL]
    assert not set(first) & set(second)
    seen_real += list(first) + list(second)
  # Over an epoch the two processes' real rows never repeat an example.
  assert len(seen_real) == len(set(seen_real)) == plan.steps_per_epoch * plan.real_per_batch


@pytest.mark.parametrize("batch, fraction, shards", [(20, 0.7, 4), (40, 0.7, 4), (64, 0.7, 8)])
def test_mixed_batches_have_the_exact_composition_on_every_shard(batch, fraction, shards):
  plan = BatchPlan(num_real=1000, global_batch=batch, seed=0, num_extra=5000,
                   extra_fraction=fraction)
  extra_count = round(fraction * batch)
  assert plan.extra_per_batch == extra_count and plan.real_per_batch == batch - extra_count
  assert plan.steps_per_epoch == 1000 // plan.real_per_batch
  per_shard = batch // shards
  real_epoch = []
  for step in range(plan.steps_per_epoch):
    source, index = plan.batch(step)
    assert (source == EXTRA).sum() == extra_count
    np.testing.assert_array_equal(source == EXTRA, plan.extra_rows())  # same rows every step
    counts = (source.reshape(shards, per_shard) == REAL).sum(axis=1)
    assert counts.max() - counts.min() <= 1
    if plan.real_per_batch % shards == 0:
      assert (counts == plan.real_per_batch // shards).all()
    assert ((index[source == EXTRA] >= 0) & (index[source == EXTRA] < 5000)).all()
    real_epoch += list(index[source == REAL])
  assert len(set(real_epoch)) == len(real_epoch)  # without replacement within the epoch
  # The extra draws depend on (seed, step) alone, not on the real split's size.
  other = BatchPlan(num_real=700, global_batch=batch, seed=0, num_extra=5000,
                    extra_fraction=fraction)
  np.testing.assert_array_equal(plan.batch(3)[1][plan.extra_rows()],
                                other.batch(3)[1][other.extra_rows()])
  smoothing = plan.label_smoothing(0.25)
  np.testing.assert_array_equal(smoothing, np.where(plan.extra_rows(), 0.25, 0.0))


def _smoothed_ce(logits, labels, smoothing):
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)
  k = logits.shape[-1]
  target = np.eye(k)[labels] * (1 - smoothing[:, None]) + smoothing[:, None] / k
  return -(target * logp).sum(-1)


@pytest.mark.parametrize("name", ["at", "trades", "mart"])
def test_a_smoothed_row_of_the_objective_is_the_smoothed_cross_entropy(name):
  rng = np.random.default_rng(0)
  clean, adv = rng.normal(size=(2, 6, 5)).astype(np.float32) * 3
  y = rng.integers(0, 5, 6)
  smoothing = np.array([0, 0.1, 0, 0.3, 0, 0.1], np.float32)
  objective = create_objective(name)
  out = lambda s: np.asarray(objective.outer_loss({"logits": jnp.asarray(clean)},
                                                  {"logits": jnp.asarray(adv)},
                                                  jnp.asarray(y), s))
  plain, smoothed = out(None), out(smoothing)
  np.testing.assert_allclose(smoothed[smoothing == 0], plain[smoothing == 0], rtol=1e-6)
  ce_logits = clean if name == "trades" else adv  # the objective's CE term
  zero = np.zeros_like(smoothing)
  expected = plain - _smoothed_ce(ce_logits, y, zero) + _smoothed_ce(ce_logits, y, smoothing)
  np.testing.assert_allclose(smoothed, expected, rtol=1e-5, atol=1e-5)


_EXTRA_HALF = BatchPlan(num_real=100, global_batch=8, seed=0, num_extra=50, extra_fraction=0.5)


@pytest.mark.parametrize("smoothing", [
    _EXTRA_HALF.label_smoothing(0.2),                 # data.extra_label_smoothing only
    _EXTRA_HALF.label_smoothing(0.2, every_row=0.1),  # and train.label_smoothing
    np.asarray(0.1, np.float32),                      # train.label_smoothing, no extra source
], ids=["extra_rows", "every_row_and_extra", "every_row"])
def test_the_train_step_smooths_each_row_by_its_value(smoothing):
  from conftest import tiny_config
  from jaxdef.build import DataMeta, build
  from jaxdef.train.state import init_train_state, make_optimizer
  from jaxdef.train.step import AttackBudget, make_train_step
  config = tiny_config(**{"data.augment": "none"})
  meta = DataMeta("t", 10, (28, 28, 1), (0.5,), (0.25,))
  model, objective, defense = build(config, meta)
  tx = make_optimizer(config.train.optimizer, 10, 5)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=meta.image_shape)
  x = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
  y = np.arange(8, dtype=np.int32)
  # A budget of (almost) nothing: the adversarial input is the clean one.
  budget = AttackBudget(eps=1e-9, step_size=1e-9, steps=1)
  step = make_train_step(model=model, tx=tx, objective=objective, defense=defense,
                         budget=budget, augment="none", ema_decay=0.0, seed=0,
                         label_smoothing=smoothing)
  _, metrics = jax.jit(step)(state, x, y)
  logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          jnp.asarray(x, jnp.float32) / 255, train=True,
                          mutable=["batch_stats"])
  rows = np.broadcast_to(smoothing, (8,))
  expected = _smoothed_ce(np.asarray(logits["logits"]), y, rows).mean()
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_random_resized_crop_is_deterministic_and_sized_for_any_input():
  for shape in [(37, 53, 3), (300, 200, 1), (8, 8, 3), (5, 400, 3)]:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for seed in range(20):
      a = random_resized_crop(image, np.random.default_rng(seed), 24)
      b = random_resized_crop(image, np.random.default_rng(seed), 24)
      chex.assert_shape(a, (24, 24, shape[-1]))
      assert a.dtype == np.uint8
      np.testing.assert_array_equal(a, b)
      chex.assert_shape(center_crop(image, 24), (24, 24, shape[-1]))
  # Windows that fit follow the Inception crop's area and aspect-ratio ranges.
  for seed in range(200):
    top, left, h, w = rrc_window(120, 160, np.random.default_rng(seed))
    assert 0 <= top <= 120 - h and 0 <= left <= 160 - w
    assert 0.08 * 0.9 <= h * w / (120 * 160) <= 1.0
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # A window that never fits (an extreme strip) falls back to a central crop.
  assert rrc_window(4, 400, np.random.default_rng(0)) == (0, 197, 4, 5)


def test_the_evaluation_crop_resizes_the_shorter_side_then_takes_the_centre():
  image = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)
  np.testing.assert_array_equal(center_crop(image, 224), image[16:240, 48:272])
  small = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  chex.assert_shape(center_crop(small, 28), (28, 28, 3))  # 16 px -> 32 -> centre 28


def test_host_crops_are_keyed_by_step_and_row_not_by_the_process(folders):
  real, _, _, _ = folders
  plan = BatchPlan(num_real=60, global_batch=10, seed=7)
  source = (RecordRows(records.split_files(records.read_metadata(real), real, "train"), 60),)
  whole = LocalBatches(plan, source, {10: (0, 10)}, (5, 5, 3), "rrc_flip", seed=7)
  tail = LocalBatches(plan, source, {10: (4, 10)}, (5, 5, 3), "rrc_flip", seed=7)
  np.testing.assert_array_equal(whole(2)[0][4:], tail(2)[0])
  assert not np.array_equal(whole(2)[0], whole(3)[0])


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory):
  data = load_dataset(ml_collections.ConfigDict({"name": "mnist5k", "augment": "none"}))
  data = data.subset(96, 32)
  root = tmp_path_factory.mktemp("mnist")
  real = write_folder(root / "real", {"train": (data.x_train[:64], data.y_train[:64]),
                                      "test": (data.x_test, data.y_test)}, 10)
  extra = write_folder(root / "extra", {"train": (data.x_train[64:], data.y_train[64:])}, 10)
  return real, extra


def test_a_killed_streamed_run_resumes_mid_epoch_with_the_uninterrupted_batches(
    mnist_folder, tmp_path):
  from conftest import latest_checkpoint, tiny_config
  from jaxdef.train.loop import train_and_evaluate
  real, extra = mnist_folder
  # 64 real images, 8 real + 8 extra rows per batch: 8 steps per epoch, 1 epoch;
  # host random-resized-crop, smoothed extra labels.
  config = tiny_config(**{
      "data.name": "arrayrecord", "data.path": real, "data.max_train": 0, "data.max_test": 0,
      "data.augment": "rrc_flip", "data.image_size": 28, "data.extra.path": extra,
      "data.extra_fraction": 0.5, "data.extra_label_smoothing": 0.1,
      "attack.steps": 1, "train.epochs": 1, "train.eval_examples": 16,
      "train.eval_pgd_steps": 1})
  train_and_evaluate(config, str(tmp_path / "whole"), progress=False)
  # Dies after step 5 (checkpoints at 3 and 6): steps 4-5 are lost.
  cut = tmp_path / "cut"
  assert train_and_evaluate(config, str(cut), stop_after_steps=5,
                            progress=False) == {"stopped_at": 5}
  manager = ckpt.checkpoint_manager(str(cut), max_to_keep=3, read_only=True)
  position = ckpt.data_position(manager, 3)
  manager.close()
  assert position["step"] == 3 and position["epoch"] == 0 and position["step_in_epoch"] == 3
  assert (position["num_real"], position["num_extra"]) == (64, 32)
  # A checkpoint saved before data positions existed resumes the same way.
  meta_file = cut / "checkpoints" / "3" / "_CHECKPOINT_METADATA"
  saved = json.loads(meta_file.read_text())
  saved["custom_metadata"] = {}
  meta_file.write_text(json.dumps(saved))
  # Resumed with a Grain worker process (how the data is read may change).
  config.data.workers = 1
  train_and_evaluate(config, str(cut), progress=False)
  step_a, whole = latest_checkpoint(tmp_path / "whole")
  step_b, resumed = latest_checkpoint(cut)
  assert step_a == step_b == 8
  chex.assert_trees_all_close(resumed["params"], whole["params"], rtol=1e-6, atol=1e-7)


def test_refusals_are_one_line_config_errors(folders, mnist_folder, tmp_path):
  real, more, dataset, extra = folders
  np.savez(tmp_path / "extra.npz", image=extra[0], label=extra[1])
  mixed = BatchPlan(num_real=60, global_batch=10, seed=0, num_extra=90, extra_fraction=0.5)
  cases = [
      (lambda: train_data(data_config(real, image_size=224), seed=0, global_batch=10),
       "data.image_size=224 but .* holds 8x8 images and data.augment='crop_flip' does not "
       "resize"),
      (lambda: train_data(data_config(real, extra={"path": str(tmp_path / "extra.npz")},
                                      extra_fraction=0.5), seed=0, global_batch=10),
       "is an .npz, which the streamed path cannot read"),
      (lambda: train_data(data_config(real, extra_fraction=0.5), seed=0, global_batch=10),
       "needs an extra source"),
      (lambda: train_data(data_config(real, val_size=5), seed=0, global_batch=10),
       "data.val_size"),
      (lambda: train_data(data_config(real), seed=0, global_batch=100),
       r"train.batch_size=100 is larger than the training set \(60 examples\)"),
      (lambda: in_memory_train_data(dataset, data_config(real), seed=0, global_batch=10)
       .label_smoothing(data_config(real, extra_label_smoothing=0.1)),
       "smooths the extra source's labels"),
      (lambda: mixed.check_position({**mixed.position(4), "num_extra": 80}, "runs/x"),
       "runs/x was trained on other data \\(num_extra 80 -> 90\\)"),
  ]
  sizes = write_folder(tmp_path / "sizes", {"train": ([np.zeros((6, 6, 3), np.uint8),
                                                      np.zeros((7, 5, 3), np.uint8)], [0, 1])},
                       2)
  cases.append((lambda: train_data(data_config(sizes), seed=0, global_batch=2),
                "holds images of several sizes: train with data.augment='rrc_flip'"))
  for make, words in cases:
    with pytest.raises(ConfigError, match=words) as info:
      make()
    assert "\n" not in str(info.value)


def test_every_label_smoothed_composes_with_the_extra_rows_smoothing():
  """train.label_smoothing a on every row, data.extra_label_smoothing b on the extra
  rows: real rows a, extra rows 1 - (1 - a)(1 - b), the target smoothed by a then b."""
  plan = BatchPlan(num_real=100, global_batch=10, seed=0, num_extra=50, extra_fraction=0.3)
  per_row = plan.label_smoothing(0.2, every_row=0.1)
  chex.assert_shape(per_row, (10,))
  extra = plan.extra_rows()
  assert extra.sum() == 3
  np.testing.assert_allclose(per_row[~extra], 0.1)
  np.testing.assert_allclose(per_row[extra], 1 - 0.9 * 0.8, rtol=1e-6)
  k, onehot = 10, np.eye(10)[3]
  twice = (1 - 0.2) * ((1 - 0.1) * onehot + 0.1 / k) + 0.2 / k
  np.testing.assert_allclose(twice, (1 - per_row[extra][0]) * onehot + per_row[extra][0] / k,
                             rtol=1e-6)
  np.testing.assert_array_equal(plan.label_smoothing(0.2), np.where(extra, 0.2, 0.0)
                                .astype(np.float32))


def test_train_data_smooths_every_row_with_or_without_an_extra_source(folders):
  real, extra, _, _ = folders
  plain, _ = train_data(data_config(real), seed=0, global_batch=10)
  assert plain.label_smoothing(data_config(real)) is None
  every = plain.label_smoothing(data_config(real), 0.1)
  chex.assert_shape(every, ())  # one value: fits the smaller last batch of keep_last_batch
  np.testing.assert_allclose(every, 0.1)
  config = data_config(real, extra={"path": extra}, extra_fraction=0.5,
                       extra_label_smoothing=0.2)
  mixed, _ = train_data(config, seed=0, global_batch=10)
  rows = mixed.label_smoothing(config, 0.1)
  chex.assert_shape(rows, (10,))
  np.testing.assert_allclose(rows, np.where(mixed.plan.extra_rows(), 0.28, 0.1), rtol=1e-6)
