# AT / TRADES / MART with and without CAS or FSR on the local 5085-image CIFAR-10
# subset, small CNN, 6-16 minutes per run on 2 shared CPU cores:
#   jaxdef train --config subset_cifar10:at_cas --workdir runs/subset_at_cas
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr.
# Reaches (measured, 1017 test images, eps 8/255): AT 33.9% clean / 25.0% PGD-20;
# AT+CAS 36.1 / 29.2 but 18.8 under the joint attack; see the table below.
"""A CPU-sized comparison of the plug-in defenses on real CIFAR-10 images.

Data: ``data/cifar10_subset.npz`` (relative to the working directory; 5085 train / 1017 test images;
``--config.data.path`` for another copy), crop + flip. Model: the small CNN
at half width (no BatchNorm; CAS after conv4, FSR on pool2, 5x5x32). Training:
8 epochs of PGD-5 (eps 8/255, step 2/255; eps and step ramp up over the first
2 epochs, without which this network stalls at chance under eps 8/255), SGD
momentum 0.9, lr 0.05 (x0.1 at epochs 6 and 7), batch 128, weight decay 5e-4.
Evaluation at the end: clean and PGD-20 (step 2/255, final logits) on all
1017 test images.

Measured (jaxdef, 2026-11, 2-core CPU shared with other jobs, seed 0). Clean
and PGD-20: the run summary. Worst: the lower of PGD-20 on the final logits
and PGD-20 on the joint loss (``cas_joint_attack_loss`` /
``fsr_joint_attack_loss``, aux heads included), same 1017 images. AA:
AutoAttack standard on the first 100 test images (``jaxdef.evaluate``).

| variant    | clean | PGD-20 | worst (joint) | AA (100) | train s |
|------------|-------|--------|---------------|----------|---------|
| at         | 33.9  | 25.0   | 25.0          | 30 (PGD-20 35, clean 41) | 380 |
| at_cas     | 36.1  | 29.2   | 18.8          | 26 (PGD-20 34, clean 39) | 369 |
| at_fsr     | 25.9  | 17.8   | 17.2          |          | 513     |
| trades     | 38.2  | 22.3   | 22.4          |          | 702     |
| trades_cas | 31.0  | 27.9   | 23.5          |          | 769     |
| trades_fsr | 36.9  | 18.7   | 18.4          |          | 970     |
| mart       | 30.4  | 22.1   |               |          | 362     |

The CAS rows above used jaxdef's earlier CAS terms. With the authors' terms
(with TRADES the heads' CE on the clean input and their KL weighted
2 x beta; with MART the heads' KL weighted 2 x beta x (1 - p_y)), measured
2026-11-27 on the same recipe and seed, 2-core CPU shared with a CI run:

| variant    | clean | PGD-20 | joint PGD-20 | worst | train s |
|------------|-------|--------|--------------|-------|---------|
| trades_cas | 36.8  | 31.5   | 23.2         | 21.7  | 988     |
| mart_cas   | 9.8   | 9.8    |              |       | 818     |

(joint PGD-20 and worst: ``--mode eval`` with the papers' PGD step eps/10
from the clean image, all 1017 images.) TRADES + CAS gains clean and
final-logits accuracy over the old terms and loses nothing under the joint
attack, but is still no better than plain TRADES in the worst case.
MART + CAS collapses: the heads' KL term (weight 12 x (1 - p_y)) drives the
auxiliary heads to constant outputs (standard deviation 3e-5 over test
images), the true-label mask of training then hands the label to the final
layer (training accuracy 100%, test accuracy 100% with the true label's
mask), and at test time the heads' argmax, a constant, picks the mask: 9.8%,
chance. Plain MART trains (30.4 / 22.1). Whether the authors' ResNet-18
setting escapes this is for a GPU run to say.

At this budget CAS's gain under final-logits PGD is mostly gradient masking:
with AT the joint attack and AutoAttack put it below plain AT; with TRADES it
keeps about one point under the joint attack at seven points of clean
accuracy. FSR lowers both clean and robust accuracy (8 epochs of a small CNN without BatchNorm: far from the papers'
ResNet-18 / 100-epoch setting, so this says nothing about their claims).
Without aux heads (at, trades) the worst column is a second final-logits PGD-20.
Train times vary with the machine's load (31-128 images/s).

The evaluation suite now runs the joint attacks itself (``eval.joint_attacks``);
the README's "CAS and FSR on the CIFAR-10 subset" table has its figures for
at, at_cas and at_fsr (AutoAttack, joint PGD-20, masking checks, 200 images).
"""

from jaxdef.configs.cifar10_resnet18_defenses import COMMON_VARIANTS as VARIANTS, defended  # noqa: F401
from jaxdef.config import base_config


def get_config(variant: str = "at"):
  c = base_config()
  c.data.update(dict(name="npz", path="data/cifar10_subset.npz"))
  c.model.update(dict(name="small_cnn", kwargs={"width": 0.5}))
  c.attack.update(dict(steps=5, warmup_epochs=2.0))
  c.train.update(dict(epochs=8, eval_examples=1017, eval_batch_size=339, eval_every_epochs=8,
                      log_every_steps=13))
  c.train.optimizer.update(dict(lr=0.05, milestones=(6, 7)))
  return defended(c, variant)
