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


# --- jaxdef data import ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_jaxdef(capsys, *argv):
  """``jaxdef *argv`` in this process: (exit status, stdout, stderr)."""
  from jaxdef.cli import run
  status = run([str(a) for a in argv])
  out, err = capsys.readouterr()
  return status, out, err


def one_error_line(status, err, *words):
  assert status == 2, err
  lines = [l for l in err.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in err, err
  for word in words:
    assert word in lines[0], lines[0]


def write_image_folder(root, shape, counts, *, fmt="PNG", seed=0):
  """``root/SPLIT/CLASS/i.png`` for ``counts = {split: per-class count}``,
  classes 'cat' and 'dog'; returns {relative path: pixels}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in counts.items():
    for label, name in enumerate(("cat", "dog")):
      os.makedirs(root / split / name)
      for i in range(n):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        path = f"{split}/{name}/{i:03d}.{fmt.lower()}"
        (root / path).write_bytes(encoded(pixels, fmt))
        written[path] = (pixels, label)
  return written


def in_memory(dest, **fields):
  import ml_collections
  from jaxdef.data import load_dataset
  return load_dataset(ml_collections.ConfigDict(
      {"name": "arrayrecord", "path": str(dest), "augment": "none", "streamed": False,
       **fields}))


def test_image_folder_import_skips_a_corrupt_jpeg_and_a_wrong_size_and_keeps_the_rest(
    tmp_path, capsys):
  written = write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 5, "test": 2})
  good_jpeg = encoded(np.zeros((8, 8, 3), np.uint8), "JPEG")
  (tmp_path / "src/train/dog/corrupt.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
  (tmp_path / "src/train/cat/large.png").write_bytes(
      encoded(np.zeros((10, 8, 3), np.uint8), "PNG"))
  status, out, err = run_jaxdef(capsys, "data", "import", tmp_path / "src", tmp_path / "ds")
  assert status == 0, err

  meta = records.read_metadata(str(tmp_path / "ds"))
  assert sorted(s["path"] for s in meta.skipped) == ["train/cat/large.png",
                                                     "train/dog/corrupt.jpg"]
  reasons = {s["path"]: s["reason"] for s in meta.skipped}
  assert "unreadable" in reasons["train/dog/corrupt.jpg"]
  assert "size 10x8x3" in reasons["train/cat/large.png"]
  report = [l for l in out.splitlines() if l.startswith("skipped ")]
  assert len(report) == 1 and "skipped 2" in report[0] and "corrupt.jpg" in report[0]
  assert meta.class_names == ("cat", "dog") and meta.image_shape == (8, 8, 3)
  assert meta.source["encoding"] == "raw"  # one small shape: stored decoded
  assert {s: m.count for s, m in meta.splits.items()} == {"train": 10, "test": 4}
  assert meta.splits["train"].class_counts == (5, 5)

  ds = in_memory(tmp_path / "ds")
  for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
    mine = sorted(p for p in written if p.startswith(split + "/"))  # torchvision's order
    chex.assert_trees_all_equal(x, np.stack([written[p][0] for p in mine]))
    np.testing.assert_array_equal(y, [written[p][1] for p in mine])
  pixels = ds.x_train.reshape(-1, 3) / 255
  np.testing.assert_allclose(meta.mean, pixels.mean(0), rtol=1e-10)
  np.testing.assert_allclose(meta.std, pixels.std(0), rtol=1e-10)
  assert ds.mean == meta.mean and ds.num_classes == 2


def test_larger_images_keep_their_png_bytes_and_read_back_exactly(tmp_path):
  from jaxdef.data import importer
  written = write_image_folder(tmp_path / "src", (70, 66, 1), {"train": 2, "val": 1})
  meta = importer.import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
  assert meta.source["encoding"] == "jpeg/png" and meta.image_shape == (70, 66, 1)
  assert set(meta.splits) == {"train", "val"}
  ds = in_memory(tmp_path / "ds")  # the test split is val
  chex.assert_trees_all_equal(ds.x_test, np.stack([written[f"val/{c}/000.png"][0]
                                                   for c in ("cat", "dog")]))
  chex.assert_trees_all_equal(ds.x_train, np.stack([written[p][0] for p in sorted(written)
                                                    if p.startswith("train/")]))


def test_images_of_varying_sizes_are_kept_as_files_and_refused_in_memory(tmp_path):
  from jaxdef.data import importer
  rng = np.random.default_rng(5)
  sizes = [(20, 30, 3), (31, 17, 3), (40, 40, 3), (12, 50, 3)]
  for i, shape in enumerate(sizes):
    os.makedirs(tmp_path / "src/train" / f"c{i % 2}", exist_ok=True)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    fmt = "PNG" if i % 2 else "JPEG"
    (tmp_path / f"src/train/c{i % 2}/{i}.{fmt.lower()}").write_bytes(encoded(pixels, fmt))
  meta = importer.import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
  assert meta.image_shape is None and not meta.skipped
  import grain
  source = grain.sources.ArrayRecordDataSource(records.split_files(meta, str(tmp_path / "ds"),
                                                                   "train"))
  # class c0 first (files 0 and 2), then c1 (files 1 and 3)
  assert [records.decode_record(source[i])[0].shape for i in range(4)] == \
      [sizes[0], sizes[2], sizes[1], sizes[3]]
  with pytest.raises(ConfigError, match="vary in size.*streamed=true"):
    in_memory(tmp_path / "ds")


def _npz_shards(folder, shapes_and_counts, seed=0, compressed=(1,)):
  rng = np.random.default_rng(seed)
  os.makedirs(folder)
  arrays = []
  for i, (shape, n) in enumerate(shapes_and_counts):
    x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    y = rng.integers(0, 4, (n,)).astype(np.int64)
    save = np.savez_compressed if i in compressed else np.savez
    save(folder / f"part-{i}.npz", image=x, label=y)
    arrays.append((x, y))
  return arrays


def test_npz_shards_import_as_their_concatenation(tmp_path, monkeypatch):
  from jaxdef.data import importer
  monkeypatch.setattr(importer, "NPZ_CHUNK", 3)  # chunks that straddle the files' rows
  arrays = _npz_shards(tmp_path / "gen", [((6, 5, 3), 7), ((6, 5, 3), 4), ((6, 5, 3), 5)])
  meta = importer.import_dataset(str(tmp_path / "gen"), str(tmp_path / "ds"), shards=3,
                                 progress=False)
  assert meta.source["format"] == "npz" and meta.num_classes == 4 and set(meta.splits) == {
      "train"}
  x = np.concatenate([a[0] for a in arrays])
  y = np.concatenate([a[1] for a in arrays])
  xs, ys = [], []
  import grain
  source = grain.sources.ArrayRecordDataSource(records.split_files(meta, str(tmp_path / "ds"),
                                                                   "train"))
  for i in range(len(source)):
    image, label = records.decode_record(source[i])
    xs.append(image)
    ys.append(label)
  chex.assert_trees_all_equal(np.stack(xs), x)
  np.testing.assert_array_equal(ys, y)
  np.testing.assert_allclose(meta.mean, (x.reshape(-1, 3) / 255).mean(0), rtol=1e-10)
  np.testing.assert_allclose(meta.std, (x.reshape(-1, 3) / 255).std(0), rtol=1e-10)
  assert meta.splits["train"].class_counts == tuple(np.bincount(y, minlength=4))


def test_npz_import_lists_a_file_of_another_shape_and_bad_labels(tmp_path):
  from jaxdef.data import importer
  arrays = _npz_shards(tmp_path / "gen", [((4, 4, 3), 6), ((5, 4, 3), 2), ((4, 4, 3), 3)])
  x, y = arrays[2]
  y[1] = -1
  np.savez(tmp_path / "gen/part-2.npz", image=x, label=y)
  (tmp_path / "gen/broken.npz").write_bytes(b"not a zip")
  meta = importer.import_dataset(str(tmp_path / "gen"), str(tmp_path / "ds"), progress=False)
  reasons = {s["path"]: s["reason"] for s in meta.skipped}
  assert set(reasons) == {"part-1.npz:image", "part-2.npz:label[1]", "broken.npz"}
  assert "2 images of size 5x4x3" in reasons["part-1.npz:image"]
  assert "label -1" in reasons["part-2.npz:label[1]"]
  assert meta.splits["train"].count == 6 + 2


def test_npz_with_train_and_test_arrays_gives_both_splits(tmp_path):
  from jaxdef.data import importer
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (9, 4, 4), dtype=np.uint8),
                y_train=rng.integers(0, 3, 9), x_test=rng.integers(0, 256, (4, 4, 4),
                                                                  dtype=np.uint8),
                y_test=np.array([0, 1, 2, 2]))
  np.savez(tmp_path / "small.npz", **arrays)
  importer.import_dataset(str(tmp_path / "small.npz"), str(tmp_path / "ds"), progress=False)
  ds = in_memory(tmp_path / "ds")
  chex.assert_trees_all_equal(ds.x_train, arrays["x_train"][..., None])
  chex.assert_trees_all_equal(ds.x_test, arrays["x_test"][..., None])
  np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


def test_tfds_dataset_prepared_on_disk_imports_without_downloading(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from jaxdef.data import importer
  from jaxdef.data import prepare as prepare_lib
  from test_data import _tiny_builder_cls  # the in-test TFDS builder (12 + 5 images)
  _tiny_builder_cls()
  folder = prepare_lib.prepare("jaxdef_tiny_images", str(tmp_path / "tfds"))
  meta = importer.import_dataset(folder, str(tmp_path / "ds"), progress=False)
  assert meta.source["format"] == "tfds" and meta.num_classes == 3
  ds = in_memory(tmp_path / "ds")
  np.testing.assert_array_equal(np.sort(ds.x_train[:, 0, 0, 0]), np.arange(12))
  np.testing.assert_array_equal(ds.y_train, ds.x_train[:, 0, 0, 0] % 3)
  np.testing.assert_array_equal(np.sort(ds.x_test[:, 0, 0, 0]), 100 + np.arange(5))
  by_name = importer.import_dataset("jaxdef_tiny_images", str(tmp_path / "ds2"),
                                    source_format="tfds", data_dir=str(tmp_path / "tfds"),
                                    progress=False)
  assert by_name.splits == meta.splits
  with pytest.raises(ConfigError, match="never downloads"):
    importer.import_dataset("jaxdef_tiny_images", str(tmp_path / "ds3"), source_format="tfds",
                            data_dir=str(tmp_path / "empty"), progress=False)


def test_a_second_import_is_refused_unless_overwrite(tmp_path, capsys):
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 2})
  args = ("data", "import", tmp_path / "src", tmp_path / "ds")
  assert run_jaxdef(capsys, *args)[0] == 0
  first = records.read_metadata(str(tmp_path / "ds")).created
  one_error_line(*run_jaxdef(capsys, *args)[::2], "already holds an imported dataset",
                 "--overwrite")
  status, out, err = run_jaxdef(capsys, *args, "--overwrite", "--shards", "2")
  assert status == 0, err
  assert records.read_metadata(str(tmp_path / "ds")).splits["train"].files == tuple(
      records.shard_names("train", 2))
  assert first  # the earlier metadata was complete too
  assert sorted(os.listdir(tmp_path)) == ["ds", "src"]  # nothing left beside DEST
  os.mkdir(tmp_path / "plain")  # DEST gets the permissions of a folder made by the user
  assert os.stat(tmp_path / "ds").st_mode == os.stat(tmp_path / "plain").st_mode


def test_an_existing_empty_folder_is_imported_into(tmp_path):
  from jaxdef.data import importer
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 1})
  os.mkdir(tmp_path / "ds")
  importer.import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
  assert records.read_metadata(str(tmp_path / "ds")).splits["train"].count == 2


def test_help_names_data_import_and_its_flags(capsys):
  assert "data import" in run_jaxdef(capsys, "--help")[1]
  status, out, _ = run_jaxdef(capsys, "data", "import", "--help")
  assert status == 0
  assert all(flag in out for flag in ("SOURCE", "DEST", "--overwrite", "--format", "--shards"))


def test_a_folder_that_is_not_a_dataset_is_never_overwritten(tmp_path, capsys):
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 2})
  os.makedirs(tmp_path / "mine")
  (tmp_path / "mine/notes.txt").write_text("keep")
  one_error_line(*run_jaxdef(capsys, "data", "import", tmp_path / "src", tmp_path / "mine",
                             "--overwrite")[::2], "does not hold an imported dataset")
  assert (tmp_path / "mine/notes.txt").read_text() == "keep"


def test_an_interrupted_import_leaves_no_dataset_behind(tmp_path, monkeypatch):
  from jaxdef.data import importer
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 2})

  def interrupted(dest, meta):
    raise KeyboardInterrupt
  monkeypatch.setattr(records, "write_metadata", interrupted)
  with pytest.raises(KeyboardInterrupt):
    importer.import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_half_written_folder_is_not_taken_for_a_dataset(tmp_path, capsys):
  """Shards without the metadata (what an import killed before its end
  leaves in its hidden work folder) are refused by training and import."""
  write_records_folder(tmp_path / "half", {"train": random_split(4)})
  os.remove(tmp_path / "half" / records.METADATA)
  with pytest.raises(ConfigError, match="has no jaxdef_dataset.json.*did not finish"):
    in_memory(tmp_path / "half")
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 2})
  one_error_line(*run_jaxdef(capsys, "data", "import", tmp_path / "src", tmp_path / "half",
                             "--overwrite")[::2], "does not hold an imported dataset")


@pytest.mark.parametrize("argv,words", [
    (("data", "import", "{tmp}/src", "{tmp}/ds", "--format", "csv"), ("invalid choice",)),
    (("data", "import", "{tmp}/empty", "{tmp}/ds"), ("cannot tell the format", "--format")),
    (("data", "import", "{tmp}/nowhere", "{tmp}/ds"), ("no such file or folder",)),
    (("data", "import", "{tmp}/empty", "{tmp}/ds", "--format", "imagefolder"),
     ("no train/ folder",)),
    (("data", "import", "{tmp}/empty", "{tmp}/ds", "--format", "npz"), ("no .npz file",)),
    (("data", "import", "{tmp}/src"), ("required: DEST",)),
    (("data", "export"), ("unknown command 'data export'",)),
    (("data", "import", "{tmp}/src", "{tmp}/ds", "--shards", "0"), ("--shards",)),
])
def test_import_mistakes_are_one_error_line(tmp_path, capsys, argv, words):
  write_image_folder(tmp_path / "src", (8, 8, 3), {"train": 1})
  os.makedirs(tmp_path / "empty")
  status, _, err = run_jaxdef(capsys, *(a.format(tmp=tmp_path) for a in argv))
  one_error_line(status, err, *words)
  assert not os.path.exists(tmp_path / "ds")


def test_in_memory_source_refuses_a_dataset_too_big_for_memory(tmp_path, monkeypatch):
  from jaxdef.data import arrayrecord
  write_records_folder(tmp_path / "ds", {"train": random_split(6), "test": random_split(2)})
  needed = 8 * 5 * 4 * 3
  monkeypatch.setattr(arrayrecord, "available_memory", lambda: needed)  # more than half
  with pytest.raises(ConfigError, match="--config.data.streamed=true") as error:
    in_memory(tmp_path / "ds")
  assert "\n" not in str(error.value)
  monkeypatch.setattr(arrayrecord, "available_memory", lambda: 2 * needed)
  chex.assert_shape(in_memory(tmp_path / "ds").x_train, (6, 5, 4, 3))
  monkeypatch.setattr(arrayrecord, "available_memory", lambda: needed)  # a subset fits
  chex.assert_shape(in_memory(tmp_path / "ds", max_train=2).x_train, (2, 5, 4, 3))


def test_in_memory_subset_reads_the_rows_subset_keeps(tmp_path):
  write_records_folder(tmp_path / "ds", {"train": random_split(9), "test": random_split(5)})
  full = in_memory(tmp_path / "ds")
  part = in_memory(tmp_path / "ds", max_train=4, max_test=2)
  expected = full.subset(4, 2)
  chex.assert_trees_all_equal((part.x_train, part.y_train, part.x_test),
                              (expected.x_train, expected.y_train, expected.x_test))


def test_arrayrecord_needs_a_path_and_streaming_needs_arrayrecord():
  import ml_collections
  from jaxdef.config import validate
  from jaxdef.configs.default import get_config
  with pytest.raises(ConfigError, match="data.path must name a folder"):
    in_memory("")
  config = get_config()
  config.data.streamed = True
  with pytest.raises(ConfigError, match="data.streamed=True reads a folder"):
    validate(config, 1)
  assert isinstance(config, ml_collections.ConfigDict)


def test_a_config_trains_one_step_from_an_imported_folder(tmp_path, capsys):
  write_image_folder(tmp_path / "src", (28, 28, 1), {"train": 8, "test": 4})
  assert run_jaxdef(capsys, "data", "import", tmp_path / "src", tmp_path / "ds")[0] == 0
  quick = ["--config", os.path.join(ROOT, "configs/default.py"),
           "--config.data.max_train=16", "--config.data.max_test=8",
           "--config.train.batch_size=16", "--config.train.epochs=1",
           "--config.attack.steps=2", "--config.attack.warmup_epochs=0.0",
           "--config.model.kwargs.width=0.25", "--config.train.eval_examples=8",
           "--config.train.eval_batch_size=8", "--config.train.eval_pgd_steps=2",
           "--config.train.log_every_steps=1", "--config.train.checkpoint_every_steps=10"]
  status, out, err = run_jaxdef(capsys, "train", *quick, "--workdir", tmp_path / "run",
                                "--config.data.name=arrayrecord",
                                f"--config.data.path={tmp_path / 'ds'}",
                                "--config.data.streamed=false")
  assert status == 0, err[-3000:]
  saved = json.loads((tmp_path / "run/config.json").read_text())["config"]
  assert saved["data"]["name"] == "arrayrecord" and saved["data"]["streamed"] is False
  lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  summary = [l for l in lines if l.get("split") == "summary"]
  assert len(summary) == 1 and summary[0]["steps"] == 1 and summary[0]["dataset"] == "arrayrecord"
