# ImageNet L-inf 4/255 adversarial training of ResNet-50 at 224 px, one command per variant:
#   jaxdef train --config imagenet:resnet50_pgd --workdir runs/in_pgd \
#       --config.data.path=~/data/imagenet
#   jaxdef train --config imagenet:resnet50_fgsm_rs --workdir runs/in_fgsm \
#       --config.data.path=~/data/imagenet
# Data: ImageNet-1k (ILSVRC2012, from image-net.org) as an ImageFolder tree, train/CLASS/*.JPEG
# and val/CLASS/*.JPEG (the validation images sorted into class folders, e.g. with PyTorch's
# valprep.sh), imported once with `jaxdef data import ~/ILSVRC2012 ~/data/imagenet`: JPEG bytes
# in ArrayRecord shards, streamed and decoded on the host (--config.data.workers=N decodes in N
# processes: a GPU needs many host cores at 224 px, see BENCHMARKS.md). Training crops with the
# Inception random-resized crop + flip to 224; evaluation resizes to 256 and crops the centre.
# Then `jaxdef eval --config imagenet:<variant> --workdir <the same>` (eps 4/255).
#
# resnet50_pgd: Salman et al. 2020, "Do Adversarially Robust ImageNet Models Transfer
# Better?" (github:microsoft/robust-models-transfer, trained with MadryLab/robustness):
# PGD-3 of step 2 eps / 3 (?) from the clean image (the library's default, no random start),
# SGD momentum 0.9, lr 0.1 /10 every 30 epochs, 90 epochs (?), batch 512 (?), weight decay 1e-4
# on every parameter. Reaches (the authors' figures at eps 4/255): 63.86% clean (their
# README), 64.02% clean / 34.96% AutoAttack (RobustBench, 5,000 validation images). Not yet
# measured in jaxdef. Kept different on purpose: no ColorJitter(0.1) or PCA-lighting noise
# (jaxdef's rrc_flip is crop + flip only), bfloat16 compute (their models: float32), the PGD
# iterate is the last one (the library keeps the step of highest loss).
# Compute: 4 forward-backward passes per image (3 attack steps + the update); 1.28M images
# x 90 epochs = 115M images; 71.7 GFLOP per image (XLA's count, jaxdef show-config --config
# imagenet:resnet50_pgd --summary) -> 8.3 EFLOP: 6.1 h on one H200, 0.8 h on 8, estimated at
# the 38.3% bf16 MFU the H200 measured on WRN-34-10 (BENCHMARKS.md) until the GPU kit measures
# ResNet-50, and if the host decodes 5.3k JPEG images/s per GPU (about 31 cores); train step
# memory at batch 512 estimated at 70 GiB.
#
# resnet50_fgsm_rs: Wong et al. 2020, "Fast is better than free" (github:locuslab/
# fast_adversarial, ImageNet/, configs_fast_4px_phase{1,2,3}.yml): FGSM from U(-eps, eps) with
# a step of 5/255 (1.25 eps), SGD momentum 0.9, weight decay 1e-4 not on BatchNorm, 15 epochs,
# mixed precision. Reaches (the paper, eps 4/255): 55.45% clean / 30.28% PGD-50 x 10 (?).
# Kept different on purpose: the reference trains three phases at three sizes and batches
# (epochs 0-6 at 128 px from images resized to 160, batch 512; 6-12 at 224 from 352, batch 224;
# 12-15 at 288 full size, batch 128) with a rate interpolated linearly per step through 0 ->
# 0.4 (epoch 1) -> 0.04 (6) -> 0.004 (12) -> 0.0004 (15); a jaxdef run has one input size and
# one batch, so this variant trains all 15 epochs at 224 px and batch 512, warming up to 0.4
# over the first epoch and dividing it by 10 at epochs 6 and 12 (the decades of the reference,
# held constant within a phase). Compute: 2 forward-backward passes per image; 1.28M x 15 =
# 19.2M images; 39.8 GFLOP per image -> 0.77 EFLOP: 0.6 h on one H200, 4 minutes on 8 (the
# same estimate; 9.5k JPEG images/s per GPU, about 55 host cores; the reference's 128 px
# phase costs a third of this per image).
"""ResNet-50 L-inf 4/255 adversarial training on ImageNet: PGD-3 (Salman et al. 2020) and
FGSM-RS (Wong et al. 2020)."""

from jaxdef.config import base_config

VARIANTS = ("resnet50_pgd", "resnet50_fgsm_rs")
EPS = 4 / 255


def get_config(variant: str = "resnet50_pgd"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  c = base_config()
  c.data.update(name="arrayrecord", path="", augment="rrc_flip", image_size=224)
  c.model.name, c.model.kwargs = "resnet50", {}
  c.objective.name = "at"
  tc = c.train
  tc.batch_size = 512
  tc.dtype = "bfloat16"
  tc.eval_examples, tc.eval_batch_size = 1000, 250
  tc.eval_pgd_steps, tc.eval_pgd_step_size = 10, 1 / 255
  tc.checkpoint_every_steps = 2000
  tc.log_every_steps = 50
  if variant == "resnet50_pgd":
    c.attack.update(eps=EPS, step_size=2 * EPS / 3, steps=3, init="none")
    tc.epochs = 90
    tc.optimizer.update(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                        weight_decay_on="all", schedule="piecewise", milestones=(30, 60))
  else:
    c.attack.update(eps=EPS, step_size=5 / 255, steps=1, init="uniform")
    tc.epochs = 15
    tc.optimizer.update(name="sgd", lr=0.4, momentum=0.9, weight_decay=1e-4,
                        weight_decay_on="no_norm", schedule="piecewise", milestones=(6, 12),
                        warmup_epochs=1.0)
  return c
