# {AT, TRADES, MART} x {none, CAS, FSR} on CIFAR-10 with ResNet-18, one variant each:
#   python launch.py --config configs/cifar10_resnet18_defenses.py:trades_cas \
#       --workdir runs/c10_r18_trades_cas --config.data.data_dir ~/tensorflow_datasets
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr.
# Reaches: not yet measured at full scale (needs a GPU: 100 epochs of PGD-10 training).
# The FSR paper reports gains of up to 8.57 points of robust accuracy over the bare
# objectives; configs/subset_cifar10.py has the small CPU comparison measured in jaxdef.
"""Plug-in defenses on the common CIFAR-10 recipe (METHODS.md sections 0-2).

Every variant trains with the same recipe as ``configs/pgd_at.py:cifar10_resnet18``
(SGD 0.9, lr 0.1, weight decay 5e-4, 100 epochs, lr x0.1 at 75 and 90, crop +
flip, PGD-10 eps 8/255 step 2/255), so the variants differ only in objective
and defense. The papers' own recipes differ a little; use overrides for them:

* CAS with AT: ``--config.train.optimizer.weight_decay=1e-4 --config.train.epochs=120``;
  CAS with TRADES: ``--config.objective.kwargs.beta=4``; with MART: ``beta=5``.
* MART: ``--config.train.optimizer.weight_decay=2e-4 --config.train.epochs=120``.

CAS's host-objective hyperparameters (``defense.kwargs.objective``,
``objective_beta``) and its WRN depth are ``FieldReference`` s to
``objective.name``, ``objective.kwargs.beta`` and ``model.kwargs.depth``:
overriding the objective's fields changes CAS's with them.

:func:`defended` is shared by the other ``*_defenses.py`` configs and by
``subset_cifar10.py``.
"""

import ml_collections

from configs.pgd_at import get_config as pgd_at_recipe

OBJECTIVES = ("at", "trades", "mart")
DEFENSES = ("none", "cas", "fsr")
VARIANTS = tuple(o if d == "none" else f"{o}_{d}" for o in OBJECTIVES for d in DEFENSES)


def defended(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets ``c``'s objective and defense from a variant name such as 'trades_cas'."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(VARIANTS)})")
  objective, _, defense = variant.partition("_")
  c.objective.name = objective
  if objective != "at":
    c.objective.kwargs.beta = 6.0  # TRADES and MART papers' default
  c.defense.name = defense or "none"
  if defense == "cas":
    c.defense.kwargs.beta = 2.0
    c.defense.kwargs.objective = c.objective.get_ref("name")
    if objective != "at":
      c.defense.kwargs.objective_beta = c.objective.kwargs.get_ref("beta")
    if "depth" in c.model.kwargs:
      c.defense.kwargs.depth = c.model.kwargs.get_ref("depth")
  elif defense == "fsr":
    c.defense.kwargs.update(dict(lam_sep=1.0, lam_rec=1.0, tau=0.1))
  if defense:
    # The CAS/FSR papers' evaluation: PGD-20/100 with step eps/10 (0.8/255 at
    # 8/255) from the clean image; the suite adds the joint aux-head attacks
    # (eval.joint_attacks) and AutoAttack in the same table.
    c.eval.pgd_step_size = c.attack.eps / 10
    c.eval.pgd_random_start = False
  return c


def get_config(variant: str = "at_cas") -> ml_collections.ConfigDict:
  return defended(pgd_at_recipe("cifar10_resnet18"), variant)
