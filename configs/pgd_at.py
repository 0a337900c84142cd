# PGD-AT paper recipes (Madry et al. 2018; docs/methods.md section 0), one variant per
# dataset x model:
#   jaxdef train --config pgd_at:cifar10_resnet18 --workdir runs/at_r18 \
#       --config.data.data_dir ~/tensorflow_datasets
# variants: cifar10_resnet18, cifar10_preact_resnet18, cifar10_wrn34_10, svhn_resnet18,
# svhn_wrn34_10. Needs the TFDS dataset prepared (python -m jaxdef.data.prepare).
# Reaches: not yet measured in jaxdef (needs a GPU); published PGD-AT ResNet-18 on
# CIFAR-10 is about 82-84% clean / 50-52% PGD-20 at eps 8/255.
"""PGD-10 adversarial training recipes for CIFAR-10 and SVHN (ResNet-18, WRN-34-10)."""

from jaxdef.config import base_config

_MODELS = {
    "resnet18": ("resnet18", {}),
    "preact_resnet18": ("preact_resnet18", {}),
    "wrn34_10": ("wide_resnet", {"depth": 34, "width": 10}),
}
_DATASETS = ("cifar10", "svhn")
VARIANTS = tuple(f"{d}_{m}" for d in _DATASETS for m in _MODELS)


def get_config(variant: str = "cifar10_resnet18"):
  dataset, _, model = variant.partition("_")
  if dataset not in _DATASETS or model not in _MODELS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  c = base_config()  # CIFAR-10 recipe: SGD 0.9, lr 0.1, wd 5e-4, 100 epochs, x0.1 at 75/90
  c.model.name, c.model.kwargs = _MODELS[model]
  if dataset == "svhn":
    c.data.name = "svhn_cropped"
    c.data.augment = "none"
    c.train.optimizer.lr = 0.01
    c.attack.step_size = 1 / 255
    c.train.eval_pgd_step_size = 1 / 255
  return c
