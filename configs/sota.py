# The strongest public CIFAR-10 recipe: Wang et al. 2023, "Better Diffusion Models
# Further Improve Adversarial Training" (github:wzekai99/DM-Improves-AT, train-wa.py),
# TRADES on real and generated images with weight averaging. One command per variant:
#   jaxdef train --config sota:cifar10_wrn28_10_gen --workdir runs/wrn28_gen \
#       --config.data.data_dir=$HOME/tensorflow_datasets \
#       --config.data.extra.path=~/data/1m.npz
#   jaxdef train --config sota:cifar10_wrn28_10 --workdir runs/wrn28 \
#       --config.data.data_dir=$HOME/tensorflow_datasets
#   jaxdef train --config sota:cifar10_wrn70_16_gen --workdir runs/wrn70_gen \
#       --config.data.data_dir=$HOME/tensorflow_datasets --config.data.extra.path=~/data/gen20m
# CIFAR-10 from TFDS (python -m jaxdef.data.prepare --dataset cifar10 --data_dir DIR). The
# generated images are the authors' EDM release on Hugging Face, datasets/P2333/DM-Improves-AT:
# cifar10/1m.npz (3.1 GB, read into memory as it is), or 20m_part1.npz + 20m_part2.npz
# (61 GB: put both in one folder and `jaxdef data import FOLDER ~/data/gen20m`, then name the
# imported folder). Then `jaxdef eval --config sota:<variant> --workdir <the same>`
# evaluates the selected checkpoint (AutoAttack standard, as the paper reports).
# Reaches (the authors' figures, clean / AutoAttack, eps 8/255, full test set): WRN-28-10
# 92.44 / 67.31 and WRN-70-16 93.25 / 70.69 with 20M-50M generated images and longer
# training than the 1M command below (the released checkpoints; their argument files were not
# read here); the 1M, 400-epoch setting these variants run reaches less (the paper's ablations).
# Not yet measured in jaxdef. Without generated data, for reference: Gowal et al. 2020
# WRN-70-16 85.29 / 57.20.
# Compute: TRADES with 10 attack steps is 12 forward-backward passes and 1 forward per image
# (attack 10, clean + adversarial update 2); 512 images x 39,114 steps = 20.0M images seen
# (the authors: 400 epochs of ceil(50000 / 512) = 98 batches, 39,200 steps). Estimated from
# XLA's FLOP count (jaxdef show-config --config sota:VARIANT --summary) at the 38.3% bf16 MFU
# the H200 measured on WRN-34-10 PGD-10 AT (BENCHMARKS.md), an estimate until the GPU kit
# measures these models; 8 GPUs = one / 8 (ideal data-parallel scaling):
#   cifar10_wrn28_10_gen: 259 GFLOP per image -> 5.2 EFLOP: 3.8 h on one H200, 0.5 h on 8
#   cifar10_wrn28_10:     259 GFLOP per image, 39,235 steps: 3.8 h on one H200, 0.5 h on 8
#   cifar10_wrn70_16_gen: 1.91 TFLOP per image -> 38 EFLOP: 28 h on one H200, 3.5 h on 8
#     (train step memory at batch 512 estimated at 126 GiB: one H200, not one H100)
# plus the per-epoch PGD-40 on 1,024 held-out + 500 test images: +4% (+14% without
# generated data, whose epochs are 95 steps).
# Where jaxdef differs from train-wa.py, on purpose: an epoch is one pass over the real
# images (318 steps of 154 real + 358 generated), so train.epochs = 123 runs 39,114 steps
# for the authors' 39,200 (without generated data 413 epochs of 95 steps, 39,235); the rate
# warms up from 0 (OneCycle: from lr / 25), decays per step, not per epoch, and momentum
# stays 0.9 (OneCycle cycles it 0.95 -> 0.85); the EMA also averages the
# BatchNorm statistics (the authors copy the live ones into the averaged model) and BN
# running statistics start from 0 / 1, not from the first batch; the held-out 1,024 images are
# a fixed draw (data.val_size; the authors hold out the first 1,024); generated images are
# drawn from (seed, step) with replacement, as theirs; compute in bfloat16 (theirs: float32;
# --config.train.dtype=float32).
"""Wang et al. 2023's TRADES + generated data + EMA recipe for WRN-28-10 and WRN-70-16."""

import math

from jaxdef.config import base_config

# (depth, width, generated data) of each variant; all train as the README's command of
# DM-Improves-AT trains WRN-28-10: batch 512, lr 0.2, 400 epochs, fraction 0.7.
_VARIANTS = {
    "cifar10_wrn28_10_gen": (28, 10, True),
    "cifar10_wrn28_10": (28, 10, False),
    "cifar10_wrn70_16_gen": (70, 16, True),
}
VARIANTS = tuple(_VARIANTS)
BATCH, LR, AUTHORS_EPOCHS, GENERATED_FRACTION = 512, 0.2, 400, 0.7
CIFAR10_TRAIN, HELD_OUT = 50_000, 1024


def authors_steps(batch: int = BATCH, epochs: int = AUTHORS_EPOCHS) -> int:
  """train-wa.py's steps: every epoch is ceil(50000 / batch) batches, whatever the mix."""
  return epochs * math.ceil(CIFAR10_TRAIN / batch)


def jaxdef_epochs(batch: int, fraction: float, steps: int) -> int:
  """The whole ``train.epochs`` nearest to ``steps``: a jaxdef epoch is one pass over
  the 48,976 real images left after the held-out ones, at ``batch - round(fraction
  * batch)`` real rows per step (the rest of a pass waits for the next epoch)."""
  real_rows = batch - int(round(fraction * batch))
  return round(steps / ((CIFAR10_TRAIN - HELD_OUT) // real_rows))


def get_config(variant: str = "cifar10_wrn28_10_gen"):
  if variant not in _VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  depth, width, generated = _VARIANTS[variant]
  c = base_config()
  c.data.val_size = HELD_OUT                 # selection on held-out training images
  if generated:
    c.data.extra.path = ""                   # given on the command line (see above)
    c.data.extra_fraction = GENERATED_FRACTION
  # Pre-activation WRN, SiLU, BN momentum 0.01, stride-2 convolutions padded as SAME,
  # the input standardised inside the model (core/models/wideresnetwithswish.py).
  c.model.name = "dm_wide_resnet"
  c.model.kwargs = {"depth": depth, "width": width, "activation": "swish", "bn_decay": 0.99}
  c.objective.name, c.objective.kwargs = "trades", {"beta": 5.0}
  # 10 sign steps of 2/255 on the KL from U(-eps, eps); batch statistics during the attack,
  # not tracked (gowal21uncovering/utils/trades.py: model.train(), track_bn_stats False).
  c.attack.update(eps=8 / 255, step_size=2 / 255, steps=10, init="uniform", bn="train_no_update")
  tc = c.train
  tc.batch_size = BATCH
  tc.epochs = jaxdef_epochs(BATCH, GENERATED_FRACTION if generated else 0.0, authors_steps())
  tc.optimizer.update(name="sgd", lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      weight_decay_on="no_norm", schedule="cosine",
                      warmup_epochs=0.025 * tc.epochs)
  tc.label_smoothing = 0.1                   # every label (the authors' --ls 0.1)
  tc.ema_decay, tc.ema_warmup_epochs = 0.995, 0.025 * tc.epochs
  tc.dtype = "bfloat16"
  # The checkpoint kept: best PGD-40 (C&W margin, step 2/255, uniform start) accuracy of
  # the averaged model on the held-out images, every epoch (watrain.py's eval_attack).
  tc.select = "best_val"
  tc.eval_pgd_steps, tc.eval_pgd_step_size, tc.eval_pgd_loss = 40, 2 / 255, "margin"
  tc.eval_pgd_random_start = True
  tc.eval_examples, tc.eval_batch_size = 500, 500
  tc.checkpoint_every_steps = 2000
  return c
