"""The rules of ``benchmarks/compare_fast_at.py``: the equal step-time budget,
Wong et al.'s catastrophic-overfitting check, and the data copy whose test
split is the check's training batch."""

import numpy as np
import pytest

from benchmarks.compare_fast_at import epoch_budget, overfit_epoch, write_check_copy


def test_epoch_budget_gives_each_method_the_base_methods_step_time():
  step_s = {"pgd10": 4.0, "fgsm_rs": 1.0, "n_fgsm": 1.3}
  epochs = epoch_budget(4, step_s)
  assert epochs == {"pgd10": 4, "fgsm_rs": 16, "n_fgsm": 12}
  budget = 4 * step_s["pgd10"]
  for m, t in step_s.items():  # the nearest whole number of epochs to the budget
    assert abs(epochs[m] * t - budget) <= t / 2


def test_epoch_budget_trains_a_slower_method_at_least_one_epoch():
  assert epoch_budget(1, {"pgd10": 1.0, "slow": 10.0}) == {"pgd10": 1, "slow": 1}
  with pytest.raises(ValueError):
    epoch_budget(0, {"pgd10": 1.0})


def test_overfit_epoch_is_the_first_fall_of_more_than_the_drop():
  assert overfit_epoch([0.25, 0.375, 0.5, 0.125, 0.0]) == 4
  assert overfit_epoch([0.5, 0.375, 0.25, 0.125]) is None  # 12.5 points per epoch
  assert overfit_epoch([0.5, 0.375], drop=0.1) == 2
  assert overfit_epoch([0.0, 0.0]) is None  # the first epoch is compared with 0
  assert overfit_epoch([]) is None


def test_check_copy_tests_on_the_first_training_images(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  y = np.arange(10) % 3
  source, dest = str(tmp_path / "src.npz"), str(tmp_path / "copy.npz")
  np.savez(source, x_train=x, y_train=y, x_test=x[:7], y_test=y[:7])
  assert write_check_copy(source, dest, 4, max_train=8) == {"train": 8, "check": 4, "test": 7}
  with np.load(dest) as d:
    np.testing.assert_array_equal(d["x_train"], x[:8])
    np.testing.assert_array_equal(d["y_train"], y[:8])
    np.testing.assert_array_equal(d["x_test"], x[:4])
    np.testing.assert_array_equal(d["y_test"], y[:4])
