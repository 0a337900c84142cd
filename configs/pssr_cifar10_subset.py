# PSSR (pixel surgery + semantic regeneration, docs/methods.md section 5; a reconstruction from
# the abstract) on the local 5085-image CIFAR-10 subset, around the half-width small CNN of
# configs/subset_cifar10.py trained with PGD-AT first, L-inf eps 8/255:
#   jaxdef train --config subset_cifar10:at --workdir runs/subset_at
#   jaxdef train --config pssr_cifar10_subset --workdir runs/pssr_subset \
#       --config.pssr.classifier_workdir=runs/subset_at
#   jaxdef eval --config pssr_cifar10_subset --workdir runs/pssr_subset
# variants: frozen (default), joint.
# No `paper` variant: PSSR's authors published no code or recipe (docs/methods.md section 5),
# so there is nothing to reproduce beyond this reconstruction.
# Reaches (measured 2026-11-22, first 200 test images, eps 8/255, README issue-6 table): around
# the PGD-AT classifier (37.0 / 29.0 bare) 35.5% clean, PGD-20 26.0 non-adaptive, 24.5 BPDA;
# around a standard one (48.5 / 2.5 bare) 45.0 clean, 18.0 non-adaptive, 9.5 BPDA, 4.0 with
# restarts (the suite's masking check fails).
"""PSSR on the CIFAR-10 subset: ``configs/subset_cifar10.py:at`` + the PSSR set-up of
``configs/pssr_mnist.py`` (:func:`pssr_setup`).

rho = 0.2 (docs/methods.md: 0.1-0.2 on CIFAR); the regenerator is the same U-Net
(width 16, two levels: 32 -> 16 -> 8); examples are the subset recipe's
PGD-5 (eps 8/255, step 2/255) of the bare classifier, without the ramp;
SGD lr 0.01, batch 128, 4 epochs, crop + flip as in the classifier's run.
The classifier workdir must hold a ``small_cnn`` of width 0.5 (the ``at``
variant of ``configs/subset_cifar10.py``).
"""

from jaxdef.configs.pssr_mnist import VARIANTS, pssr_setup  # noqa: F401
from jaxdef.configs.subset_cifar10 import get_config as subset_recipe


def get_config(variant: str = "frozen"):
  c = subset_recipe("at")
  c = pssr_setup(c, variant, classifier="small_cnn", classifier_kwargs={"width": 0.5},
                 rho=0.2)
  c.train.update(dict(epochs=4, eval_every_epochs=4, eval_examples=500))
  c.train.optimizer.update(dict(lr=0.01, milestones=()))
  c.eval.attacks = "clean,fgsm,pgd20,cw"
  c.eval.adaptive_attacks = "pgd20"
  c.eval.num_examples = 500
  return c
