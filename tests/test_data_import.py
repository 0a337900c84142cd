"""Specification of imported datasets: the record format (jaxdef.data.records),
``jaxdef data import`` (jaxdef.data.importer) and the in-memory ``arrayrecord``
source. Every image is made by the test (PIL writes the files); nothing is
downloaded."""

import dataclasses
import io
import json
import os

import chex
import numpy as np
import pytest
from PIL import Image

from jaxdef.data import records
from jaxdef.errors import ConfigError


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
  """``pixels`` (H, W, C) written by PIL as a PNG or JPEG file's bytes."""
  out = io.BytesIO()
  Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(out, fmt)
  return out.getvalue()


def write_records_folder(dest, splits, *, num_classes=3, shards=2):
  """A valid imported-dataset folder with raw records: ``splits`` maps a split
  name to ``(images, labels)``. Returns its metadata."""
  os.makedirs(dest)
  metas = {}
  for split, (images, labels) in splits.items():
    with records.SplitWriter(str(dest), split, shards=shards, expected=len(images),
                             num_classes=num_classes) as writer:
      for image, label in zip(images, labels):
        writer.write(records.encode_record(image, int(label)), int(label))
      metas[split] = writer.finish()
  images = splits["train"][0]
  meta = records.RecordsMeta(
      format=records.FORMAT, version=records.VERSION, num_classes=num_classes,
      class_names=tuple(f"c{i}" for i in range(num_classes)), image_shape=images.shape[1:],
      channels=images.shape[-1], mean=(0.5,) * images.shape[-1], std=(0.25,) * images.shape[-1],
      splits=metas, skipped=(), source={"format": "npz", "path": "made-by-test"},
      created="2026-01-01T00:00:00Z")
  records.write_metadata(str(dest), meta)
  return meta


def random_split(n, shape=(5, 4, 3), seed=0, num_classes=3):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
          rng.integers(0, num_classes, (n,)))


# --- the record format -----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 4, 3), (6, 2, 1)])
def test_raw_record_round_trips_exactly(shape):
  image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  decoded, label = records.decode_record(records.encode_record(image, 7))
  chex.assert_trees_all_equal(decoded, image)
  assert label == 7 and decoded.dtype == np.uint8 and decoded.flags.writeable


@pytest.mark.parametrize("channels", [1, 3])
def test_png_record_keeps_the_file_bytes_and_decodes_losslessly(channels):
  image = np.random.default_rng(2).integers(0, 256, (9, 7, channels), dtype=np.uint8)
  data = encoded(image, "PNG")
  record = records.encode_record(data, 2, encoding="png")
  assert data in record  # the original file, not re-encoded
  decoded, label = records.decode_record(record)
  chex.assert_trees_all_equal(decoded, image)
  assert label == 2


def test_jpeg_record_decodes_like_pil_at_its_stored_shape():
  image = np.random.default_rng(3).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  data = encoded(image, "JPEG")
  decoded, label = records.decode_record(records.encode_record(data, 0, encoding="jpeg"))
  chex.assert_shape(decoded, (12, 10, 3))
  chex.assert_trees_all_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
  assert label == 0


def test_encoded_record_can_be_decoded_to_a_forced_channel_count():
  gray = np.random.default_rng(4).integers(0, 256, (6, 6, 1), dtype=np.uint8)
  decoded, _ = records.decode_record(
      records.encode_record(encoded(gray, "PNG"), 1, encoding="png", channels=3))
  chex.assert_shape(decoded, (6, 6, 3))
  chex.assert_trees_all_equal(decoded, np.repeat(gray, 3, axis=-1))


@pytest.mark.parametrize("image,encoding,label", [
    (np.zeros((4, 4, 3), np.float32), "raw", 0),  # not uint8
    (np.zeros((4, 4), np.uint8), "raw", 0),  # not HWC
    (np.zeros((4, 4, 3), np.uint8), "raw", -1),  # negative label
    (np.zeros((4, 4, 3), np.uint8), "webp", 0),  # unknown encoding
])
def test_encode_record_rejects_what_it_cannot_store(image, encoding, label):
  with pytest.raises(ValueError):
    records.encode_record(image, label, encoding=encoding)


def test_encode_record_rejects_bytes_of_another_format():
  png = encoded(np.zeros((4, 4, 3), np.uint8), "PNG")
  with pytest.raises(ValueError, match="PNG data, not JPEG"):
    records.encode_record(png, 0, encoding="jpeg")


def test_split_writer_fills_shards_in_order_and_grain_reads_them(tmp_path):
  import grain
  train = random_split(11)
  meta = write_records_folder(tmp_path / "ds", {"train": train, "val": random_split(4, seed=1)},
                              shards=3)
  assert meta.splits["train"].files == tuple(records.shard_names("train", 3))
  assert meta.splits["train"].count == 11
  assert list(meta.splits["train"].class_counts) == np.bincount(train[1], minlength=3).tolist()
  source = grain.sources.ArrayRecordDataSource(
      records.split_files(meta, str(tmp_path / "ds"), "train"))
  assert len(source) == 11
  for i in range(11):
    image, label = records.decode_record(source[i])
    chex.assert_trees_all_equal(image, train[0][i])
    assert label == train[1][i]


def test_read_metadata_round_trips_and_test_falls_back_to_val(tmp_path):
  meta = write_records_folder(tmp_path / "ds", {"train": random_split(5),
                                                "val": random_split(3, seed=1)})
  assert records.read_metadata(str(tmp_path / "ds")) == meta
  files = records.split_files(meta, str(tmp_path / "ds"), "test")
  assert files == [str(tmp_path / "ds" / f) for f in meta.splits["val"].files]
  assert all(os.path.isabs(f) for f in files)
  with pytest.raises(ConfigError, match="no 'extra' split"):
    records.split_files(meta, str(tmp_path / "ds"), "extra")


def _edit_metadata(dest, edit):
  path = os.path.join(dest, records.METADATA)
  with open(path) as f:
    raw = json.load(f)
  edit(raw)
  with open(path, "w") as f:
    json.dump(raw, f)


@pytest.mark.parametrize("breakage,message", [
    (lambda d: os.remove(d / records.METADATA), "has no jaxdef_dataset.json"),
    (lambda d: (d / records.METADATA).write_text("{not json"), "unreadable"),
    (lambda d: _edit_metadata(d, lambda m: m.update(format="other")), "format 'other'"),
    (lambda d: _edit_metadata(d, lambda m: m.update(version=2)), "version 2"),
    (lambda d: _edit_metadata(d, lambda m: m.pop("splits")), "incomplete, missing splits"),
    (lambda d: _edit_metadata(d, lambda m: m.update(class_names=["a"])), "'class_names'"),
    (lambda d: _edit_metadata(d, lambda m: m.update(mean=[0.5])), "'mean'"),
    (lambda d: _edit_metadata(d, lambda m: m["splits"]["train"].update(count=99)), "'splits'"),
    (lambda d: os.remove(d / "train-00001-of-00002.array_record"),
     "train-00001-of-00002.array_record is missing"),
])
def test_read_metadata_refuses_a_missing_or_broken_dataset_in_one_line(tmp_path, breakage,
                                                                        message):
  dest = tmp_path / "ds"
  write_records_folder(dest, {"train": random_split(5)})
  breakage(dest)
  with pytest.raises(ConfigError, match=message) as error:
    records.read_metadata(str(dest))
  assert "\n" not in str(error.value)


def test_read_metadata_refuses_a_missing_folder(tmp_path):
  with pytest.raises(ConfigError, match="no such folder"):
    records.read_metadata(str(tmp_path / "absent"))


def test_metadata_is_a_frozen_dataclass(tmp_path):
  meta = write_records_folder(tmp_path / "ds", {"train": random_split(5)})
  with pytest.raises(dataclasses.FrozenInstanceError):
    meta.num_classes = 4
