"""The base run config every file in ``configs/`` starts from.

Fields (all overridable as ``--config.section.field=value``):

* ``seed``: randomness of init, data order, augmentation and attacks.
* ``data``: ``name`` (mnist5k | npz | cifar10 | cifar100 | svhn_cropped |
  mnist | fashion_mnist), ``path`` (npz), ``data_dir`` (TFDS), ``augment``
  (none | crop_flip), ``max_train`` / ``max_test`` (0 = all).
* ``model``: ``name`` and constructor ``kwargs`` (e.g. WRN depth/width).
* ``objective``: ``name`` (at | trades | mart) and ``kwargs`` (e.g. beta).
* ``defense``: ``name`` (none | cas | fsr | ...) and ``kwargs``.
* ``attack``: the training attack, PGD ``eps``, ``step_size``, ``steps``,
  ``norm``, ``bn`` ('eval': BatchNorm running statistics during the attack, as
  the reference codes; 'train_no_update': batch statistics, not updated),
  ``warmup_epochs`` (eps and step size ramp linearly from 0), ``unroll``
  (the PGD ``fori_loop``'s unrolling; 0 = by backend, see
  :func:`jaxdef.attacks.pgd.loop_unroll`).
* ``train``: batch size, epochs, SGD optimizer, EMA, compute dtype, logging,
  per-epoch evaluation (clean + PGD on the test split), checkpoints;
  ``trainable`` (which parameters the optimizer updates) and ``init_from``
  (parameters taken from other runs at the start).
* ``eval``: the evaluation suite (:func:`jaxdef.evaluate.default_eval_config`).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the common CIFAR-10 PGD-AT recipe (METHODS.md section 0)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="cifar10", path="", data_dir="", augment="crop_flip", max_train=0, max_test=0))
  c.model = ml_collections.ConfigDict(dict(name="resnet18", kwargs={}))
  c.objective = ml_collections.ConfigDict(dict(name="at", kwargs={}))
  c.defense = ml_collections.ConfigDict(dict(name="none", kwargs={}))
  c.attack = ml_collections.ConfigDict(dict(
      eps=8 / 255, step_size=2 / 255, steps=10, norm="linf", bn="eval", warmup_epochs=0.0,
      unroll=0))

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.epochs = 100
  c.train.optimizer = ml_collections.ConfigDict(dict(
      lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="piecewise",
      milestones=(75, 90), warmup_epochs=0.0))
  c.train.ema_decay = 0.0
  c.train.dtype = "float32"
  c.train.log_every_steps = 20
  c.train.eval_every_epochs = 1
  c.train.eval_examples = 1000
  c.train.eval_batch_size = 200
  c.train.eval_pgd_steps = 20
  c.train.eval_pgd_step_size = 2 / 255
  c.train.checkpoint_every_steps = 1000
  c.train.max_to_keep = 3
  c.train.on_nonfinite = "stop"  # or "skip": drop the batch, count it, go on
  # Regex on parameter paths ('classifier/Conv_0/kernel'); only matching ones are
  # updated ('' = all). E.g. '^regenerator/' trains PSSR's regenerator alone.
  c.train.trainable = ""
  # {top-level subtree: workdir}: a fresh run takes those parameters (and BatchNorm
  # statistics) from a trained run's model, e.g. {'classifier': 'runs/at'} for PSSR.
  c.train.init_from = ml_collections.ConfigDict()

  # The evaluation suite (launch.py --mode eval); threat model = the training attack's.
  from jaxdef.evaluate import default_eval_config
  c.eval = default_eval_config()
  return c
