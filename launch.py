"""jaxdef launcher: ``python launch.py --config configs/x.py --workdir runs/x [--mode eval]``.

``--config configs/x.py:variant`` picks a variant of the config file and
``--config.a.b=value`` overrides one field. Mistakes in the config (unknown
names, an eps out of range, a batch size the devices cannot split, missing
data, an unknown field or variant) are reported in one line before any work
starts, with exit status 2. Budgets may be written as fractions:
``--config.attack.eps=8/255``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train: train (or resume) the run in --workdir; "
                          "eval: evaluate its newest checkpoint with config.eval.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0, for a multi-process run (with "
    "--num_processes and --process_id); cluster environments are detected without it.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with fractions for budgets (``eps=8/255``) and a one-line
  ``error:`` (exit 2) for an unknown field, variant or value."""
  from jaxdef.cli import flag_error, with_fractions
  argv = with_fractions(argv)
  try:
    args = flags.FLAGS(argv)
    if "--help" not in argv and "--helpfull" not in argv:
      _CONFIG.value.get("model")  # ml_collections reports a file it could not load only here
    return args
  except Exception as e:  # flags.Error, and what a config file or override raises
    print(f"error: {flag_error(e, argv)}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  # Orbax and JAX log every checkpoint step at INFO; keep the terminal for the progress bar.
  logging.set_verbosity(logging.WARNING)
  import os
  from jaxdef.cli import enable_compilation_cache
  enable_compilation_cache(os.environ)  # JAXDEF_COMPILATION_CACHE=off to disable
  from jaxdef.errors import ConfigError, RunStopped
  from jaxdef.signals import exit_status
  try:
    from jaxdef.train.distributed import initialize
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _MODE.value == "train":
      from jaxdef.train.loop import summary_table, train_and_evaluate
      summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      import jax
      if "preempted_at" in summary:
        # Stopped by a signal, checkpoint saved: exit as the signal would (128 + its
        # number; SIGTERM 143, SIGINT 130), so a scheduler requeues the job.
        sys.exit(exit_status(summary["signal"]))
      if jax.process_index() == 0:
        print("\n" + summary_table(summary))
    else:
      from jaxdef.evaluate import evaluate_workdir
      results = evaluate_workdir(_WORKDIR.value, _CONFIG.value)
      if "partial" in results:
        # Stopped by a signal: the finished attacks are written, marked partial.
        stopped = results["partial"]["stopped_by"]
        print(f"evaluation stopped by {stopped}: partial results written", file=sys.stderr)
        sys.exit(exit_status(stopped))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except RunStopped as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
