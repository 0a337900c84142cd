"""Validation of a run's ConfigDict: every mistake is one line naming the field.

Called by the launcher before any data is read or anything is compiled.
"""

from __future__ import annotations

import re

import ml_collections

from jaxdef.errors import ConfigError, unknown_name

DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")
AUGMENTS = ("none", "crop_flip")


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


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises :class:`ConfigError` for the first invalid field of ``config``."""
  from jaxdef.attacks.pgd import check_budget
  from jaxdef.defenses import defense_names
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
  if tr.dtype not in DTYPES:
    raise unknown_name("train.dtype", tr.dtype, DTYPES)
  if tr.get("on_nonfinite", "stop") not in ON_NONFINITE:
    raise unknown_name("train.on_nonfinite", tr.on_nonfinite, ON_NONFINITE)
  _require(tr.checkpoint_every_steps > 0,
           f"train.checkpoint_every_steps must be > 0, got {tr.checkpoint_every_steps}")
  try:
    re.compile(tr.get("trainable", ""))
  except (re.error, TypeError) as e:
    raise ConfigError(f"train.trainable={tr.trainable!r} is not a regular expression ({e})") \
        from None
  if "nip" in config:
    from jaxdef.defenses.nip import check_nip_config
    check_nip_config(config.nip)
