"""Models from PyTorch and back: RobustBench / torchvision checkpoints in, jaxdef runs out.

* :func:`from_torch` ``(state_dict, arch) -> (model, variables)`` and
  :func:`to_torch`: the weights of a PyTorch state dict in a jaxdef model and
  back, for the architectures of :mod:`jaxdef.interop.architectures`.
* :func:`read_weights`: a ``.safetensors`` file (read without PyTorch) or a
  ``.pt``/``.pth`` pickle (only through ``torch.load(weights_only=True)``),
  wrappers unwrapped.
* :func:`import_run` / :func:`export_run`: ``jaxdef import torch`` and
  ``jaxdef export``, a run directory from a checkpoint file and back.

jaxdef never imports PyTorch except to read a pickled checkpoint.
"""

from jaxdef.interop.architectures import ARCH_NAMES, Arch, parse_arch
from jaxdef.interop.convert import from_torch, to_torch
from jaxdef.interop.runs import export_run, export_summary, import_run, import_summary
from jaxdef.interop.tensors import read_weights

__all__ = ["ARCH_NAMES", "Arch", "export_run", "export_summary", "from_torch", "import_run",
           "import_summary", "parse_arch", "read_weights", "to_torch"]
