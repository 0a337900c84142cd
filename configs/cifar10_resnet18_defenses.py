# {AT, TRADES, MART} x {none, CAS, FSR} on CIFAR-10 with ResNet-18, one variant each:
#   jaxdef train --config cifar10_resnet18_defenses:trades_cas \
#       --workdir runs/c10_r18_trades_cas --config.data.data_dir ~/tensorflow_datasets
# Reaches: not yet measured at full scale (needs a GPU: 100+ epochs of PGD-10). The
# GPU kit's 24-epoch CIFAR-subset figures are in BENCHMARKS.md; the FSR paper reports
# gains of up to 8.57 points of robust accuracy over the bare objectives.
# variants: at, at_cas, at_fsr, trades, trades_cas, trades_fsr, mart, mart_cas, mart_fsr
# (jaxdef's common recipe: one recipe for all, so they compare), and the authors'
# recipes at_cas_paper, trades_cas_paper, mart_cas_paper, at_fsr_paper,
# trades_fsr_paper, mart_fsr_paper, read from their scripts (CAS: bymavis/CAS_ICLR2021
# train.py, train_trades_cifar10_cas.py, train_mart_cas.py, pgd_attack_cifar10_cas.py;
# FSR: wkim97/FSR train.py). Where a *_paper variant differs from the common one:
#   All *_paper: model.normalize=False (the model sees [0, 1] images; common: the
#     dataset's mean/std inside the model); data.keep_last_batch=True (391 steps per
#     epoch, the last batch 80 images, as a DataLoader without drop_last; common: 390).
#   CAS + AT: weight decay 1e-4 (common 5e-4); 200 epochs, the script's default
#     (common 100); the rate falls at 0-based epochs 74 and 89 (MultiStepLR stepped
#     before each epoch; common 75 and 90).
#   CAS + TRADES: objective beta 4 (common 6); attack eps 0.031, step 0.007 (common
#     8/255, 2/255); the rate falls at 0-based epochs 74, 89 and 99.
#   CAS + MART: objective beta 5 (common 6); weight decay 2e-4; 120 epochs; falls at
#     74, 89 and 99; attack eps 0.031, step 0.007, from x + 0.001 N(0, 1)
#     (attack.init='normal'; common: uniform in the ball).
#   All CAS *_paper: train.select='best_test' scored as the authors score it: every
#     epoch, the whole test split (train.eval_examples=0) under their joint attack
#     (train.eval_pgd_joint): AT PGD-10 step 2/255 from the clean image; TRADES, MART
#     PGD-20 step 0.003 at eps 0.031 from a random start (common: 'final').
#     eval.protocol='cas': PGD-20 step 0.003 from a random start; FGSM as one 8/255
#     step from a random start; C&W 20 steps of 0.003, kappa 0, random start; each on
#     the final logits and joint (common: the FSR protocol's PGD step eps/10 from the
#     clean image, C&W 30 steps kappa 50, and joint PGD-20/100).
#   All FSR *_paper: the rate falls at 0-based epochs 74 and 89 (the script's `epoch >=
#     75` on 1-based epochs); train.select='final', the last epoch, as the script keeps;
#     eval.protocol='fsr' (the common variants' evaluation, by its name).
# Differences kept on purpose:
#   CAS evaluation: every column at eps 8/255 (0.0314, the threat model AutoAttack and
#     the other configs use; the script's FGSM budget) where the script runs PGD-20 and
#     C&W at 0.031; the selection attack keeps the scripts' own eps.
#   CAS + MART selection: the script sums the two heads' CE with weight 1; jaxdef's
#     joint loss is beta_cas (2) x their mean, the same sum for ResNet-18's two heads.
#   FSR + TRADES / MART: the FSR code trains AT only, so its budget (8/255, 2/255,
#     uniform start) stays; MART takes weight decay 2e-4, the CAS MART script's.
# The same *_paper variants exist for WRN-34-10, VGG-16 and SVHN (their configs use
# paper_variant below): the authors' code trains them with the same script.
"""Plug-in defenses on the common CIFAR-10 recipe (docs/methods.md sections 0-2).

The common variants train with the same recipe as
``configs/pgd_at.py:cifar10_resnet18`` (SGD 0.9, lr 0.1, weight decay 5e-4,
100 epochs, lr x0.1 at 75 and 90, crop + flip, PGD-10 eps 8/255 step 2/255),
so they differ only in objective and defense. The ``*_paper`` variants are
the authors' recipes (:func:`paper_recipe`; docs/methods.md sections 1-2, the
first comment above lists every difference).

CAS's host-objective hyperparameters (``defense.kwargs.objective``,
``objective_beta``) and its WRN depth are ``FieldReference`` s to
``objective.name``, ``objective.kwargs.beta`` and ``model.kwargs.depth``:
overriding the objective's fields changes CAS's with them.

:func:`defended` is shared by the other ``*_defenses.py`` configs and by
``subset_cifar10.py``.
"""

from typing import Callable

import ml_collections

from jaxdef.configs.pgd_at import get_config as pgd_at_recipe

OBJECTIVES = ("at", "trades", "mart")
DEFENSES = ("none", "cas", "fsr")
COMMON_VARIANTS = tuple(o if d == "none" else f"{o}_{d}" for o in OBJECTIVES for d in DEFENSES)
PAPER_VARIANTS = tuple(f"{o}_{d}_paper" for d in ("cas", "fsr") for o in OBJECTIVES)
VARIANTS = COMMON_VARIANTS + PAPER_VARIANTS


def defended(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets ``c``'s objective and defense from a variant name such as 'trades_cas'."""
  if variant not in COMMON_VARIANTS:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(COMMON_VARIANTS)})")
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


# The CAS scripts' TRADES and MART training attack (their AT script: 8/255, 2/255).
CAS_TRADES_MART_BUDGET = dict(eps=0.031, step_size=0.007)
# The CAS scripts' checkpoint attack for TRADES and MART: PGD-20 of 0.003, random start.
CAS_TRADES_MART_SELECT = dict(eval_pgd_steps=20, eval_pgd_step_size=0.003,
                              eval_pgd_random_start=True)


def paper_recipe(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """The authors' recipe for ``variant`` ('trades_cas', ...) on top of :func:`defended`
  (docs/methods.md sections 0-2; the config file's first comment lists each change)."""
  objective, _, defense = variant.partition("_")
  c.model.normalize = False      # both codes feed the [0, 1] image
  c.data.keep_last_batch = True  # a DataLoader without drop_last
  return (cas_recipe if defense == "cas" else fsr_recipe)(c, objective)


def cas_recipe(c: ml_collections.ConfigDict, objective: str) -> ml_collections.ConfigDict:
  """The CAS scripts' recipe for host ``objective`` (the file's first comment)."""
  opt, tc = c.train.optimizer, c.train
  if objective == "at":
    opt.weight_decay = 1e-4
    tc.epochs = 200
    opt.milestones = (74, 89)
    # The checkpoint attack is the training attack from the clean image.
    tc.eval_pgd_steps, tc.eval_pgd_step_size = c.attack.steps, c.attack.step_size
    tc.eval_pgd_random_start = False
  else:
    c.objective.kwargs.beta = 4.0 if objective == "trades" else 5.0
    c.attack.update(CAS_TRADES_MART_BUDGET)
    opt.milestones = (74, 89, 99)
    tc.update(CAS_TRADES_MART_SELECT)
    if objective == "mart":
      opt.weight_decay = 2e-4
      tc.epochs = 120
      c.attack.init = "normal"  # x + 0.001 N(0, 1) (attack.init_sigma)
  tc.select = "best_test"
  tc.eval_examples = 0           # the whole test split
  tc.eval_pgd_joint = True
  c.eval.protocol = "cas"        # the protocol's fields: jaxdef.config.PROTOCOLS
  c.eval.eps = 8 / 255           # the threat model (the file's first comment)
  return c


def fsr_recipe(c: ml_collections.ConfigDict, objective: str) -> ml_collections.ConfigDict:
  """The FSR script's recipe for host ``objective`` (the file's first comment)."""
  c.train.optimizer.milestones = (74, 89)
  c.train.select = "final"
  c.eval.protocol = "fsr"  # FGSM, PGD-20/100 step eps/10 and C&W from the clean image
  if objective == "mart":
    c.train.optimizer.weight_decay = 2e-4
  return c


def paper_variants(common: tuple[str, ...]) -> tuple[str, ...]:
  """The ``*_paper`` names of the CAS / FSR variants among ``common``."""
  return tuple(f"{v}_paper" for v in common if v.endswith(("_cas", "_fsr")))


def paper_variant(recipe: Callable[[], ml_collections.ConfigDict], variant: str,
                  common: tuple[str, ...] = COMMON_VARIANTS) -> ml_collections.ConfigDict:
  """``variant`` (one of ``common`` or its ``*_paper`` form) on ``recipe()``:
  :func:`defended`, then :func:`paper_recipe` for a ``*_paper`` name."""
  valid = common + paper_variants(common)
  if variant not in valid:
    raise ValueError(f"unknown variant {variant!r} (valid: {', '.join(valid)})")
  base = variant.removesuffix("_paper")
  c = defended(recipe(), base)
  return paper_recipe(c, base) if base != variant else c


def get_config(variant: str = "at_cas") -> ml_collections.ConfigDict:
  return paper_variant(lambda: pgd_at_recipe("cifar10_resnet18"), variant)
