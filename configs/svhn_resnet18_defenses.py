# {AT, TRADES, MART} x {none, CAS, FSR} on SVHN with ResNet-18, one variant each:
#   python launch.py --config configs/svhn_resnet18_defenses.py:at_fsr \
#       --workdir runs/svhn_r18_at_fsr --config.data.data_dir ~/tensorflow_datasets
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr.
# Reaches: not yet measured at full scale (needs a GPU and the TFDS svhn_cropped data).
"""Plug-in defenses on the SVHN recipe of ``configs/pgd_at.py:svhn_resnet18``.

lr 0.01, PGD-10 eps 8/255 with step 1/255, no augmentation; the rest as in
``cifar10_resnet18_defenses.py``, whose docstring lists the papers' recipe
overrides and how CAS follows the objective.
"""

from configs.cifar10_resnet18_defenses import COMMON_VARIANTS as VARIANTS, defended  # noqa: F401
from configs.pgd_at import get_config as pgd_at_recipe


def get_config(variant: str = "at_cas"):
  return defended(pgd_at_recipe("svhn_resnet18"), variant)
