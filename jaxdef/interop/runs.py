"""``jaxdef import torch`` and ``jaxdef export``: run directories <-> PyTorch weights.

    summary = import_run("model.safetensors", "wrn-28-10", "runs/imported")
    summary = export_run("runs/r18", "r18.safetensors")

An imported run is laid out as a trained one (``config.json`` with the model,
its input normalisation and the data shape; an Orbax checkpoint at step 0
written by :mod:`jaxdef.checkpoint`), so ``jaxdef eval --workdir``,
:func:`jaxdef.restore` and ``train.init_from`` read it unchanged; where the
weights came from is kept in ``imported_from.json``. Export writes the
evaluated weights (EMA when the run kept an EMA, the run's ``train.select``
checkpoint) under the PyTorch class's key names, with metadata naming the
architecture, the normalisation, jaxdef's version, the config hash and the
checkpoint step; importing that file again gives the same variables.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from jaxdef import checkpoint as ckpt
from jaxdef.build import DataMeta
from jaxdef.config import base_config
from jaxdef.errors import ConfigError
from jaxdef.interop.architectures import Arch, parse_arch
from jaxdef.interop.convert import from_torch, ignored_keys, to_torch
from jaxdef.interop.tensors import read_weights
from jaxdef.restored import load_run
from jaxdef.version import VERSION

PROVENANCE_FILE = "imported_from.json"
# Metadata keys of an exported file (all strings, as safetensors stores them).
META_ARCH = "jaxdef.arch"
META_MEAN, META_STD = "jaxdef.mean", "jaxdef.std"
# CIFAR-size inputs with these class counts are evaluated on that dataset by default.
DEFAULT_DATA = {10: "cifar10", 100: "cifar100"}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _floats(values: Optional[Sequence[float]], name: str) -> Optional[tuple[float, ...]]:
  if values is None:
    return None
  out = tuple(float(v) for v in values)
  if len(out) not in (1, 3) or (name == "std" and min(out) <= 0):
    raise ConfigError(f"--{name} takes 1 or 3 numbers{' > 0' if name == 'std' else ''}, "
                      f"got {','.join(map(str, values))}")
  return out


def normalisation(arch: Arch, metadata: dict[str, str], mean: Optional[Sequence[float]],
                  std: Optional[Sequence[float]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The input normalisation of an import: ``--mean/--std`` if given, else a
  jaxdef export's own (its metadata), else the architecture's (the DeepMind
  WRNs'), else none."""
  if (mean is None) != (std is None):
    raise ConfigError("give --mean and --std together")
  if mean is not None:
    return _floats(mean, "mean"), _floats(std, "std")
  if META_MEAN in metadata and META_STD in metadata:
    return (tuple(json.loads(metadata[META_MEAN])), tuple(json.loads(metadata[META_STD])))
  return arch.mean or (0.0, 0.0, 0.0), arch.std or (1.0, 1.0, 1.0)


def imported_config(arch: Arch, num_classes: int) -> Any:
  """The run config of an imported model: :func:`jaxdef.config.base_config`
  with the model (no EMA), and the dataset its input size and class count
  suggest (CIFAR-10/100 at 32x32, else ``npz``, whose ``data.path`` the
  evaluation is given)."""
  config = base_config()
  config.model.name = arch.model
  config.model.kwargs = dict(arch.kwargs)
  cifar = arch.image_shape == (32, 32, 3) and num_classes in DEFAULT_DATA
  config.data.name = DEFAULT_DATA[num_classes] if cifar else "npz"
  config.train.ema_decay = 0.0
  return config


def import_run(weights: str, arch: str, workdir: str, *, num_classes: Optional[int] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None
               ) -> dict[str, Any]:
  """Writes the PyTorch checkpoint ``weights`` as a jaxdef run in ``workdir``.

  Refuses (one-line ConfigError) a ``workdir`` that already holds a run, a
  file that is not a checkpoint or would run code, and a state dict that
  does not fit ``arch``. Returns what was done, for the command's summary.
  """
  if os.path.exists(os.path.join(workdir, ckpt.CONFIG_FILE)):
    raise ConfigError(f"{workdir!r} already holds a run; import into a new --workdir")
  spec = parse_arch(arch)
  tensors, metadata = read_weights(weights)
  mean, std = normalisation(spec, metadata, mean, std)
  model, variables = from_torch(tensors, spec, num_classes=num_classes, mean=mean, std=std,
                                what=weights)
  classes = int(model.num_classes)
  config = imported_config(spec, classes)
  meta = DataMeta(name=config.data.name, num_classes=classes, image_shape=spec.image_shape,
                  mean=mean, std=std)
  ckpt.write_run_config(workdir, config, meta.to_dict())
  state = {"step": np.zeros((), np.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"],
           "ema_params": jax.tree.map(np.array, variables["params"]),
           "ema_batch_stats": jax.tree.map(np.array, variables["batch_stats"])}
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=1, async_save=False)
  ckpt.save(manager, 0, state)
  ckpt.finish(manager, 0, close=True)
  dropped = ignored_keys(tensors, spec)
  provenance = {"file": os.path.abspath(weights), "sha256": _sha256(weights), "arch": spec.name,
                "torch_class": spec.torch_class, "tensors": len(tensors),
                "ignored": dropped, "file_metadata": metadata, "jaxdef_version": VERSION}
  with open(os.path.join(workdir, PROVENANCE_FILE), "w") as f:
    json.dump(provenance, f, indent=2)
  count = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
  return {"arch": spec, "model": config.model.name, "kwargs": dict(spec.kwargs),
          "num_classes": classes, "mean": mean, "std": std, "parameters": count,
          "tensors": len(tensors), "ignored": dropped, "data": config.data.name,
          "workdir": workdir}


def refuse_defenses(config: Any, model: Any) -> None:
  """One-line ConfigError for a run whose defense has no PyTorch counterpart:
  modules inserted at tap points (CAS, FSR heads) or a test-time transform
  (NIP, PSSR)."""
  if config.model.name == "pssr":
    raise ConfigError("model 'pssr' (a regenerator before a classifier, a test-time transform) "
                      "has no PyTorch counterpart; only plain classifiers are exported")
  if model.insert is not None:
    raise ConfigError(f"defense {config.defense.name!r} adds modules at "
                      f"{', '.join(model.insert.points)} that no PyTorch class of jaxdef's "
                      f"export holds; only plain classifiers are exported")
  transform = config.get("eval", {}).get("transform", "none")
  if transform != "none":
    raise ConfigError(f"the run is evaluated through the test-time transform {transform!r}, "
                      f"which no PyTorch class of jaxdef's export holds; only plain "
                      f"classifiers are exported")


def export_run(workdir: str, path: str, *, step: Optional[int] = None,
               use_ema: Optional[bool] = None) -> dict[str, Any]:
  """Writes the evaluated weights of the run in ``workdir`` to the safetensors
  file ``path`` under the PyTorch class's key names; returns what was done."""
  if not path.endswith(".safetensors"):
    raise ConfigError(f"export writes a .safetensors file, got {path!r}")
  run = load_run(workdir, step=step, use_ema=use_ema)
  refuse_defenses(run.config, run.model)
  arch, tensors = to_torch(run.model, run.config.model.name, run.variables)
  # The model's own normalisation (a run may keep the data's statistics unused).
  mean, std = tuple(run.model.mean), tuple(run.model.std)
  metadata = {META_ARCH: arch.name, "jaxdef.torch_class": arch.torch_class,
              META_MEAN: json.dumps(list(mean)), META_STD: json.dumps(list(std)),
              "jaxdef.num_classes": str(run.meta.num_classes),
              "jaxdef.image_shape": json.dumps(list(run.meta.image_shape)),
              "jaxdef.dataset": run.meta.name, "jaxdef.version": VERSION,
              "jaxdef.config_hash": ckpt.config_hash(run.config),
              "jaxdef.checkpoint_step": str(run.step), "jaxdef.weights": run.weights}
  import safetensors.numpy
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.numpy.save_file(tensors, path, metadata=metadata)
  return {"arch": arch, "tensors": len(tensors), "step": run.step, "weights": run.weights,
          "mean": mean, "std": std, "path": path,
          "describe": run.describe()}


def _normalisation_text(mean: Sequence[float], std: Sequence[float]) -> str:
  if all(m == 0 for m in mean) and all(s == 1 for s in std):
    return "none ([0, 1] images)"
  return f"mean {', '.join(f'{m:g}' for m in mean)}, std {', '.join(f'{s:g}' for s in std)}"


def import_summary(done: dict[str, Any]) -> str:
  """What ``jaxdef import torch`` prints."""
  arch = done["arch"]
  kwargs = ", ".join(f"{k}={v}" for k, v in done["kwargs"].items())
  ignored = (f"; ignored {len(done['ignored'])} tensors of modules its forward pass does not "
             f"use ({done['ignored'][0].split('.')[0]}.*)" if done["ignored"] else "")
  data_hint = ("" if done["data"] != "npz" else
               " --config.data.path=IMAGES.npz")
  return "\n".join([
      f"read {done['tensors']} tensors as {arch.torch_class}{ignored}",
      f"model {done['model']}({kwargs}): {done['parameters'] / 1e6:.2f}M parameters, "
      f"{done['num_classes']} classes, inputs {'x'.join(map(str, arch.image_shape))}, "
      f"normalisation {_normalisation_text(done['mean'], done['std'])}",
      f"wrote {done['workdir']} (config.json, checkpoint at step 0, {PROVENANCE_FILE}); "
      f"evaluate it: jaxdef eval --workdir {done['workdir']}{data_hint}"])


def export_summary(done: dict[str, Any]) -> str:
  """What ``jaxdef export`` prints, with how to load the file in PyTorch."""
  arch, mean, std = done["arch"], done["mean"], done["std"]
  plain = all(m == 0 for m in mean) and all(s == 1 for s in std)
  lines = [f"wrote {done['path']}: {done['tensors']} tensors of the {done['describe']}",
           f"load: model = {arch.torch_class.replace('MEAN', repr(mean)).replace('STD', repr(std))}; "
           f"model.load_state_dict(safetensors.torch.load_file({done['path']!r}))"]
  if arch.mean is None and not plain:
    lines.append(f"the PyTorch module takes normalised images: feed it (x - mean) / std with "
                 f"{_normalisation_text(mean, std)} (also in the file's metadata)")
  return "\n".join(lines)
