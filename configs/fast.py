# Fast adversarial training of PreActResNet-18 on CIFAR-10 (L-inf 8/255), three recipes
# read from their authors' scripts:
#   jaxdef train --config fast:cifar10_preact18_fgsm_rs --workdir runs/x \
#       --config.data.data_dir ~/tensorflow_datasets
# variants:
#   cifar10_preact18_fgsm_rs: FGSM-RS (Wong et al. 2020, locuslab/fast_adversarial
#     CIFAR10/train_fgsm.py): start U(-eps, eps), one signed step of 1.25 eps (10/255),
#     projected; 15 epochs.
#   cifar10_preact18_n_fgsm: N-FGSM (de Jorge et al. 2022, pdejorge/N-FGSM train.py):
#     noise U(-2 eps, 2 eps), one step of eps, no projection onto the eps-ball; 30 epochs.
#   cifar10_preact18_free: Free-8 (Shafahi et al. 2019, ashafahi/free_adv_train, the
#     paper's CIFAR-10 code): each batch replayed 8 times, one perturbation carried
#     across batches, steps of eps; 205 epochs of updates = 25.6 passes over the data.
# Reaches: not yet measured in jaxdef (needs a GPU). The papers report, CIFAR-10 at 8/255:
#   FGSM-RS PreActResNet-18 86.06% clean / 46.06% PGD-50 (10 restarts) in 12 minutes,
#   where PGD-7 AT took 4,966 minutes (87.30 / 45.80) and Free-8 785 (85.96 / 46.33; Wong
#   et al.'s table); N-FGSM matches or beats GradAlign's PGD-50-10 accuracy from 2/255 to
#   16/255 at a third of its cost, without catastrophic overfitting (its results are
#   curves over eps); Free-8 on WideResNet-32-10: 85.96% clean / 46.19% PGD-100 / 46.33%
#   PGD-20 with 10 restarts in 785 minutes (PGD-7 AT: 87.25 / 45.29 in 5,418).
# Compute (forward-backward passes per training image): FGSM-RS 2 per epoch x 15 = 30;
# N-FGSM 2 x 30 = 60; Free-8 8 per pass x 25.6 passes = 205 (1 per epoch of updates);
# PGD-10 AT for comparison: 11 x 100 = 1,100 (base config).
# From the scripts: SGD momentum 0.9, weight decay 5e-4 on every parameter, batch 128,
# random crop (pad 4) + flip, the model standardises its input with CIFAR-10's mean and
# std; FGSM-RS and N-FGSM: the cyclic rate 0 -> 0.2 -> 0, linear, per step, peaking
# halfway (both scripts' CyclicLR: step_size_up = half the steps); Free (TensorFlow
# free_train.py): lr 0.1, x0.1 after 40,000 and 60,000 of its 80,000 updates (50% and
# 75%), weight decay 2e-4, perturbation started at zero.
# Differences kept: Wong et al. and de Jorge et al. train in mixed precision (apex O2);
# here float32. Wong et al.'s optional early stop (PGD-5 on the first training batch, stop
# at a 20-point drop) is not built in: --config.train.select=best_val
# --config.data.val_size=1000 keeps the checkpoint with the best per-epoch PGD accuracy
# on held-out training images instead. Free's model was WideResNet-32-10 with per-image
# standardisation; here PreActResNet-18 with the dataset's statistics.
"""FGSM-RS, N-FGSM and Free-m recipes for PreActResNet-18 on CIFAR-10."""

from jaxdef.config import base_config

VARIANTS = ("cifar10_preact18_fgsm_rs", "cifar10_preact18_n_fgsm", "cifar10_preact18_free")
EPS = 8 / 255


def _cyclic(c, epochs: int) -> None:
  """Wong et al.'s cyclic rate: 0 -> 0.2 -> 0, linear per step, peak halfway."""
  c.train.epochs = epochs
  c.train.optimizer.update(lr=0.2, schedule="triangle", warmup_epochs=epochs / 2,
                           milestones=())


def get_config(variant: str = "cifar10_preact18_fgsm_rs"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  c = base_config()  # CIFAR-10, crop + flip, SGD 0.9, wd 5e-4 on all parameters, batch 128
  c.model.name = "preact_resnet18"
  c.attack.update(eps=EPS, steps=1)
  if variant == "cifar10_preact18_fgsm_rs":
    c.attack.update(step_size=1.25 * EPS, init="uniform")
    _cyclic(c, 15)
  elif variant == "cifar10_preact18_n_fgsm":
    c.attack.update(step_size=EPS, init="uniform", init_scale=2.0, project=False)
    _cyclic(c, 30)
  else:
    c.attack.update(step_size=EPS, free_replays=8)
    c.train.epochs = 205  # epochs of updates: about the paper's 80,000 at batch 128
    c.train.optimizer.update(lr=0.1, weight_decay=2e-4, milestones=(102.5, 153.75))
  return c
