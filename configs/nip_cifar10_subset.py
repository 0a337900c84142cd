# NIP (neuron-level inverse perturbation, docs/methods.md section 4), a test-time input transform,
# on the PGD-AT recipe of configs/subset_cifar10.py (half-width small CNN, local CIFAR-10 subset):
#   jaxdef train --config nip_cifar10_subset --workdir runs/nip_subset
#   jaxdef eval --config nip_cifar10_subset --workdir runs/nip_subset
#   jaxdef eval --config nip_cifar10_subset:paper --workdir runs/nip_subset
# variants: deployable (default), paper (the authors' oracle evaluation beside it; the two
# differ only in eval.protocol = 'nip', configs/nip_mnist.py's first comment says how).
# Reaches (measured 2026-11-22, first 200 test images, eps 8/255): PGD-AT classifier 37.0% clean /
# 29.0% PGD-20, with NIP 37.5 / 29.0 (BPDA PGD-20 29.0, defense success 0%); standard classifier
# 48.5 / 2.5, with NIP 47.5 / 2.5. NIP changes no outcome here: README, issue-6 table.
# `paper` (2026-11-27, standard classifier as in configs/nip_mnist.py, 8 epochs, first 200
# test images): clean 50.0%; FAB minimum-norm examples: oracle 100% (of 98), deployable NIP
# 31.7%; PGD-20: oracle 1.4% (of 138), deployable 0.5%; worst case of the deployed pipeline 0%.
"""NIP on the CIFAR-10 subset with the paper's CIFAR setting (docs/methods.md section 4):
layer ``pool2`` (the small CNN's last conv features, 5 x 5 x 32 = 800 neurons),
front k = 1, tail t = 5, eta = 0.001, T = 1 step, class-agnostic sets, statistics
over all 5085 training images."""

from jaxdef.configs.subset_cifar10 import get_config as subset_recipe
from jaxdef.defenses.nip import default_nip_config


VARIANTS = ("deployable", "paper")


def get_config(variant: str = "deployable"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  c = subset_recipe("at")
  c.nip = default_nip_config()
  c.nip.num_train_examples = 0    # all 5085 training images
  c.eval.transform = "nip"        # the evaluation composes NIP with the classifier
  if variant == "paper":
    c.eval.protocol = "nip"       # FAB (minimum norm) and PGD-20 columns, oracle beside NIP
  return c
