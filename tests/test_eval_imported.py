"""``jaxdef eval`` of runs trained on an imported dataset: only the evaluated
test records are read, cropped as the per-epoch evaluation crops them."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from jaxdef.data import eval_data, load_dataset
from jaxdef.data.augment import center_crop, to_float
from jaxdef.data.dataset import kept_rows
from jaxdef.data.records import read_metadata
from jaxdef.evaluate import default_eval_config, evaluate_workdir
from jaxdef.restored import load_run
from jaxdef.train.loop import train_and_evaluate
from test_streamed import write_folder

EVALUATED = 12


@pytest.fixture(scope="module")
def digits():
  """64 train and 32 test MNIST5k digits (28x28x1, 10 classes)."""
  data = load_dataset(ml_collections.ConfigDict({"name": "mnist5k", "augment": "none"}))
  data = data.subset(64, 32)
  return (data.x_train, data.y_train), (data.x_test, data.y_test)


def _config(folder, **overrides):
  return tiny_config(**{"data.name": "arrayrecord", "data.path": folder, "data.max_train": 0,
                        "data.max_test": 0, "attack.steps": 1, "train.epochs": 1,
                        "train.eval_examples": 16, "train.eval_pgd_steps": 1, **overrides})


def _with_eval(config, attacks="clean,pgd5"):
  config.eval = default_eval_config(float(config.attack.eps))
  config.eval.update(attacks=attacks, masking_checks=False, attention=False,
                     unit_test="off", num_examples=EVALUATED, batch_size=4)
  return config


def _corrupt_train_shards(folder):
  """Overwrites the train split's files with bytes no reader accepts."""
  meta = read_metadata(folder)
  for name in meta.splits["train"].files:
    with open(f"{folder}/{name}", "wb") as f:
      f.write(b"not an array record" * 8)


def test_eval_of_a_streamed_run_matches_in_memory_without_reading_the_train_split(
    digits, tmp_path):
  folder = write_folder(tmp_path / "data", {"train": digits[0], "test": digits[1]}, 10)
  config = _config(folder)
  train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  in_memory = _with_eval(_config(folder, **{"data.streamed": False}))
  expected = evaluate_workdir(str(tmp_path / "run"), in_memory)
  _corrupt_train_shards(folder)
  data = eval_data(config.data, EVALUATED)
  with pytest.raises(Exception):  # the train split is really unreadable now
    data.train_examples(np.arange(2))
  streamed = evaluate_workdir(str(tmp_path / "run"), _with_eval(config))
  assert streamed["num_examples"] == expected["num_examples"] == EVALUATED
  assert streamed["clean"] == expected["clean"]
  assert streamed["attacks"] == expected["attacks"] and set(streamed["attacks"]) == {"pgd5"}
  np.testing.assert_array_equal(data.x_test, digits[1][0][:EVALUATED])
  np.testing.assert_array_equal(data.y_test, digits[1][1][:EVALUATED])


def test_eval_of_an_rrc_run_scores_centre_crops_of_images_of_any_size(digits, tmp_path):
  (x_test, y_test) = digits[1]
  # Test images of two sizes: taller ones padded with 6 black rows.
  tests = [np.pad(im, ((3, 3), (0, 0), (0, 0))) if i % 2 else im for i, im in enumerate(x_test)]
  folder = write_folder(tmp_path / "data", {"train": digits[0], "test": (tests, y_test)}, 10)
  config = _config(folder, **{"data.augment": "rrc_flip", "data.image_size": 24})
  train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  _corrupt_train_shards(folder)
  data = eval_data(config.data, EVALUATED)
  by_hand = np.stack([center_crop(im, 24) for im in tests[:EVALUATED]])
  assert data.x_test.shape == (EVALUATED, 24, 24, 1) and data.image_shape == (24, 24, 1)
  np.testing.assert_array_equal(data.x_test, by_hand)
  results = evaluate_workdir(str(tmp_path / "run"), _with_eval(config, "clean"))
  run = load_run(str(tmp_path / "run"))
  assert run.meta.image_shape == (24, 24, 1)
  predicted = np.argmax(jax.jit(run.logits)(to_float(by_hand)), -1)
  assert results["clean"] == pytest.approx(np.mean(predicted == y_test[:EVALUATED]))


def test_training_examples_for_nip_are_read_by_index_at_the_evaluation_crop(digits, tmp_path):
  (x_train, y_train), test = digits
  # Training images of two sizes: only the streamed path reads them.
  trains = [np.pad(im, ((0, 0), (2, 2), (0, 0))) if i % 3 else im for i, im in enumerate(x_train)]
  folder = write_folder(tmp_path / "data", {"train": (trains, y_train), "test": test}, 10)
  config = _config(folder, **{"data.augment": "rrc_flip", "data.image_size": 20,
                              "data.max_train": 40})
  data = eval_data(config.data, 4)
  assert data.num_train == 40
  index = np.array([0, 7, 39])
  kept = kept_rows(64, 40)[index]  # the rows Dataset.subset keeps
  x, y = data.train_examples(index)
  np.testing.assert_array_equal(x, np.stack([center_crop(trains[k], 20) for k in kept]))
  np.testing.assert_array_equal(y, y_train[kept])
