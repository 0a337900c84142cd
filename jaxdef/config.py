"""A run's config: the base config, the evaluation defaults and validation.

:func:`base_config` is what every file in ``configs/`` starts from;
:func:`default_eval_config` its ``eval`` section; :func:`validate` raises a
one-line :class:`ConfigError` naming the first bad field, before any data is
read or anything is compiled. A test-time transform's own section (e.g.
``nip``) is checked by the check its module registers
(:func:`jaxdef.defenses.check_sections`).

Fields of :func:`base_config` (all overridable as ``--config.section.field=value``):

* ``seed``: randomness of init, data order, augmentation and attacks.
* ``data``: ``name`` (mnist5k | npz | arrayrecord | cifar10 | cifar100 |
  svhn_cropped | mnist | fashion_mnist), ``path`` (npz; arrayrecord: the
  folder ``jaxdef data import`` wrote), ``data_dir`` (TFDS), ``augment``
  (none | crop_flip | rrc_flip), ``max_train`` / ``max_test`` (0 = all), ``val_size``
  (training examples held out for ``train.select = 'best_val'``; 0 = none),
  ``keep_last_batch`` (False: an epoch is floor(N / B) full batches and the
  remainder waits for a later epoch's permutation; True: ceil(N / B) steps,
  the last one smaller, every example once per epoch, as a PyTorch
  DataLoader without ``drop_last``), ``streamed`` (None: streamed for
  ``arrayrecord``, a folder ``jaxdef data import`` wrote, named by ``path``;
  in memory otherwise; False reads an imported folder into memory),
  ``workers`` (streamed: Grain worker processes that read, decode and crop;
  0 = in the training process), ``image_size`` (the side of the training
  images with ``augment='rrc_flip'``; 0 = as stored), ``extra.path`` (an
  extra training source mixed into every batch: an imported folder or an
  .npz with ``image``/``label``), ``extra_fraction`` (its share of every
  batch, drawn with replacement; the training split, drawn without, defines
  the epoch) and ``extra_label_smoothing`` (label smoothing of its rows);
  ``cutmix`` (True: CutMix on every training batch, after augmentation: one
  box of Beta(1, 1) area from a shuffled copy of the batch, labels mixed by
  the box's actual area into target distributions that the objective and
  its attack take, as Rebuffi et al. 2021 train; objective at or trades,
  defense none; :mod:`jaxdef.data.cutmix`).
* ``model``: ``name`` and constructor ``kwargs`` (e.g. WRN depth/width);
  ``normalize`` (True: the model standardises its [0, 1] input with the
  dataset's mean and std; False: it sees the [0, 1] image itself);
  ``remat`` (True: every residual block of a ResNet or WRN recomputes its
  activations in the backward pass, ``flax.linen.remat``: less device memory
  for about one more forward pass, the same parameters and results).
* ``objective``: ``name`` (at | trades | mart) and ``kwargs`` (e.g. beta).
* ``defense``: ``name`` (none | cas | fsr | ...) and ``kwargs``.
* ``attack``: the training attack, PGD ``eps``, ``step_size``, ``steps``,
  ``norm``, ``bn`` ('eval': BatchNorm running statistics during the attack, as
  the TRADES and MART codes; 'train_no_update': batch statistics, not
  updated, as the DeepMind and DM-Improves-AT codes),
  ``warmup_epochs`` (eps and step size ramp linearly from 0), ``unroll``
  (the PGD ``fori_loop``'s unrolling; 0 = by backend, see
  :func:`jaxdef.attacks.pgd.loop_unroll`), ``init`` (the start: '' = the
  objective's own, uniform for AT and MART and Gaussian for TRADES; or one of
  :data:`jaxdef.attacks.pgd.INITS`), ``init_sigma`` (the Gaussian start's
  scale, x + init_sigma N(0, 1)), ``init_scale`` (the uniform start's radius
  in units of eps) and ``project`` (False: iterates are kept in [0, 1] only,
  not projected onto the eps-ball). FGSM-RS (Wong et al. 2020): ``steps=1``,
  ``step_size=1.25 eps``, ``init='uniform'``; N-FGSM (de Jorge et al. 2022):
  ``steps=1``, ``step_size=eps``, ``init='uniform'``, ``init_scale=2``,
  ``project=False``. ``step_rule``: 'steepest' (steps of ``step_size`` along
  the sign of the gradient, L2: its direction) or 'adam' (Adam on the raw
  gradient, the DeepMind recipe of Gowal et al. 2020: learning rate
  ``adam_lr`` multiplied by each of ``adam_scales`` from the attack step in
  ``adam_boundaries`` on; defaults 0.1, (5,), (0.1,): lr 0.1 for steps 0-4,
  0.01 after; ``step_size`` unused; :func:`jaxdef.attacks.pgd.adam_ascent`).
  ``free_replays``: Free adversarial training, Free-m (Shafahi et al. 2019;
  :mod:`jaxdef.train.free`) when > 1: every batch is replayed m times, each
  replay one forward-backward pass that updates the weights and ascends a
  perturbation kept across batches (``step_size`` per replay within ``eps``;
  the paper: both eps, m = 8). ``train.epochs`` then counts epochs of
  updates, as the paper states them: the data are read ``epochs / m`` times
  (205 epochs at m = 8 read CIFAR-10 25.6 times), and the learning rate,
  warm-ups and milestones count updates; ``train.eval_every_epochs`` counts
  passes over the data. Needs ``steps=1`` and an objective and defense whose
  loss needs only the adversarial pass (AT; none, CAS with AT, FSR).
* ``train``: batch size, epochs, the optimizer (``optimizer.name`` sgd |
  adamw, ``schedule`` piecewise | cosine | triangle | constant after
  ``warmup_epochs``, ``base_batch``: when set, ``lr`` is per ``base_batch``
  images and scales with ``batch_size``; ``weight_decay_on`` all | no_norm |
  kernels, see :func:`jaxdef.train.state.decay_mask`), EMA (``ema_decay``,
  ``ema_warmup_epochs``), compute dtype, logging,
  checkpoints, ``trainable`` (which parameters the optimizer updates),
  ``init_from`` (parameters taken from other runs at the start);
  the per-epoch evaluation: clean and PGD accuracy on the first
  ``eval_examples`` test images (0 = all), the PGD of ``eval_pgd_steps``
  steps of ``eval_pgd_step_size`` at ``attack.eps``, from a uniform start
  (``eval_pgd_random_start``) or the clean image, ascending ``eval_pgd_loss``
  ('ce', or 'margin': the C&W margin min(max_{k != y} z_k - z_y, 0), the
  checkpoint attack of Wang et al. 2023) on the final logits or
  (``eval_pgd_joint``) jointly with a defense's auxiliary heads, on the EMA
  weights when ``ema_decay`` > 0; ``label_smoothing`` (of every training
  label, composed with ``data.extra_label_smoothing`` on the extra rows:
  :meth:`jaxdef.data.mixing.BatchPlan.label_smoothing`); and
  ``select``, the checkpoint evaluated, chosen by that evaluation's PGD
  accuracy: 'final' (the last), 'best_val' (the best on the ``data.val_size``
  held-out training examples) or 'best_test' (the best on the test split:
  the CAS authors' rule, optimistic).
  ``awp``: Adversarial Weight Perturbation (Wu et al. 2020,
  :mod:`jaxdef.train.awp`) around every update: ``gamma`` (the perturbation's
  size relative to each weight tensor's norm; 0 = off; AT 0.01, TRADES
  0.005), ``proxy_lr`` (the proxy's SGD step; AT 0.01, TRADES 0.1) and
  ``warmup_epochs`` (epochs trained without it first). Refused with a
  test-time transform (``eval.transform``, defense ``pssr``), with a
  defense that makes several updates per batch and with Free-m.
  ``bn_update``: which passes of the training loss update BatchNorm's running
  statistics: 'both' (the clean pass, when the objective has one, then the
  adversarial pass; DM-Improves-AT) or 'adversarial' (the clean pass
  normalises with its batch's statistics and keeps none; the DeepMind code).
* ``eval``: the evaluation suite (:func:`default_eval_config`).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import ml_collections

from jaxdef.attacks.pgd import ADAM_BOUNDARIES, ADAM_LR, ADAM_SCALES, NORMAL_INIT_SIGMA
from jaxdef.errors import ConfigError, unknown_name

DTYPES = ("float32", "bfloat16")
# train.select: which checkpoint restore() and --mode eval use.
SELECTS = ("final", "best_val", "best_test")
ON_NONFINITE = ("stop", "skip")
AUGMENTS = ("none", "crop_flip", "rrc_flip")
# train.optimizer: name, schedule and which parameters weight decay acts on
# (jaxdef.train.state.make_optimizer, learning_rate_schedule, decay_mask).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("piecewise", "cosine", "triangle", "constant")
DECAY_ON = ("all", "no_norm", "kernels")
# eval.unit_test: the attack unit test (jaxdef.evaluate.binarization).
UNIT_TEST_MODES = ("off", "cheap", "full")
# train.bn_update: the training loss's passes that update BatchNorm statistics
# (jaxdef.train.step.make_train_step).
BN_UPDATES = ("both", "adversarial")
# train.eval_pgd_loss: what the per-epoch PGD ascends (jaxdef.train.step.make_eval_step).
EVAL_PGD_LOSSES = ("ce", "margin")
# Models built for ImageNet-size inputs, by name: the side they were designed for.
# ResNet-50's 7x7 stride-2 stem and max-pool, then three stride-2 stages, shrink
# the image 32x: a 32 px image reaches the last stage as 1x1.
LARGE_INPUT_MODELS = {"resnet50": 224}
# The side of each named dataset's images, known before it is read (npz and
# arrayrecord data are checked once read: jaxdef.train.loop.prepare).
STORED_SIDES = {"cifar10": 32, "cifar100": 32, "svhn_cropped": 32, "mnist": 28,
                "fashion_mnist": 28, "mnist5k": 28}


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the common CIFAR-10 PGD-AT recipe (docs/methods.md section 0)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="cifar10", path="", data_dir="", augment="crop_flip", max_train=0, max_test=0,
      val_size=0, keep_last_batch=False,
      # None: streamed for data.name='arrayrecord' (a `jaxdef data import` folder),
      # in memory otherwise; False reads an imported folder into memory.
      streamed=ml_collections.config_dict.placeholder(bool), workers=0, image_size=0,
      extra=ml_collections.ConfigDict(dict(path="")), extra_fraction=0.0,
      extra_label_smoothing=0.0, cutmix=False))
  c.model = ml_collections.ConfigDict(dict(name="resnet18", kwargs={}, normalize=True,
                                          remat=False))
  c.objective = ml_collections.ConfigDict(dict(name="at", kwargs={}))
  c.defense = ml_collections.ConfigDict(dict(name="none", kwargs={}))
  c.attack = ml_collections.ConfigDict(dict(
      eps=8 / 255, step_size=2 / 255, steps=10, norm="linf", bn="eval", warmup_epochs=0.0,
      unroll=0, init="", init_sigma=NORMAL_INIT_SIGMA, init_scale=1.0, project=True,
      step_rule="steepest", adam_lr=ADAM_LR, adam_boundaries=ADAM_BOUNDARIES,
      adam_scales=ADAM_SCALES))

  c.attack.free_replays = 0  # Free-m: m replays per batch (0 or 1 = off; jaxdef.train.free)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.epochs = 100
  c.train.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
      schedule="piecewise", milestones=(75, 90), warmup_epochs=0.0, base_batch=0,
      weight_decay_on="all", betas=(0.9, 0.999)))
  c.train.ema_decay = 0.0
  c.train.ema_warmup_epochs = 0.0  # the EMA copies the weights until then
  c.train.dtype = "float32"
  # True: the attacks read the weights cast to train.dtype once per step, outside
  # their loop (same values; off until the GPU kit measures it).
  c.train.cast_params_once = False
  c.train.log_every_steps = 20
  c.train.eval_every_epochs = 1
  c.train.eval_examples = 1000   # 0: the whole test split
  c.train.eval_batch_size = 200
  c.train.eval_pgd_steps = 20
  c.train.eval_pgd_step_size = 2 / 255
  c.train.eval_pgd_random_start = True
  c.train.eval_pgd_joint = False  # True: PGD on the final + auxiliary heads' loss (CAS, FSR)
  c.train.eval_pgd_loss = "ce"    # or "margin" (Wang et al. 2023's checkpoint attack)
  c.train.label_smoothing = 0.0   # of every training label (Wang et al. 2023: 0.1)
  c.train.checkpoint_every_steps = 1000
  c.train.max_to_keep = 3
  c.train.on_nonfinite = "stop"  # or "skip": drop the batch, count it, go on
  # Several processes: how often they agree whether a signal stops them all
  # (jaxdef.train.distributed.StopAgreement); one process checks every step.
  c.train.stop_check_every_steps = 1
  # Regex on parameter paths ('classifier/Conv_0/kernel'); only matching ones are
  # updated ('' = all). E.g. '^regenerator/' trains PSSR's regenerator alone.
  c.train.trainable = ""
  # Passes of the training loss that update BatchNorm statistics: "both" | "adversarial".
  c.train.bn_update = "both"
  # {top-level subtree: workdir}: a fresh run takes those parameters (and BatchNorm
  # statistics) from a trained run's model, e.g. {'classifier': 'runs/at'} for PSSR.
  c.train.init_from = ml_collections.ConfigDict()
  c.train.select = "final"       # or "best_val" (needs data.val_size), "best_test"
  # Adversarial Weight Perturbation (jaxdef.train.awp); gamma 0 = off.
  c.train.awp = ml_collections.ConfigDict(dict(gamma=0.0, proxy_lr=0.01, warmup_epochs=0.0))

  # The evaluation suite (jaxdef eval); threat model = the training attack's.
  c.eval = default_eval_config()
  return c


def default_eval_config(eps: Optional[float] = None,
                        norm: Optional[str] = None) -> ml_collections.ConfigDict:
  """``config.eval``: the suite of docs/methods.md sec. 6 for threat model (eps, norm).

  Left unset (None), ``eps``, ``norm``, ``pgd_step_size`` (eps / 4) and
  ``curve_eps`` (eps x 1/4 ... 8) follow the run's training attack: see
  :func:`resolve_eval_config`. Every base config carries this section, so
  ``--config.eval.FIELD=value`` works on any config file.
  """
  placeholder = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.num_examples = 1000          # first test examples evaluated (stated in the table)
  c.protocol = "none"            # or a paper's evaluation: cas | fsr | aad | nip (PROTOCOLS)
  c.batch_size = 250             # a multiple of the number of devices
  c.attacks = "clean,fgsm,pgd20,pgd100,cw,autoattack"
  c.eps = placeholder(float) if eps is None else float(eps)
  c.norm = placeholder(str) if norm is None else norm
  c.pgd_step_size = placeholder(float)
  c.curve_eps = placeholder(tuple)
  if eps is not None:
    resolve_eval_config(c, eps=eps, norm=norm or "linf", in_place=True)
  c.pgd_restarts = 1
  # Indicators of attack failure (Pintor et al. 2022) recorded by the PGD-family
  # attacks (fgsm, pgdN, cw and their joint forms) with one restart.
  c.indicators = True
  c.pgd_random_start = True      # pgdN, joint-pgdN, cw; the FSR protocol: False (step 0.8/255)
  # Run in addition when the model has auxiliary heads (CAS, FSR): PGD on the
  # final plus the heads' losses (docs/methods.md sec. 6, adaptive protocol).
  c.joint_attacks = "joint-pgd20,joint-pgd100"
  # Input-transformation defenses (NIP, PSSR): 'none' or a registered
  # transform. ``attacks`` then attack the bare classifier (the papers'
  # non-adaptive protocol) and ``adaptive_attacks`` the whole pipeline.
  c.transform = "none"
  c.adaptive_attacks = "pgd20,pgd100,autoattack"
  c.adaptive_backward = "bpda"   # 'bpda' (identity backward) or 'exact'
  # Transfer attacks (the transfer-failure indicator): ``transfer_attacks`` made
  # on the run in ``surrogate_workdir`` (e.g. the same architecture without the
  # defense) and scored on this model; '' runs none.
  c.surrogate_workdir = ""
  c.transfer_attacks = "pgd20"
  c.eot_samples = 10             # gradient draws per step on randomized pipelines
  # A randomized pipeline's accuracy in every column but AutoAttack's is scored
  # under this many fresh draws of its randomness (the reference library's
  # advice), reported as mean and spread; AutoAttack follows the reference's
  # fresh draw after each stage instead.
  c.score_draws = 5
  c.cw_steps = 30
  c.cw_kappa = 50.0
  # fgsm / joint-fgsm from a uniform point of the eps-ball (the CAS protocol) or x.
  c.fgsm_random_start = False
  # 'auto': 'rand' for a randomized target (EOT), 'standard' otherwise; 'standard'
  # or 'plus' on a randomized target is refused in one line.
  c.aa_version = "auto"
  c.aa_eot_iter = 0              # EOT draws of the 'rand' version's APGD (0: its 20)
  c.aa_n_target_classes = 9      # targets of APGD-T and FAB-T
  c.aa_steps = 100               # APGD iterations inside AutoAttack
  c.aa_fab_steps = 100
  c.aa_queries = 5000            # Square queries
  c.aa_chunks = 5                # compute skipped for chunks with no robust example left
  c.curve_attack = "pgd20"
  c.masking_checks = True
  # Grad-CAM attention of clean vs PGD-20 images (IoU and a picture) after the suite.
  c.attention = True
  c.masking_num_examples = 200   # examples for the eps curve and the stronger-PGD check
  # A stronger PGD than the suite's: 50 steps x 2 restarts (100 gradient steps; was
  # 100 x 5). The APGD-CE check covers a weak step size, which restarts cannot.
  c.masking_pgd_steps = 50
  c.masking_pgd_restarts = 2
  # A check fails when its excess (a fraction of the examples) is above this AND
  # the lower end of its 95% Wilson interval at the number of examples is too.
  c.masking_tolerance = 0.03
  # The attack unit test (binarization, Zimmermann et al. 2022): 'cheap' checks that
  # the suite's strongest attack (APGD-CE if AutoAttack runs, else its longest PGD)
  # finds adversarial examples that exist by construction on the first 20 examples;
  # 'full' checks every gradient attack of the suite on ``unit_test_examples``; 'off'.
  # Below ``unit_test_threshold`` the headline is marked unreliable.
  c.unit_test = "cheap"
  c.unit_test_examples = 200
  c.unit_test_threshold = 0.95
  c.seed = 0
  return c


# ``eval.protocol``: a paper's own evaluation (docs/methods.md sections 1-4). Its
# columns come first; the suite then adds AutoAttack, and the joint (aux-head)
# and adaptive attacks as for any run, and the worst case over all of them
# stays the headline. ``pgd_step`` is a fraction of eps (or, as a string, an
# absolute step at eps 8/255 scaled with eps).
PROTOCOLS = {
    # CAS (the authors' pgd_attack_cifar10_cas.py): PGD-20 with step 0.003 from a
    # random start; FGSM as one step of eps from a random start; C&W as 20 steps
    # of 0.003 on the margin with kappa 0 from a random start; each on the final
    # logits and jointly with the heads (eval.joint_attacks; the paper's headline
    # is joint PGD-20).
    "cas": dict(attacks="clean,fgsm,pgd20,cw", joint_attacks="joint-fgsm,joint-pgd20,joint-cw",
                pgd_step=0.003 / (8 / 255), pgd_random_start=True, fgsm_random_start=True,
                cw_steps=20, cw_kappa=0.0),
    # FSR: FGSM; PGD-20 and PGD-100 with step eps/10 and C&W-inf (PGD-30 on the
    # margin, kappa 50), all from the clean image; "ensemble" is the suite's.
    "fsr": dict(attacks="clean,fgsm,pgd20,pgd100,cw", pgd_step=0.1, pgd_random_start=False,
                cw_steps=30, cw_kappa=50.0),
    # AAD: the least-likely-class attacks of its paper.
    "aad": dict(attacks="clean,stepll,r+stepll,iterll"),
    # NIP: the transform composed with the classifier; minimum-norm (FAB,
    # untargeted, closest point within eps) and full-budget PGD-20 examples of
    # the bare classifier, each scored for the deployed NIP and for the authors'
    # oracle (its own column: it reads the clean image).
    "nip": dict(attacks="clean,fab,pgd20", transform="nip"),
}


def protocol_fields(name: str) -> dict[str, Any]:
  """The fields ``eval.protocol = name`` fixes ({} for 'none'); a one-line
  ConfigError for an unknown name."""
  if name == "none":
    return {}
  if name not in PROTOCOLS:
    raise unknown_name("eval.protocol", name, ["none", *PROTOCOLS])
  return dict(PROTOCOLS[name])


def apply_protocol(c: ml_collections.ConfigDict) -> None:
  """Sets the fields of ``c`` (a resolved ``eval`` section) that its ``protocol``
  fixes, AutoAttack appended to its columns; nothing for 'none'."""
  fields = protocol_fields(c.get("protocol", "none"))
  if not fields:
    return
  if "pgd_step" in fields:
    c.pgd_step_size = fields.pop("pgd_step") * c.eps
  columns = fields.pop("attacks").split(",")
  c.attacks = ",".join(columns + ["autoattack"])
  c.update(fields)


def with_eval_defaults(eval_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``eval_config`` holding every field of today's
  :func:`default_eval_config`: its own values kept, fields added since it was
  written (a run trained before ``eval.unit_test`` existed) at their defaults."""
  fields = default_eval_config().to_dict()
  fields.update(eval_config.to_dict())
  return ml_collections.ConfigDict(fields)


def resolve_eval_config(eval_config: ml_collections.ConfigDict, *, eps: float, norm: str,
                        in_place: bool = False) -> ml_collections.ConfigDict:
  """Fills the unset threat-model fields of ``eval_config`` from (eps, norm),
  then applies its ``protocol`` (:func:`apply_protocol`). A copy (unless
  ``in_place``) also gets the fields an older config lacks
  (:func:`with_eval_defaults`).

  ``pgd_step_size`` defaults to eps / 4 (2/255 at 8/255) and ``curve_eps`` to
  eps x (1/4, 1/2, 1, 2, 4, 8), capped at 1 for L-inf (a value the cap repeats
  is kept once).
  """
  c = eval_config if in_place else with_eval_defaults(eval_config)
  if c.eps is None:
    c.eps = float(eps)
  if c.norm is None:
    c.norm = norm
  if c.pgd_step_size is None:
    c.pgd_step_size = c.eps / 4
  if c.curve_eps is None:
    c.curve_eps = tuple(sorted({min(c.eps * m, 1.0) if c.norm == "linf" else c.eps * m
                                for m in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)}))
  apply_protocol(c)
  return c


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _check_defense_host(config: ml_collections.ConfigDict) -> None:
  """A defense that is told its host objective (CAS: ``defense.kwargs.objective``
  and ``objective_beta``) must be told the one that trains.

  The shipped configs tie these fields to ``objective.*`` by reference; a hand
  override of one side alone would silently train CAS's heads with the terms
  of another objective.
  """
  kwargs = config.defense.get("kwargs", ml_collections.ConfigDict())
  host = kwargs.get("objective")
  _require(host is None or host == config.objective.name,
           f"defense.kwargs.objective={host!r} but objective.name="
           f"{config.objective.name!r}: they must agree")
  beta = kwargs.get("objective_beta")
  obj_beta = config.objective.get("kwargs", ml_collections.ConfigDict()).get("beta")
  _require(beta is None or obj_beta is None or config.objective.name == "at" or beta == obj_beta,
           f"defense.kwargs.objective_beta={beta} but objective.kwargs.beta={obj_beta}: "
           f"they must agree")


def _check_optimizer(opt: ml_collections.ConfigDict) -> None:
  """One-line errors for ``train.optimizer``'s name, schedule, decay mask and scaling."""
  for field, valid in (("name", OPTIMIZERS), ("schedule", SCHEDULES),
                       ("weight_decay_on", DECAY_ON)):
    value = opt.get(field, valid[0])
    if value not in valid:
      raise unknown_name(f"train.optimizer.{field}", value, valid)
  base = opt.get("base_batch", 0)
  _require(isinstance(base, int) and not isinstance(base, bool) and base >= 0,
           f"train.optimizer.base_batch must be an integer >= 0 (0: lr as given), got {base!r}")


def section_kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
  """A config section's constructor ``kwargs`` as a plain dict ({} when absent)."""
  return dict(section.get("kwargs", ml_collections.ConfigDict()).to_dict())


def configured_objective(config: ml_collections.ConfigDict):
  """The objective ``config.objective`` names, built with its ``kwargs``."""
  from jaxdef.objectives import create_objective
  return create_objective(config.objective.name, **section_kwargs(config.objective))


def configured_defense(config: ml_collections.ConfigDict):
  """The defense ``config.defense`` names, built with its ``kwargs``."""
  from jaxdef.defenses import create_defense
  return create_defense(config.defense.name, **section_kwargs(config.defense))


def _check_step_rule(att: ml_collections.ConfigDict) -> None:
  """One-line errors for ``attack.step_rule`` and the Adam rule's schedule."""
  from jaxdef.attacks.pgd import STEP_RULES, check_adam_schedule
  rule = att.get("step_rule", "steepest")
  if rule not in STEP_RULES:
    raise unknown_name("attack.step_rule", rule, STEP_RULES)
  if rule == "adam":
    try:
      check_adam_schedule(att.get("adam_lr", ADAM_LR), att.get("adam_boundaries", ADAM_BOUNDARIES),
                          att.get("adam_scales", ADAM_SCALES))
    except (ConfigError, TypeError) as e:
      raise ConfigError(f"attack.adam_*: {e}") from None


def _check_awp(config: ml_collections.ConfigDict) -> None:
  """One-line errors for ``train.awp``: its ranges, and the defenses it does not compose with."""
  awp = config.train.get("awp", None)
  if awp is None:
    return
  gamma = awp.get("gamma", 0.0)
  _require(gamma >= 0, f"train.awp.gamma must be >= 0 (0: no weight perturbation), got {gamma}")
  _require(awp.get("proxy_lr", 0.01) > 0,
           f"train.awp.proxy_lr must be > 0, got {awp.get('proxy_lr')}")
  _require(awp.get("warmup_epochs", 0.0) >= 0,
           f"train.awp.warmup_epochs must be >= 0, got {awp.get('warmup_epochs')}")
  if gamma == 0:
    return
  transform = config.get("eval", {}).get("transform", "none")
  for what, name, test_time in (("eval.transform", transform, transform != "none"),
                                ("defense.name", config.defense.name,
                                 config.defense.name == "pssr")):
    _require(not test_time,
             f"train.awp.gamma={gamma} with {what}={name!r}: AWP perturbs the classifier's "
             f"weights in training and has no part in a test-time transform (set "
             f"train.awp.gamma=0)")
  replays = config.attack.get("free_replays", 1)
  _require(replays <= 1, f"train.awp.gamma={gamma} and attack.free_replays={replays} do not go "
           f"together: Free-m has no adversarial examples made before the perturbation")
  updates = configured_defense(config).updates_per_batch
  _require(updates == 1,
           f"train.awp.gamma={gamma} and defense {config.defense.name!r} do not go together: "
           f"the defense makes {updates} updates per batch and AWP's rule is one")


def _check_cutmix_and_bn_update(config: ml_collections.ConfigDict) -> None:
  """One-line errors for ``data.cutmix`` (and the objective and defense it
  needs) and ``train.bn_update``."""
  from jaxdef.objectives.base import check_soft_labels
  bn_update = config.train.get("bn_update", "both")
  if bn_update not in BN_UPDATES:
    raise unknown_name("train.bn_update", bn_update, BN_UPDATES)
  cutmix = config.data.get("cutmix", False)
  _require(isinstance(cutmix, bool), f"data.cutmix must be True or False, got {cutmix!r}")
  if cutmix:
    check_soft_labels(configured_objective(config), config.defense.name,
                      "data.cutmix=True (CutMix)")


def _check_free(config: ml_collections.ConfigDict) -> None:
  """One-line refusals of Free-m (``attack.free_replays`` > 1) with what it cannot
  compose with: its one forward-backward per replay at x + delta is the
  whole step, so no second attack step, no clean pass, no other generator,
  no extra model calls and one update per replay."""
  att = config.attack
  m = att.get("free_replays", 0)
  _require(isinstance(m, int) and not isinstance(m, bool) and m >= 0,
           f"attack.free_replays must be an integer >= 0 (0 or 1: Free off), got {m!r}")
  if m <= 1:
    return
  free = f"attack.free_replays={m} (Free-m)"
  _require(att.steps == 1, f"{free} makes one ascent step per replay and attack.steps="
           f"{att.steps}: set attack.steps=1")
  _require(att.get("project", True), f"{free} keeps its perturbation in the eps-ball and "
           f"attack.project=False: set attack.project=True")
  _require(att.get("step_rule", "steepest") == "steepest",
           f"{free} ascends with signed steps and attack.step_rule="
           f"{att.get('step_rule')!r}: set attack.step_rule='steepest'")
  objective = configured_objective(config)
  _require(not objective.needs_clean_pass,
           f"{free} and objective.name={config.objective.name!r} do not go together: Free's "
           f"one pass per replay is at x + delta and the objective needs a clean pass too "
           f"(use objective.name='at')")
  defense = configured_defense(config)
  clash = ("replaces the training attack" if defense.generate is not None else
           f"makes {defense.updates_per_batch} updates per batch"
           if defense.updates_per_batch != 1 else
           "needs a clean pass" if defense.needs_clean_pass else
           "calls the model again in its loss" if defense.model_loss is not None else "")
  _require(not clash, f"{free} and defense.name={config.defense.name!r} do not go together: "
           f"the defense {clash}, and Free's one forward-backward per replay is the whole "
           f"step (defenses that only add loss terms on the adversarial pass compose: "
           f"cas with objective 'at', fsr)")


def training_side(data: ml_collections.ConfigDict) -> Optional[int]:
  """The side of the training images a data config produces, when it is known
  before the data are read: ``data.image_size`` with ``rrc_flip``, else a named
  dataset's own (:data:`STORED_SIDES`); None otherwise."""
  if data.get("augment", "none") == "rrc_flip" and data.get("image_size", 0):
    return int(data.image_size)
  return STORED_SIDES.get(data.get("name", ""))


def check_combinations(config: ml_collections.ConfigDict,
                       side: Optional[int] = None) -> None:
  """One-line refusals of fields that are valid alone but make no sense together,
  each naming both sides. ``side``: the training images' side (None: as far as
  :func:`training_side` knows it).

  * A model built for ImageNet-size inputs (:data:`LARGE_INPUT_MODELS`) on
    images under a quarter of that side without a resize: its stem and
    stages would shrink them to nothing before the pooling.
  """
  side = training_side(config.data) if side is None else side
  built_for = LARGE_INPUT_MODELS.get(config.model.name)
  if built_for and side is not None and side < built_for // 4:
    raise ConfigError(
        f"model.name={config.model.name!r} is built for {built_for} px inputs, but "
        f"data.name={config.data.name!r} trains on {side} px images (data.augment="
        f"{config.data.get('augment', 'none')!r}): resize them with data.augment='rrc_flip' "
        f"and data.image_size={built_for}, or pick a model for {side} px inputs")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises :class:`ConfigError` for the first invalid field of ``config``."""
  from jaxdef.attacks.pgd import INITS, check_budget
  from jaxdef.defenses import check_sections, defense_names
  from jaxdef.models.registry import model_names
  from jaxdef.objectives import objective_names

  for field, name, valid in (("model.name", config.model.name, model_names()),
                             ("objective.name", config.objective.name, objective_names()),
                             ("defense.name", config.defense.name, defense_names())):
    if name not in valid:
      raise unknown_name(field.split(".")[0], name, valid)
  _check_defense_host(config)
  if config.data.augment not in AUGMENTS:
    raise unknown_name("data.augment", config.data.augment, AUGMENTS)
  att = config.attack
  try:
    check_budget(eps=att.eps, step_size=att.step_size, steps=att.steps, norm=att.norm)
  except ConfigError as e:
    raise ConfigError(f"attack: {e}") from None
  _require(att.step_size <= 2 * att.eps,
           f"attack.step_size={att.step_size} is more than twice attack.eps={att.eps}")
  init = att.get("init", "")
  if init and init not in INITS:
    raise unknown_name("attack.init", init, ["''", *INITS])
  _require(att.get("init_sigma", NORMAL_INIT_SIGMA) > 0,
           f"attack.init_sigma must be > 0, got {att.get('init_sigma')}")
  _require(att.get("init_scale", 1.0) > 0,
           f"attack.init_scale must be > 0, got {att.get('init_scale')}")
  _require(isinstance(att.get("project", True), bool),
           f"attack.project must be True or False, got {att.get('project')!r}")
  _check_step_rule(att)
  _check_cutmix_and_bn_update(config)
  _require(not (config.data.get("streamed", None) and config.data.name != "arrayrecord"),
           f"data.streamed=True reads a folder written by `jaxdef data import SOURCE DEST` "
           f"(data.name='arrayrecord', data.path=DEST), not data.name={config.data.name!r}")
  for field in ("workers", "image_size"):
    value = config.data.get(field, 0)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"data.{field} must be an integer >= 0, got {value!r}")
  for field, value in (("data.extra_fraction", config.data.get("extra_fraction", 0.0)),
                       ("data.extra_label_smoothing",
                        config.data.get("extra_label_smoothing", 0.0)),
                       ("train.label_smoothing", config.train.get("label_smoothing", 0.0))):
    _require(isinstance(value, (int, float)) and 0 <= value < 1,
             f"{field} must be in [0, 1), got {value!r}")
  _require(isinstance(config.data.get("keep_last_batch", False), bool),
           f"data.keep_last_batch must be True or False, got "
           f"{config.data.get('keep_last_batch')!r}")
  tr = config.train
  _require(tr.batch_size > 0 and tr.batch_size % num_devices == 0,
           f"train.batch_size={tr.batch_size} must be a positive multiple of the "
           f"device count ({num_devices})")
  _require(tr.eval_batch_size > 0 and tr.eval_batch_size % num_devices == 0,
           f"train.eval_batch_size={tr.eval_batch_size} must be a positive multiple of the "
           f"device count ({num_devices})")
  _require(tr.epochs > 0, f"train.epochs must be > 0, got {tr.epochs}")
  _require(tr.optimizer.lr > 0, f"train.optimizer.lr must be > 0, got {tr.optimizer.lr}")
  _require(tr.optimizer.weight_decay >= 0,
           f"train.optimizer.weight_decay must be >= 0, got {tr.optimizer.weight_decay}")
  _require(0 <= tr.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {tr.ema_decay}")
  _require(tr.get("ema_warmup_epochs", 0.0) >= 0,
           f"train.ema_warmup_epochs must be >= 0, got {tr.get('ema_warmup_epochs')}")
  _check_optimizer(tr.optimizer)
  if tr.dtype not in DTYPES:
    raise unknown_name("train.dtype", tr.dtype, DTYPES)
  _require(isinstance(tr.get("cast_params_once", False), bool),
           f"train.cast_params_once must be True or False, got {tr.get('cast_params_once')!r}")
  if tr.get("on_nonfinite", "stop") not in ON_NONFINITE:
    raise unknown_name("train.on_nonfinite", tr.on_nonfinite, ON_NONFINITE)
  select = tr.get("select", "final")
  if select not in SELECTS:
    raise unknown_name("train.select", select, SELECTS)
  val_size = config.data.get("val_size", 0)
  _require(isinstance(val_size, int) and val_size >= 0,
           f"data.val_size must be an integer >= 0, got {val_size!r}")
  _require(select != "best_val" or val_size > 0,
           "train.select='best_val' needs held-out training examples: set data.val_size "
           "(e.g. 1000)")
  _require(select == "final" or tr.eval_every_epochs > 0,
           f"train.select={select!r} needs a per-epoch evaluation (train.eval_every_epochs)")
  _require(tr.get("eval_examples", 0) >= 0,
           f"train.eval_examples must be >= 0 (0: the whole test split), got "
           f"{tr.get('eval_examples')}")
  if tr.get("eval_pgd_loss", "ce") not in EVAL_PGD_LOSSES:
    raise unknown_name("train.eval_pgd_loss", tr.eval_pgd_loss, EVAL_PGD_LOSSES)
  if tr.get("eval_pgd_joint", False):
    _require(configured_defense(config).joint_attack_loss is not None,
             f"train.eval_pgd_joint=True attacks a model's auxiliary heads, and defense "
             f"{config.defense.name!r} has none (cas and fsr have)")
  _require(tr.checkpoint_every_steps > 0,
           f"train.checkpoint_every_steps must be > 0, got {tr.checkpoint_every_steps}")
  _require(tr.get("stop_check_every_steps", 1) > 0,
           f"train.stop_check_every_steps must be > 0, got {tr.get('stop_check_every_steps')}")
  try:
    re.compile(tr.get("trainable", ""))
  except (re.error, TypeError) as e:
    raise ConfigError(f"train.trainable={tr.trainable!r} is not a regular expression ({e})") \
        from None
  _check_awp(config)
  _check_free(config)
  protocol_fields(config.get("eval", {}).get("protocol", "none"))
  if config.get("eval", {}).get("unit_test", "off") not in UNIT_TEST_MODES:
    raise unknown_name("eval.unit_test", config.eval.unit_test, UNIT_TEST_MODES)
  check_combinations(config)
  check_sections(config)
