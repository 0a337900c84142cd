# Adversarial Weight Perturbation (Wu et al. 2020) on CIFAR-10, the authors' two recipes
# (csdongxian/AWP: trades_AWP/train_trades_cifar.py, AT_AWP/train_cifar10.py):
#   jaxdef train --config awp:cifar10_wrn34_10_trades --workdir runs/x \
#       --config.data.data_dir ~/tensorflow_datasets
# variants: cifar10_wrn34_10_trades (TRADES-AWP, WideResNet-34-10, beta 6, gamma 0.005),
# cifar10_preact18_at (AT-AWP, PreActResNet-18, gamma 0.01).
# Reaches: not yet measured in jaxdef (needs a GPU). The authors report TRADES-AWP
# WRN-34-10 85.36% clean / 56.17% AutoAttack (AT-AWP WRN-34-10: 85.36 / 53.97); their
# log of AT-AWP PreActResNet-18 (L-inf 8/255) reads PGD-20 55.39% at its best epoch
# (159, clean 81.18%) and 54.30% at the last (clean 81.65%), on the whole test set.
# Compute: AWP adds one forward-backward pass per image and step for the proxy (two
# for TRADES, which reads clean and adversarial outputs): TRADES-AWP is about 14
# forward-backward passes per image (PGD-10, proxy 2, update 2) x 50,000 images x 200
# epochs = 1.4e8; AT-AWP 12 (PGD-10, proxy 1, update 1) x 50,000 x 200 = 1.2e8; about
# 1.1-1.2x the plain method's step.
# From the scripts (both: SGD momentum 0.9, lr 0.1, weight decay 5e-4 on every
# parameter, batch 128 with the last partial batch kept, 200 epochs, PGD-10 of 2/255
# at 8/255; AWP's proxy is plain SGD):
#   TRADES-AWP: [0, 1] inputs (no normalisation); attack from x + 0.001 N(0, 1) with
#     BatchNorm in eval mode; lr x0.1 at the script's 1-based epochs 100 and 150
#     (0-based 99 and 149); proxy lr 0.1 (the script's --lr); AWP from the 1-based
#     epoch 10 (`epoch >= awp_warmup`), so 9 epochs without it.
#   AT-AWP: the model standardises its input (CIFAR-10 mean/std); uniform start; the
#     attack runs with the model in training mode (batch statistics); lr x0.1 at 50%
#     and x0.01 at 75% of training (0-based epochs 100 and 150); proxy lr 0.01; AWP
#     from the first step.
# Differences kept: AT-AWP's attack also updates BatchNorm's running statistics in
# the reference (10 times per batch) and jaxdef's 'train_no_update' does not; its
# crop pads by reflection, jaxdef's by zeros; its rate falls one step earlier (it
# reads the schedule after the step); both scripts keep the last epoch here
# (train.select='final'), where the AT log's "best" is chosen on the test set.
"""AT-AWP and TRADES-AWP recipes (jaxdef.train.awp; csdongxian/AWP)."""

from jaxdef.config import base_config

VARIANTS = ("cifar10_wrn34_10_trades", "cifar10_preact18_at")


def get_config(variant: str = "cifar10_wrn34_10_trades"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  c = base_config()  # SGD 0.9, lr 0.1, wd 5e-4 on all, batch 128, PGD-10 2/255 at 8/255
  c.train.epochs = 200
  c.data.keep_last_batch = True
  if variant == "cifar10_wrn34_10_trades":
    c.model.name, c.model.kwargs = "wide_resnet", {"depth": 34, "width": 10}
    c.model.normalize = False
    c.objective.name, c.objective.kwargs = "trades", {"beta": 6.0}
    c.attack.init_sigma = 0.001
    c.train.optimizer.milestones = (99, 149)
    c.train.awp.update(dict(gamma=0.005, proxy_lr=0.1, warmup_epochs=9.0))
  else:
    c.model.name, c.model.kwargs = "preact_resnet18", {}
    c.objective.name = "at"
    c.attack.bn = "train_no_update"
    c.train.optimizer.milestones = (100, 150)
    c.train.awp.update(dict(gamma=0.01, proxy_lr=0.01, warmup_epochs=0.0))
  return c
