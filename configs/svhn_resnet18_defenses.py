# {AT, TRADES, MART} x {none, CAS, FSR} on SVHN with ResNet-18, one variant each:
#   jaxdef train --config svhn_resnet18_defenses:at_fsr \
#       --workdir runs/svhn_r18_at_fsr --config.data.data_dir ~/tensorflow_datasets
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr
# (jaxdef's common recipe), and *_paper for each CAS / FSR one (the authors' recipes).
# The *_paper variants differ from the common ones exactly as in
# cifar10_resnet18_defenses.py (its first comment lists each parameter, why, and the
# differences kept on purpose). docs/methods.md gives no SVHN-specific recipe of the
# authors beyond lr 0.01 and step 1/255, which both keep (CAS + TRADES / MART: the CAS
# scripts' eps 0.031 with SVHN's step 1/255; CAS + AT's checkpoint attack: PGD-10 of
# 1/255, its training attack); their CIFAR-10 weight decays, betas, epochs, decay
# epochs, checkpoint rules and input scaling are applied unchanged.
# Reaches: not yet measured at full scale (needs a GPU and the TFDS svhn_cropped data).
"""Plug-in defenses on the SVHN recipe of ``configs/pgd_at.py:svhn_resnet18``.

lr 0.01, PGD-10 eps 8/255 with step 1/255, no augmentation; the rest as in
``cifar10_resnet18_defenses.py``, whose docstring lists the papers' recipe
overrides and how CAS follows the objective.
"""

from jaxdef.configs.cifar10_resnet18_defenses import COMMON_VARIANTS, paper_variant, paper_variants
from jaxdef.configs.pgd_at import get_config as pgd_at_recipe

VARIANTS = COMMON_VARIANTS + paper_variants(COMMON_VARIANTS)


def get_config(variant: str = "at_cas"):
  c = paper_variant(lambda: pgd_at_recipe("svhn_resnet18"), variant)
  if variant in ("trades_cas_paper", "mart_cas_paper"):
    c.attack.step_size = 1 / 255  # SVHN's step, with the CAS scripts' eps 0.031
  return c
