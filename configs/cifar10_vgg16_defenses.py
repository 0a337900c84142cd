# CAS and FSR with PGD-AT on CIFAR-10, VGG-16 (BN):
#   jaxdef train --config cifar10_vgg16_defenses:at_fsr \
#       --workdir runs/c10_vgg16_at_fsr --config.data.data_dir ~/tensorflow_datasets
# variants: at_cas, at_fsr (jaxdef's common recipe) and at_cas_paper, at_fsr_paper (the
# authors' recipes). The *_paper variants differ from the common ones exactly as in
# cifar10_resnet18_defenses.py (its first comment lists each parameter, why, and the
# differences kept on purpose): both see [0, 1] images and keep the last partial batch;
# CAS + AT weight decay 1e-4, 200 epochs, decays at 0-based epochs 74 and 89, the
# checkpoint with the best joint PGD-10 (from the clean image) on the whole test split,
# eval.protocol 'cas'; FSR decays at 74 and 89, keeps the last epoch, eval.protocol 'fsr'.
# Reaches: not yet measured at full scale (needs a GPU).
"""Plug-in defenses on the CIFAR-10 recipe with VGG-16 instead of ResNet-18.

CAS after each of the three convolutions of the last group (``block5.conv0..2``),
FSR after the 4th group (``block4``, before its pooling). See
``cifar10_resnet18_defenses.py`` for the recipe and its overrides.
"""

from jaxdef.configs.cifar10_resnet18_defenses import paper_variant, paper_variants
from jaxdef.configs.pgd_at import get_config as pgd_at_recipe

COMMON = ("at_cas", "at_fsr")
VARIANTS = COMMON + paper_variants(COMMON)


def vgg16_recipe():
  c = pgd_at_recipe("cifar10_resnet18")
  c.model.name, c.model.kwargs = "vgg16", {}
  return c


def get_config(variant: str = "at_cas"):
  return paper_variant(vgg16_recipe, variant, COMMON)
