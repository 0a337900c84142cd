# CAS and FSR with PGD-AT on CIFAR-10, WideResNet-34-10:
#   jaxdef train --config cifar10_wrn34_defenses:at_cas \
#       --workdir runs/c10_wrn34_at_cas --config.data.data_dir ~/tensorflow_datasets
# variants: at_cas, at_fsr (jaxdef's common recipe) and at_cas_paper, at_fsr_paper (the
# authors' recipes). The *_paper variants differ from the common ones exactly as in
# cifar10_resnet18_defenses.py (its first comment lists each parameter, why, and the
# differences kept on purpose): both see [0, 1] images and keep the last partial batch;
# CAS + AT weight decay 1e-4, 200 epochs, decays at 0-based epochs 74 and 89, the
# checkpoint with the best joint PGD-10 (from the clean image) on the whole test split,
# eval.protocol 'cas'; FSR decays at 74 and 89, keeps the last epoch, eval.protocol 'fsr'.
# Reaches: not yet measured at full scale (needs a GPU: about 12x the ResNet-18 cost).
"""Plug-in defenses on ``configs/pgd_at.py:cifar10_wrn34_10``.

CAS sits on the input of the last block of the last stage (``stage3.3`` for
depth 34, computed from ``model.kwargs.depth``) and on the final BN-ReLU
features; FSR after the final BN-ReLU (8x8x640). See
``cifar10_resnet18_defenses.py`` for the recipe and its overrides.
"""

from jaxdef.configs.cifar10_resnet18_defenses import paper_variant, paper_variants
from jaxdef.configs.pgd_at import get_config as pgd_at_recipe

COMMON = ("at_cas", "at_fsr")
VARIANTS = COMMON + paper_variants(COMMON)


def get_config(variant: str = "at_cas"):
  return paper_variant(lambda: pgd_at_recipe("cifar10_wrn34_10"), variant, COMMON)
