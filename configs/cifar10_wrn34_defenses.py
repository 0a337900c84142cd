# CAS and FSR with PGD-AT on CIFAR-10, WideResNet-34-10:
#   python launch.py --config configs/cifar10_wrn34_defenses.py:at_cas \
#       --workdir runs/c10_wrn34_at_cas --config.data.data_dir ~/tensorflow_datasets
# variants: at_cas, at_fsr (and the TRADES/MART ones of cifar10_resnet18_defenses.py).
# Reaches: not yet measured at full scale (needs a GPU: about 12x the ResNet-18 cost).
"""Plug-in defenses on ``configs/pgd_at.py:cifar10_wrn34_10``.

CAS sits on the input of the last block of the last stage (``stage3.3`` for
depth 34, computed from ``model.kwargs.depth``) and on the final BN-ReLU
features; FSR after the final BN-ReLU (8x8x640). See
``cifar10_resnet18_defenses.py`` for the recipe and its overrides.
"""

from configs.cifar10_resnet18_defenses import defended
from configs.pgd_at import get_config as pgd_at_recipe

VARIANTS = ("at_cas", "at_fsr")


def get_config(variant: str = "at_cas"):
  return defended(pgd_at_recipe("cifar10_wrn34_10"), variant)
