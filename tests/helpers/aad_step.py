"""tests/helpers/one_step.py with the AAD defense: two training steps on all
visible devices (the iterated second update, both attention losses: the
clean pass, Grad-CAM of x and x_adv, the masked images), parameters saved
for comparison. (IoU selection is left out for compile time; tests/test_aad.py
checks it on its own.)

The samples come from the trainer's PGD (``generator='pgd'``), not StepLL:
StepLL's least-likely class (an argmin over the logits of a freshly
initialised network, where classes are nearly tied) and its single signed
step turn the float reduction-order noise of a sharded batch into different
samples, so its 8-vs-1 difference measures that noise, not the sharding.
Measured on this project's 2-core machine (2026-11-27; largest parameter
difference, 8 devices vs 1, quarter-width small CNN): one step of StepLL
without the attention losses 2.9e-3 (jax 0.10.2); one step of StepLL with
them 1.5e-2 (jax 0.10.2 and 0.12.0.1); two iterated StepLL steps 0.69 (both);
two iterated PGD steps with both attention losses 2.4e-7 (both). An earlier
machine measured 4e-6 for iterated StepLL, so the StepLL figure depends on
the CPU's arithmetic. On the BatchNorm WRN-10-1 (2026-11-22): StepLL without
iteration 1.1e-4; iterated without the attention losses 2.1e-2; with IoU
selection 9.1e-2.

Usage: python tests/helpers/aad_step.py OUT.npz (with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, see tests/test_aad.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import one_step  # noqa: E402

AAD = {"defense.name": "aad", "model.name": "small_cnn", "model.kwargs": {"width": 0.25},
       "defense.kwargs": {"iterated": True, "generator": "pgd"}}


_plain_tiny_config = one_step.tiny_config


def aad_tiny_config(**overrides):
  return _plain_tiny_config(**{**overrides, **AAD})


if __name__ == "__main__":
  one_step.tiny_config = aad_tiny_config  # the same run, with AAD
  one_step.main(sys.argv[1])
