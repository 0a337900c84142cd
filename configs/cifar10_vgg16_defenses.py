# CAS and FSR with PGD-AT on CIFAR-10, VGG-16 (BN):
#   python launch.py --config configs/cifar10_vgg16_defenses.py:at_fsr \
#       --workdir runs/c10_vgg16_at_fsr --config.data.data_dir ~/tensorflow_datasets
# variants: at_cas, at_fsr (and the TRADES/MART ones of cifar10_resnet18_defenses.py).
# Reaches: not yet measured at full scale (needs a GPU).
"""Plug-in defenses on the CIFAR-10 recipe with VGG-16 instead of ResNet-18.

CAS after each of the three convolutions of the last group (``block5.conv0..2``),
FSR after the 4th group (``block4``, before its pooling). See
``cifar10_resnet18_defenses.py`` for the recipe and its overrides.
"""

from configs.cifar10_resnet18_defenses import defended
from configs.pgd_at import get_config as pgd_at_recipe

VARIANTS = ("at_cas", "at_fsr")


def get_config(variant: str = "at_cas"):
  c = pgd_at_recipe("cifar10_resnet18")
  c.model.name, c.model.kwargs = "vgg16", {}
  return defended(c, variant)
