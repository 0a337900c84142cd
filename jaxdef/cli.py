"""The ``jaxdef`` command (and ``python launch.py``): train, eval, configs, show-config.

    jaxdef train --config pgd_at:cifar10_resnet18 --workdir runs/r18 [--config.a.b=v]
    jaxdef eval --workdir runs/r18 [--config.eval.num_examples=200]
    jaxdef configs
    jaxdef show-config --config default [--config.a.b=v]   (or --workdir W)
    jaxdef plan --config NAME --topology v5e:4x4 [--config.a.b=v]
    jaxdef data import SOURCE DEST [--overwrite] [--format F] [--shards N]
    jaxdef import torch --arch NAME --weights FILE --workdir W [--num_classes N] [--mean ...]
    jaxdef export --workdir W --to torch FILE.safetensors

:func:`main` is the installed entry point (``[project.scripts]``); each
command parses its own flags (a fresh absl ``FlagValues`` per call, no global
flag state). ``--config`` takes a shipped config's name or a config file
(:func:`jaxdef.shipped.resolve`); ``jaxdef eval`` without ``--config``
evaluates the run with its own ``config.json``, overridable field by field.
Exit statuses: 0 done; 1 the config does not fit the TPU slice
(``jaxdef plan``); 2 a mistake on the command line or in the config,
one ``error:`` line; 3 a run that cannot go on (e.g. non-finite state);
128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal stopped
the work after saving (training) or writing partial results (eval).

Before any jaxdef work:
* :func:`with_fractions`: ``--config.attack.eps=8/255`` (a fraction, the
  convention eps and step sizes are written in) becomes ``0.0313...``; only
  for fields named like a budget (:data:`FRACTION_FIELDS`), so that a path
  such as ``--config.data.path=runs/1/2`` is never touched.
* :func:`flag_error`: what went wrong while parsing the flags, as one line
  for ``error: ...`` (unknown config field with its did-you-mean, unknown
  variant, a value of the wrong type), instead of a traceback.
* :func:`enable_compilation_cache`: JAX's persistent compilation cache, on by
  default in the user's cache folder (``JAXDEF_COMPILATION_CACHE``).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Mapping, Optional, Sequence

# The last name of a --config field that accepts a fraction 'a/b'.
FRACTION_FIELDS = re.compile(r"(.*eps.*|.*step_size.*|lr|tau)")
_FRACTION = re.compile(r"([0-9]*\.?[0-9]+)/([0-9]*\.?[0-9]+)")
_OVERRIDE = re.compile(r"--(config(?:\.[A-Za-z_][A-Za-z0-9_]*)+)=(.*)", re.S)


def _fraction(field: str, value: str) -> str:
  """``value`` as a float's repr when ``field`` is a budget field and ``value`` a/b."""
  frac = _FRACTION.fullmatch(value.strip())
  if FRACTION_FIELDS.fullmatch(field.rsplit(".", 1)[-1]) and frac and float(frac.group(2)) != 0:
    return repr(float(frac.group(1)) / float(frac.group(2)))
  return value


def with_fractions(argv: Sequence[str]) -> list[str]:
  """``argv`` with the a/b value of each budget field's ``--config.<field>=a/b``
  (or ``--config.<field> a/b``) replaced by its value."""
  out = []
  for arg in argv:
    m = _OVERRIDE.fullmatch(arg)
    if m:
      arg = f"--{m.group(1)}={_fraction(m.group(1), m.group(2))}"
    elif out and _OVERRIDE.fullmatch(out[-1] + "=") and "=" not in out[-1]:
      arg = _fraction(out[-1][2:], arg)
    out.append(arg)
  return out


def _overridden_fields(argv: Sequence[str]) -> list[str]:
  return [m.group(1) for m in map(_OVERRIDE.fullmatch, argv) if m]


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
  """One line saying what is wrong with the command line ``argv``.

  An unknown config field names the flag and ml_collections' suggestion
  (``unknown config field config.train.epocs (did you mean 'epochs'?)``);
  an error that carries a traceback or several lines (a config file that
  raised, a missing file) gives its last line.
  """
  for e in (error, error.__cause__ or error.__context__):
    if isinstance(e, (AttributeError, KeyError)):
      key = re.search(r"'\\?'?([A-Za-z_][A-Za-z0-9_]*)\\?'?'", str(e))
      hint = re.search(r'Did you mean "([^"]+)"', str(e))
      if key:
        names = [f for f in _overridden_fields(argv) if f.split(".")[-1] == key.group(1)]
        field = names[0] if names else key.group(1)
        suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
        return f"unknown config field {field}{suggestion}; see the config file for its fields"
  lines = [l.strip() for l in str(error).replace("\\n", "\n").splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  text = re.sub(r"^(FATAL )?Flags parsing error: ", "", lines[-1])
  if len(lines) > 1 and "--config" not in text:
    text = f"cannot load the config: {text}"
  return text


def compilation_cache_dir(env: Mapping[str, str]) -> Optional[str]:
  """Where the launcher keeps JAX's persistent compilation cache, from ``env``.

  ``JAXDEF_COMPILATION_CACHE``: a folder, or ``off`` (also ``0``, ``false``,
  ``none``) for no cache; unset: ``$XDG_CACHE_HOME/jaxdef/xla`` (default
  ``~/.cache/jaxdef/xla``). None when a user's own ``JAX_COMPILATION_CACHE_DIR``
  is set (JAX reads it itself) or the cache is off. A second evaluation of
  the same model shape then compiles nothing.
  """
  chosen = env.get("JAXDEF_COMPILATION_CACHE")
  if env.get("JAX_COMPILATION_CACHE_DIR") and chosen is None:
    return None
  if chosen is not None:
    return None if chosen.strip().lower() in ("off", "0", "false", "none", "") else chosen
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxdef", "xla")


def enable_compilation_cache(env: Mapping[str, str]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in :func:`compilation_cache_dir`
  (before anything is compiled); returns the folder, or None."""
  folder = compilation_cache_dir(env)
  if folder is None:
    return None
  import jax
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  # Programs that took at least a second to compile (JAX's default threshold).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return folder


USAGE = """usage: jaxdef COMMAND [flags]

commands:
  train        train (or resume) a run in --workdir:
                 jaxdef train --config NAME[:VARIANT] --workdir W [--config.a.b=v ...]
  eval         evaluate a run's checkpoint with the suite in its config's eval section:
                 jaxdef eval --workdir W [--config.eval.num_examples=200 ...]
  configs      list the shipped configs, their variants and what they train
  show-config  print a resolved config (--config NAME[:VARIANT] or --workdir W), its
               eval section as `jaxdef eval` uses it (eval.protocol applied); with
               --summary also the parameter count, FLOPs per example of a forward
               pass and of a train step, and the train step's memory (estimate)
  plan         compile the train and eval steps for a TPU slice this host does not have
               (needs libtpu) and print memory per chip, FLOPs, step time at peak:
                 jaxdef plan --config NAME[:VARIANT] --topology v5e:2x4 [--config.a.b=v ...]
  data import  turn an image folder tree, .npz files or a prepared TFDS dataset into
               ArrayRecord shards that train with --config.data.name=arrayrecord:
                 jaxdef data import SOURCE DEST [--overwrite] [--format F] [--shards N]
  import torch a PyTorch checkpoint (RobustBench, torchvision) as a run that eval reads:
                 jaxdef import torch --arch NAME --weights FILE --workdir W
                   [--num_classes N] [--mean m1,m2,m3 --std s1,s2,s3]
  export       a run's weights under the PyTorch class's key names:
                 jaxdef export --workdir W --to torch FILE.safetensors

--config takes a shipped config's name (`jaxdef configs`) or a config file;
`jaxdef COMMAND --help` lists the command's flags, and with --config the
config's variants and fields."""

COMMANDS = ("train", "eval", "configs", "show-config", "plan", "data", "import", "export")
_HELP = ("-h", "--help", "-help", "--helpfull")


def _flag_at(argv: Sequence[str], i: int, name: str) -> tuple[Optional[str], int]:
  """``(value, width)`` of a ``--name`` flag at ``argv[i]``: width 2 for
  ``--name V``, 1 for ``--name=V``; ``(None, 0)`` where ``argv[i]`` is another argument."""
  arg = argv[i]
  if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
    return argv[i + 1], 2
  if arg.startswith((f"--{name}=", f"-{name}=")):
    return arg.split("=", 1)[1], 1
  return None, 0


def _value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of ``--name=V`` or ``--name V`` in ``argv`` (the last one), else None."""
  found = None
  for i in range(len(argv)):
    value, width = _flag_at(argv, i, name)
    found = value if width else found
  return found


def _with_value(argv: Sequence[str], name: str, value: str) -> list[str]:
  """``argv`` with every ``--name`` flag's value replaced by ``value``."""
  out, i = [], 0
  while i < len(argv):
    _, width = _flag_at(argv, i, name)
    out.append(f"--{name}={value}" if width else argv[i])
    i += max(width, 1)
  return out


def _define(command: str, argv: Sequence[str]):
  """A fresh ``FlagValues`` for ``command`` and ``argv`` with ``--config``
  resolved: ``(flag_values, argv)``. Without ``--config``, ``eval`` and
  ``show-config`` read the config of ``--workdir``'s run (its ``config.json``),
  so ``--config.eval.x=...`` overrides the run's own fields."""
  from absl import flags
  from ml_collections import config_flags
  from jaxdef import shipped
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "The run's directory: checkpoints, logs, results.",
                      flag_values=fv)
  if command in ("train", "eval"):
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for a multi-process "
                        "run (with --num_processes and --process_id); cluster environments "
                        "are detected without it.", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Processes in the run.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index.", flag_values=fv)
  if command == "show-config":
    flags.DEFINE_boolean("summary", False, "Also size the run: parameters, FLOPs per example "
                         "(forward, train step) and the train step's memory at the configured "
                         "batch, from XLA on this host (compiles the step).", flag_values=fv)
  if command == "plan":
    flags.DEFINE_string("topology", None, "A TPU topology that libtpu knows: v5e:2x4, "
                        "v5e:16x16, v5p:2x2x1, v4:2x2x2, v6e:4x4.", flag_values=fv)
  spec, workdir = _value(argv, "config"), _value(argv, "workdir")
  if spec is None and command in ("eval", "show-config") and workdir:
    from jaxdef.checkpoint import read_run_config
    config = with_current_eval_fields(read_run_config(workdir)[0])
    config_flags.DEFINE_config_dict("config", config, "The run's own config (config.json); "
                                    "--config.a.b=v overrides a field.", flag_values=fv,
                                    sys_argv=[command, *argv])
  else:
    if spec is not None:
      argv = _with_value(argv, "config", shipped.resolve(spec))
    # ml_collections reads the overrides' names from sys_argv when the flag is defined.
    config_flags.DEFINE_config_file(
        "config", None, "A shipped config's name or a config file, with an optional "
        ":variant (`jaxdef configs` lists them).", flag_values=fv, lock_config=True,
        sys_argv=[command, *argv])
  return fv, argv


def with_current_eval_fields(config):
  """A run's config with every field of today's ``eval`` section
  (:func:`jaxdef.config.with_eval_defaults`), so that
  ``--config.eval.<field added since>=...`` works on old runs."""
  import ml_collections
  from jaxdef.config import with_eval_defaults
  out = ml_collections.ConfigDict(config.to_dict())
  out.eval = with_eval_defaults(config.get("eval", ml_collections.ConfigDict()))
  return out


def _parse(command: str, argv: Sequence[str]):
  """Parsed flags of ``command``, or a :class:`ConfigError` in one line."""
  from jaxdef.errors import ConfigError
  try:
    fv, resolved = _define(command, with_fractions(argv))
    rest = fv([f"jaxdef {command}", *resolved])
    config = fv["config"].value
    if config is not None:
      config.get("model")  # ml_collections reports a file it could not load only here
  except ConfigError:
    raise
  except Exception as e:  # flags.Error, and what a config file or override raises
    raise ConfigError(flag_error(e, argv)) from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected argument {rest[1]!r} (flags are --name=value)")
  return fv


def _require(fv, *names: str) -> None:
  from jaxdef.errors import ConfigError
  missing = [f"--{n}" for n in names if fv[n].value is None]
  if missing:
    raise ConfigError(f"missing {' and '.join(missing)}")


def _help(command: str, argv: Sequence[str]) -> str:
  """``jaxdef COMMAND --help``: the command's flags; with a loadable
  ``--config``, its variants and resolved fields."""
  from jaxdef import shipped
  argv = [a for a in argv if a not in _HELP]
  text = [USAGE.split("\n\n")[0], ""]
  try:
    fv = _parse(command, argv)
  except Exception as e:  # the flags' help still helps when the config does not load
    fv, _ = _define(command, [])
    text.append(f"(--config not loaded: {e})")
  text.append(fv.get_help())
  config = fv["config"].value
  spec = _value(argv, "config")
  if config is not None:
    if spec is not None:
      name = shipped.name_of(spec)
      if name in shipped.names():
        found = shipped.variants(shipped.module(name))
        text.append(f"\nvariants of {name}: {', '.join(found) or '(none)'}")
    text.append("\nfields (override any with --config.<field>=value):\n" + str(config))
  elif command != "configs":
    text.append("\nshipped configs (--config NAME[:VARIANT]):\n" + configs_table())
  return "\n".join(text)


def configs_table() -> str:
  """``jaxdef configs``: each shipped config, what it trains and its variants."""
  from jaxdef import shipped
  rows = []
  for e in shipped.listing():
    rows.append(f"{e.name}\n    {e.summary}\n    variants: {', '.join(e.variants) or '(none)'}")
  return "\n".join(rows)


def _train(fv) -> int:
  from jaxdef.signals import exit_status
  from jaxdef.train.loop import summary_table, train_and_evaluate
  summary = train_and_evaluate(fv["config"].value, fv["workdir"].value)
  import jax
  if "preempted_at" in summary:
    # Stopped by a signal, checkpoint saved: exit as the signal would (128 + its
    # number; SIGTERM 143, SIGINT 130), so a scheduler requeues the job.
    return exit_status(summary["signal"])
  if jax.process_index() == 0:
    print("\n" + summary_table(summary))
  return 0


def _eval(fv) -> int:
  from jaxdef.evaluate import evaluate_workdir
  from jaxdef.signals import exit_status
  results = evaluate_workdir(fv["workdir"].value, fv["config"].value)
  if "partial" in results:
    stopped = results["partial"]["stopped_by"]
    print(f"evaluation stopped by {stopped}: partial results written", file=sys.stderr)
    return exit_status(stopped)
  return 0


def _show_config(fv) -> int:
  _require(fv, "config")
  print(str(as_evaluated(fv["config"].value)), end="")
  if fv["summary"].value:
    from absl import logging
    from jaxdef.train.summary import run_size, summary_lines
    logging.set_verbosity(logging.WARNING)
    print("\n".join(summary_lines(run_size(fv["config"].value))), flush=True)
  return 0


def _plan(fv, spec: Optional[str]) -> int:
  """``jaxdef plan``: the config compiled for ``--topology``
  (:mod:`jaxdef.train.plan`); exit status 1 when it does not fit."""
  _require(fv, "config", "topology")
  import jax
  from absl import logging
  from jaxdef.train.plan import print_plan
  logging.set_verbosity(logging.WARNING)
  # A program compiled for devices this host lacks cannot be read back from
  # JAX's persistent cache (jax 0.12: no client to load it into): none written.
  jax.config.update("jax_enable_compilation_cache", False)
  planned = print_plan(spec, fv["config"].value, fv["topology"].value,
                       out=lambda line: print(line, flush=True))
  return 0 if planned.fits else 1


def as_evaluated(config):
  """``config`` with its ``eval`` section as ``jaxdef eval`` uses it
  (:func:`jaxdef.config.resolve_eval_config`: the threat model filled in from
  the training attack, the fields ``eval.protocol`` fixes applied)."""
  import ml_collections
  from jaxdef.config import default_eval_config, resolve_eval_config
  out = ml_collections.ConfigDict(config.to_dict())
  out.eval = resolve_eval_config(config.get("eval", default_eval_config()),
                                 eps=config.attack.eps, norm=config.attack.norm)
  return out


def data_import_parser():
  """The flags of ``jaxdef data import``; a mistake raises ConfigError."""
  import argparse
  from jaxdef.data.importer import FORMATS

  class Parser(argparse.ArgumentParser):
    def error(self, message):
      from jaxdef.errors import ConfigError
      raise ConfigError(f"jaxdef data import: {message}")

  parser = Parser(prog="jaxdef data import", add_help=False, description=(
      "Writes SOURCE (an ImageFolder tree SOURCE/train|val|test/CLASS/*.jpg|png, an .npz file "
      "or folder of them with image/label or x_train/y_train/x_test/y_test arrays, or a "
      "prepared TFDS dataset) as ArrayRecord shards + jaxdef_dataset.json in the new folder "
      "DEST. Train from it with --config.data.name=arrayrecord --config.data.path=DEST."))
  parser.add_argument("source", metavar="SOURCE")
  parser.add_argument("dest", metavar="DEST")
  parser.add_argument("--format", choices=FORMATS, help="the source's format (default: detected)")
  parser.add_argument("--shards", type=int, help="shard files of the train split "
                      "(default: about 512 MiB each)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace DEST when it holds an imported dataset")
  parser.add_argument("--data_dir", help="TFDS data_dir, when SOURCE is a TFDS dataset's name")
  return parser


def _data(argv: Sequence[str]) -> int:
  """``jaxdef data import SOURCE DEST ...``."""
  from jaxdef.errors import ConfigError
  usage = "jaxdef data import SOURCE DEST [--overwrite] [--format F] [--shards N]"
  if argv and argv[0] in _HELP:
    print(f"usage: {usage}")
    return 0
  if not argv or argv[0] != "import":
    raise ConfigError(f"unknown command 'data {argv[0]}' (usage: {usage})" if argv else
                      f"missing the data command (usage: {usage})")
  parser = data_import_parser()
  if any(a in _HELP for a in argv[1:]):
    print(parser.format_help())
    return 0
  args = parser.parse_args(argv[1:])
  from jaxdef.data.importer import import_dataset, summary_lines
  meta = import_dataset(args.source, args.dest, source_format=args.format, shards=args.shards,
                        overwrite=args.overwrite, data_dir=args.data_dir)
  print("\n".join(summary_lines(meta, os.path.abspath(os.path.expanduser(args.dest)))))
  return 0


IMPORT_USAGE = ("jaxdef import torch --arch NAME --weights FILE --workdir W [--num_classes N] "
                "[--mean m1,m2,m3 --std s1,s2,s3]")
EXPORT_USAGE = "jaxdef export --workdir W --to torch FILE.safetensors"


def _interop_flags(command: str):
  """A fresh ``FlagValues`` with the flags of ``jaxdef import`` or ``jaxdef export``."""
  from absl import flags
  fv = flags.FlagValues()
  if command == "import":
    flags.DEFINE_string("arch", None, "The PyTorch architecture: resnet18, preact_resnet18, "
                        "preact_resnet18_v2, wrn-D-W, dm-wrn-D-W-swish, dm-wrn-D-W-relu, "
                        "resnet50.", flag_values=fv)
    flags.DEFINE_string("weights", None, "The checkpoint: .safetensors (or .pt/.pth, read with "
                        "torch.load(weights_only=True) when PyTorch is installed).",
                        flag_values=fv)
    flags.DEFINE_integer("num_classes", None, "Classes (default: the head's rows).",
                         flag_values=fv)
    flags.DEFINE_list("mean", None, "Per-channel input mean the model expects (default: none; "
                      "the DeepMind WRNs: their CIFAR-10 defaults).", flag_values=fv)
    flags.DEFINE_list("std", None, "Per-channel input std, with --mean.", flag_values=fv)
  else:
    flags.DEFINE_string("to", None, "What to write: torch (a .safetensors file).",
                        flag_values=fv)
  flags.DEFINE_string("workdir", None, "The run's directory.", flag_values=fv)
  return fv


def _floats(values: Optional[Sequence[str]], name: str) -> Optional[list[float]]:
  from jaxdef.errors import ConfigError
  try:
    return None if values is None else [float(v) for v in values]
  except ValueError:
    raise ConfigError(f"--{name} takes numbers separated by commas, got "
                      f"{','.join(values)}") from None


def _interop(command: str, argv: Sequence[str]) -> int:
  """``jaxdef import torch ...`` and ``jaxdef export ...`` (:mod:`jaxdef.interop`)."""
  from jaxdef.errors import ConfigError
  usage = IMPORT_USAGE if command == "import" else EXPORT_USAGE
  fv = _interop_flags(command)
  if any(a in _HELP for a in argv):
    print(f"usage: {usage}\n\n{fv.get_help()}")
    return 0
  try:
    rest = fv([f"jaxdef {command}", *argv])[1:]
  except Exception as e:  # flags.Error: an unknown flag, a value of the wrong type
    raise ConfigError(flag_error(e, argv)) from None
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # Orbax logs each checkpoint write at INFO
  from jaxdef import interop
  if command == "import":
    if rest != ["torch"]:
      raise ConfigError(f"jaxdef import reads PyTorch checkpoints (usage: {usage})")
    _require(fv, "arch", "weights", "workdir")
    done = interop.import_run(fv["weights"].value, fv["arch"].value, fv["workdir"].value,
                              num_classes=fv["num_classes"].value,
                              mean=_floats(fv["mean"].value, "mean"),
                              std=_floats(fv["std"].value, "std"))
    print(interop.import_summary(done))
    return 0
  _require(fv, "workdir", "to")
  if fv["to"].value != "torch":
    raise ConfigError(f"--to {fv['to'].value}: jaxdef export writes PyTorch weights only "
                      f"(--to torch)")
  if len(rest) != 1:
    raise ConfigError(f"jaxdef export writes one file (usage: {usage})")
  print(interop.export_summary(interop.export_run(fv["workdir"].value, rest[0])))
  return 0


def run(argv: Sequence[str]) -> int:
  """``jaxdef`` with ``argv`` (without the program name); the exit status."""
  from jaxdef.errors import ConfigError, RunStopped
  if not argv or argv[0] in _HELP + ("help",):
    print(USAGE)
    return 0
  command, rest = argv[0], list(argv[1:])
  try:
    if command not in COMMANDS:
      if command.startswith("--mode="):
        raise ConfigError(f"unknown --mode {command[7:]!r} (valid: train, eval)")
      close = difflib.get_close_matches(command, COMMANDS, n=1)
      raise ConfigError(f"unknown command {command!r}"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; commands: {', '.join(COMMANDS)}")
    if command == "data":
      return _data(rest)
    if command in ("import", "export"):
      return _interop(command, rest)
    if any(a in _HELP for a in rest):
      print(_help(command, rest))
      return 0
    if command == "configs":
      print(configs_table())
      return 0
    fv = _parse(command, rest)
    if command == "show-config":
      return _show_config(fv)
    if command == "plan":
      return _plan(fv, _value(rest, "config"))
    _require(fv, *(("config", "workdir") if command == "train" else ("workdir",)))
    from absl import logging
    from jaxdef.train.distributed import initialize
    # Orbax and JAX log every checkpoint step at INFO; keep the terminal for progress.
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache(os.environ)  # JAXDEF_COMPILATION_CACHE=off to disable
    initialize(fv["coordinator"].value, fv["num_processes"].value, fv["process_id"].value)
    return _train(fv) if command == "train" else _eval(fv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunStopped as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:  # before the work's own signal handling is in place
    print("interrupted", file=sys.stderr)
    return 130


def from_launch_argv(argv: Sequence[str]) -> list[str]:
  """``python launch.py`` flags as a ``jaxdef`` command line: ``--mode train``
  (the default) or ``--mode eval`` becomes the command; the rest is kept."""
  mode = _value(argv, "mode") or "train"
  rest = [a for a in _with_value(argv, "mode", "") if not a.startswith(("--mode=", "-mode="))]
  return [mode if mode in ("train", "eval") else f"--mode={mode}", *rest]


def main() -> None:
  """The installed ``jaxdef`` command."""
  sys.exit(run(sys.argv[1:]))
