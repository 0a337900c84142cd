# NIP (neuron-level inverse perturbation, METHODS.md section 4), a test-time input transform,
# on the PGD-AT recipe of configs/subset_cifar10.py (half-width small CNN, local CIFAR-10 subset):
#   python launch.py --config configs/nip_cifar10_subset.py --workdir runs/nip_subset
#   python launch.py --config configs/nip_cifar10_subset.py --workdir runs/nip_subset --mode eval
# Reaches: not measured yet (the classifier alone: 33.9% clean / 25.0% PGD-20, subset_cifar10.py).
"""NIP on the CIFAR-10 subset with the paper's CIFAR setting (METHODS.md section 4):
layer ``pool2`` (the small CNN's last conv features, 5 x 5 x 32 = 800 neurons),
front k = 1, tail t = 5, eta = 0.001, T = 1 step, class-agnostic sets, statistics
over all 5085 training images."""

from configs.subset_cifar10 import get_config as subset_recipe
from jaxdef.defenses.nip import default_nip_config


def get_config():
  c = subset_recipe("at")
  c.nip = default_nip_config()
  c.nip.num_train_examples = 0    # all 5085 training images
  c.eval.transform = "nip"        # the evaluation composes NIP with the classifier
  return c
