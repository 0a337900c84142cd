"""The one exception type for user mistakes (bad config, names, data paths).

``jaxdef`` (and ``launch.py``) prints a :class:`ConfigError` as a single line without a
traceback and exits with status 2, before any work starts.
"""


class ConfigError(ValueError):
  """A user-facing error: the message names the field and the valid choices."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
  """``unknown model 'resnet' (valid: resnet18, vgg16)``."""
  return ConfigError(f"unknown {kind} {name!r} (valid: {', '.join(sorted(valid))})")


class RunStopped(RuntimeError):
  """A run stopped for a reason that is not the user's config: divergence, a
  failed checkpoint write. ``jaxdef`` prints it in one line, exit status 3;
  the message names the last good checkpoint."""


class TrainingDiverged(RunStopped):
  """A non-finite loss or gradient (with ``train.on_nonfinite='stop'``)."""


class CheckpointWriteError(RunStopped):
  """A checkpoint could not be written (disk full, permissions, ...)."""
