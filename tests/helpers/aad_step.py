"""tests/helpers/one_step.py with the AAD defense: two training steps on all
visible devices (StepLL, the iterated second update, both attention losses),
parameters saved for comparison. (IoU selection is left out for compile time;
tests/test_aad.py checks it on its own.)

The model is the quarter-width small CNN, not one_step.py's BatchNorm WRN:
on the WRN, AAD's discrete choices can turn the float reduction-order noise
of the first update into different samples for the second. Measured on
WRN-10-1 (largest parameter difference, 8 devices vs 1, after these two
steps; 2026-11-22): StepLL without iteration 1.1e-4; iterated StepLL without
the attention losses 2.1e-2; iterated with both attention losses 1.0e-4;
iterated with IoU selection 9.1e-2 (small CNN: 4e-6). At fixed weights,
StepLL(x) and StepLL(StepLL(x)) are bit-identical sharded and unsharded, and
a 1e-6 relative change of the initial weights changes no pixel, so the flips
come from the trained weights after the first update (StepLL's least-likely
class or a gradient sign), not from the attention region's threshold.

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
