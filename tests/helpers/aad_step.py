"""tests/helpers/one_step.py with the AAD defense: two training steps on all
visible devices (StepLL, the iterated second update, both attention losses),
parameters saved for comparison. (IoU selection is left out for compile time;
tests/test_aad.py checks it on its own.)

The model is the quarter-width small CNN, not one_step.py's BatchNorm WRN:
AAD's discrete choices (StepLL's sign, the attention region's threshold, the
IoU test) can turn the WRN's float reduction-order noise across devices into
different samples (measured with IoU selection on: parameters 0.14 apart
after two steps, against 4e-6 for the small CNN).

Usage: python tests/helpers/aad_step.py OUT.npz (with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, see tests/test_aad.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import one_step  # noqa: E402

AAD = {"defense.name": "aad", "model.name": "small_cnn", "model.kwargs": {"width": 0.25},
       "defense.kwargs": {"iterated": True}}


_plain_tiny_config = one_step.tiny_config


def aad_tiny_config(**overrides):
  return _plain_tiny_config(**{**overrides, **AAD})


if __name__ == "__main__":
  one_step.tiny_config = aad_tiny_config  # the same run, with AAD
  one_step.main(sys.argv[1])
