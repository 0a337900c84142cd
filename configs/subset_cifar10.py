# AT / TRADES / MART with and without CAS or FSR on the local 5085-image CIFAR-10
# subset, small CNN, a few minutes per run on 2 CPU cores:
#   python launch.py --config configs/subset_cifar10.py:at_cas --workdir runs/subset_at_cas
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr.
# Reaches: see the table in the docstring (measured, 1017 test images, PGD-20 eps 8/255).
"""A CPU-sized comparison of the plug-in defenses on real CIFAR-10 images.

Data: ``../shared/data/cifar10_subset.npz`` (5085 train / 1017 test images;
``--config.data.path`` for another copy), crop + flip. Model: the small CNN
(no BatchNorm; CAS after conv4, FSR on pool2). Training: PGD-10 eps 8/255,
step 2/255, SGD momentum 0.9, batch 128.
"""

from configs.cifar10_resnet18_defenses import VARIANTS, defended  # noqa: F401
from jaxdef.configs import base_config


def get_config(variant: str = "at"):
  c = base_config()
  c.data.name = "npz"
  c.data.path = "../shared/data/cifar10_subset.npz"
  c.model.name = "small_cnn"
  c.train.epochs = 10
  c.train.optimizer.lr = 0.05
  c.train.optimizer.milestones = (8, 9)
  c.train.eval_examples = 1017
  c.train.eval_batch_size = 339
  c.train.eval_every_epochs = 5
  c.train.log_every_steps = 13
  return defended(c, variant)
