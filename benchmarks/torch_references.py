"""The PyTorch reference definitions of jaxdef's imported architectures.

RobustBench's architecture modules (``pip install --no-deps robustbench==1.1.1``)
and torchvision's ResNet-50 are loaded without running their packages'
``__init__``: RobustBench's imports its model downloaders' dependencies
(timm, pandas, gdown), and torchvision's loads compiled operators that the
torchvision wheel on the package index (built against CUDA torch) cannot
load beside the CPU build of torch. The model definitions need only
``torch.nn``. Used by tests/test_interop.py and bench_import_autoattack.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType


class MissingReference(ImportError):
  """The package that holds a reference definition is not installed."""


def definitions(module: str) -> ModuleType:
  """The module ``module`` of an installed package, its parent packages'
  ``__init__`` not run; ``sys.modules`` is left as it was."""
  parts = module.split(".")
  if importlib.util.find_spec(parts[0]) is None:
    raise MissingReference(f"{parts[0]} is not installed (RobustBench: pip install --no-deps "
                           f"robustbench==1.1.1)")
  before = set(sys.modules)
  try:
    for i in range(1, len(parts)):
      name = ".".join(parts[:i])
      if name in sys.modules:
        continue
      if i == 1:
        folder = importlib.util.find_spec(name).submodule_search_locations[0]
      else:
        folder = os.path.join(sys.modules[".".join(parts[:i - 1])].__path__[0], parts[i - 1])
      spec = importlib.util.spec_from_file_location(
          name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
      sys.modules[name] = importlib.util.module_from_spec(spec)
    return importlib.import_module(module)
  finally:
    for name in set(sys.modules) - before:
      if name.split(".")[0] == parts[0]:
        del sys.modules[name]


def robustbench(name: str) -> ModuleType:
  """``robustbench.model_zoo.architectures.<name>`` (resnet, wide_resnet, dm_wide_resnet)."""
  return definitions(f"robustbench.model_zoo.architectures.{name}")


def torch_module(arch: str, num_classes: int = 10):
  """A fresh PyTorch module of the jaxdef ``--arch`` name ``arch`` (its own
  initialisation), the class whose key names jaxdef.interop reads."""
  from jaxdef.interop import parse_arch
  spec = parse_arch(arch)
  kwargs = dict(spec.kwargs)
  if spec.family == "robustbench_wrn":
    return robustbench("wide_resnet").WideResNet(depth=kwargs["depth"],
                                                 widen_factor=kwargs["width"],
                                                 num_classes=num_classes)
  if spec.family == "deepmind_wrn":
    dm = robustbench("dm_wide_resnet")
    import torch
    act = dm.Swish if kwargs["activation"] == "swish" else torch.nn.ReLU
    return dm.DMWideResNet(num_classes=num_classes, depth=kwargs["depth"],
                           width=kwargs["width"], activation_fn=act)
  if spec.name == "resnet50":
    return definitions("torchvision.models.resnet").resnet50(num_classes=num_classes)
  rb = robustbench("resnet")
  if spec.name == "resnet18":
    return rb.ResNet(rb.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
  if spec.name == "preact_resnet18":
    return rb.PreActResNet(rb.PreActBlock, [2, 2, 2, 2], num_classes=num_classes)
  return rb.PreActResNet(rb.PreActBlockV2, [2, 2, 2, 2], num_classes=num_classes,
                         bn_before_fc=True)


def briefly_trained(module, x, y, *, steps: int, batch: int, lr: float = 2e-3, seed: int = 0,
                    device: str = "cpu"):
  """``module`` trained ``steps`` Adam steps of ``batch`` random examples of
  ``(x, y)`` (NHWC float images, int labels), BatchNorm statistics updated,
  returned in eval mode on ``device``: a model that is right on some inputs
  and that an attack can break, unlike a random network, which gives one
  class almost everywhere."""
  import numpy as np
  import torch
  module = module.to(device).train()
  opt = torch.optim.Adam(module.parameters(), lr=lr)
  xt = torch.tensor(np.transpose(x, (0, 3, 1, 2))).contiguous()
  yt = torch.tensor(np.asarray(y)).long()
  order = torch.Generator().manual_seed(seed)
  for _ in range(steps):
    idx = torch.randint(0, len(xt), (batch,), generator=order)
    loss = torch.nn.functional.cross_entropy(module(xt[idx].to(device)), yt[idx].to(device))
    opt.zero_grad()
    loss.backward()
    opt.step()
  return module.eval()
