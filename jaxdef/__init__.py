"""jaxdef: adversarially robust image classifiers in JAX/Flax.

Public API: :func:`restore` (``restore(workdir) -> (config, logits_fn)``);
attacks in :mod:`jaxdef.attacks`; the trainer in :mod:`jaxdef.train`.
"""

from jaxdef import attacks
from jaxdef.restored import restore
from jaxdef.errors import ConfigError
from jaxdef.version import VERSION as __version__
__all__ = ["attacks", "restore", "ConfigError", "__version__"]
