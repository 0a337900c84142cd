"""The PyTorch architectures jaxdef reads and writes, and their key names.

An ``--arch`` name picks a PyTorch class and the jaxdef model that computes
the same function:

================================  =====================================================  ==============================
``--arch``                        PyTorch class (key names)                              jaxdef ``model.name`` / kwargs
================================  =====================================================  ==============================
``resnet18``                      RobustBench ``ResNet18()``                             ``resnet18``
``preact_resnet18``               RobustBench ``PreActResNet18()``                       ``preact_resnet18`` (no final
                                                                                         BN-ReLU, raw-input projection)
``preact_resnet18_v2``            RobustBench ``PreActResNet(PreActBlockV2, [2, 2, 2,    ``preact_resnet18`` (defaults)
                                  2], bn_before_fc=True)``
``wrn-D-W``                       RobustBench ``WideResNet(depth=D, widen_factor=W)``    ``wide_resnet`` depth, width
``dm-wrn-D-W-swish|relu``         RobustBench ``DMWideResNet(depth=D, width=W,           ``dm_wide_resnet`` depth, width,
                                  activation_fn=Swish|nn.ReLU)``                         activation
``resnet50``                      torchvision ``resnet50()``                             ``resnet50``
================================  =====================================================  ==============================

Every one is a residual trunk (:class:`jaxdef.models.resnet.ResidualNetwork`):
a stem, stages of blocks, an optional final BatchNorm, a linear head. The
correspondence of parameters is therefore a table of *roles* (a block's
first convolution, its projection shortcut's BatchNorm, ...) named once for
the Flax modules (auto-numbered in creation order: ``Conv_0``,
``BatchNorm_1``) and once per PyTorch family (:data:`FAMILIES`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Optional

from jaxdef.errors import ConfigError
from jaxdef.models.resnet import ResidualNetwork, ResidualSpec

# The DeepMind models' own input normalisation (RobustBench's DMWideResNet
# defaults, CIFAR-10 statistics).
DM_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
DM_CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class Family(NamedTuple):
  """How one PyTorch code base names a residual trunk's modules.

  ``block`` is a format string over ``stage`` (1-based), ``stage0``
  (0-based) and ``block`` (0-based); ``roles`` names each block role
  (:data:`BLOCK_ROLES`); ``ignored`` are key prefixes of modules the forward
  pass never uses (dropped on import, not written on export).
  """
  stem_conv: str
  stem_bn: Optional[str]
  block: str
  roles: dict[str, str]
  final_bn: Optional[str]
  head: str
  ignored: tuple[str, ...] = ()


FAMILIES = {
    "robustbench_resnet": Family(
        "conv1", "bn1", "layer{stage}.{block}",
        dict(conv1="conv1", bn1="bn1", conv2="conv2", bn2="bn2", proj_conv="shortcut.0",
             proj_bn="shortcut.1"), None, "linear"),
    "robustbench_preact": Family(
        "conv1", None, "layer{stage}.{block}",
        dict(bn1="bn1", conv1="conv1", bn2="bn2", conv2="conv2", proj_conv="shortcut.0"),
        "bn", "linear"),
    # The TRADES-era WideResNet; many checkpoints also hold its unused sub_block1.
    "robustbench_wrn": Family(
        "conv1", None, "block{stage}.layer.{block}",
        dict(bn1="bn1", conv1="conv1", bn2="bn2", conv2="conv2", proj_conv="convShortcut"),
        "bn1", "fc", ignored=("sub_block1.",)),
    "deepmind_wrn": Family(
        "init_conv", None, "layer.{stage0}.block.{block}",
        dict(bn1="batchnorm_0", conv1="conv_0", bn2="batchnorm_1", conv2="conv_1",
             proj_conv="shortcut"), "batchnorm", "logits"),
    "torchvision_resnet": Family(
        "conv1", "bn1", "layer{stage}.{block}",
        dict(conv1="conv1", bn1="bn1", conv2="conv2", bn2="bn2", conv3="conv3", bn3="bn3",
             proj_conv="downsample.0", proj_bn="downsample.1"), None, "fc"),
}

# The roles of each jaxdef block's layers in the order its __call__ creates them
# (which fixes their Flax names); projection roles exist only when it projects.
BLOCK_ROLES = {
    "basic": (("conv1", "bn1", "conv2", "bn2"), ("proj_conv", "proj_bn")),
    "bottleneck": (("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), ("proj_conv", "proj_bn")),
}
# A pre-activation block creates its projection between its first BN and conv.
PREACT_ROLES = ("bn1", "proj_conv", "conv1", "bn2", "conv2")


@dataclasses.dataclass(frozen=True)
class Arch:
  """One ``--arch``: the PyTorch class and the jaxdef model that matches it.

  Attributes:
    name: the ``--arch`` name, e.g. ``'wrn-28-10'``.
    model: jaxdef ``model.name``.
    kwargs: jaxdef ``model.kwargs`` as sorted ``(field, value)`` pairs.
    family: key in :data:`FAMILIES`.
    torch_class: the PyTorch constructor whose ``state_dict`` keys these are.
    image_shape: the input size the class is meant for (HWC).
    mean, std: the input normalisation assumed when none is given (None:
      inputs are taken as they are, [0, 1] images).
  """
  name: str
  model: str
  kwargs: tuple[tuple[str, Any], ...]
  family: str
  torch_class: str
  image_shape: tuple[int, int, int] = (32, 32, 3)
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None

  @property
  def class_call(self) -> str:
    """``torch_class`` without its module path: ``WideResNet(depth=28, widen_factor=10)``."""
    head, paren, args = self.torch_class.partition("(")
    return head.rsplit(".", 1)[-1] + paren + args


_FIXED = {
    "resnet18": Arch("resnet18", "resnet18", (), "robustbench_resnet",
                     "robustbench.model_zoo.architectures.resnet.ResNet18()"),
    "preact_resnet18": Arch(
        "preact_resnet18", "preact_resnet18",
        (("final_norm", False), ("projection_input", "raw")), "robustbench_preact",
        "robustbench.model_zoo.architectures.resnet.PreActResNet18()"),
    "preact_resnet18_v2": Arch(
        "preact_resnet18_v2", "preact_resnet18", (), "robustbench_preact",
        "robustbench.model_zoo.architectures.resnet.PreActResNet(PreActBlockV2, [2, 2, 2, 2], "
        "bn_before_fc=True)"),
    "resnet50": Arch("resnet50", "resnet50", (), "torchvision_resnet",
                     "torchvision.models.resnet50()", image_shape=(224, 224, 3)),
}
_WRN = re.compile(r"wrn-(\d+)-(\d+)")
_DM_WRN = re.compile(r"dm-wrn-(\d+)-(\d+)-(swish|relu)")
ARCH_NAMES = (*_FIXED, "wrn-D-W", "dm-wrn-D-W-swish", "dm-wrn-D-W-relu")


def _check_wrn(name: str, depth: int, width: int) -> None:
  if depth < 10 or (depth - 4) % 6 or width < 1:
    raise ConfigError(f"--arch {name}: a WRN's depth must be 6n + 4 with n >= 1 and its "
                      f"width >= 1 (e.g. wrn-28-10, wrn-34-10, dm-wrn-70-16-swish)")


def parse_arch(name: str) -> Arch:
  """The :class:`Arch` of an ``--arch`` name; a one-line ConfigError listing the
  valid names otherwise."""
  if name in _FIXED:
    return _FIXED[name]
  wrn, dm = _WRN.fullmatch(name), _DM_WRN.fullmatch(name)
  if wrn:
    depth, width = int(wrn.group(1)), int(wrn.group(2))
    _check_wrn(name, depth, width)
    return Arch(name, "wide_resnet", (("depth", depth), ("width", width)), "robustbench_wrn",
                f"robustbench.model_zoo.architectures.wide_resnet.WideResNet(depth={depth}, "
                f"widen_factor={width})")
  if dm:
    depth, width, act = int(dm.group(1)), int(dm.group(2)), dm.group(3)
    _check_wrn(name, depth, width)
    torch_act = "Swish" if act == "swish" else "nn.ReLU"
    return Arch(name, "dm_wide_resnet",
                (("activation", act), ("depth", depth), ("width", width)), "deepmind_wrn",
                f"robustbench.model_zoo.architectures.dm_wide_resnet.DMWideResNet(depth={depth}, "
                f"width={width}, activation_fn={torch_act}, mean=MEAN, std=STD)",
                mean=DM_CIFAR10_MEAN, std=DM_CIFAR10_STD)
  raise ConfigError(f"unknown --arch {name!r} (valid: {', '.join(ARCH_NAMES)})")


def arch_of_model(model: Any, model_name: str) -> Arch:
  """The :class:`Arch` whose PyTorch class computes what jaxdef ``model`` does
  (built as ``model.name = model_name``); a one-line ConfigError when there is
  none."""
  from jaxdef.models.resnet import PreActResNet18, ResNet18, ResNet50
  from jaxdef.models.wide_resnet import DMWideResNet, WideResNet
  exportable = ("resnet18, preact_resnet18 (RobustBench's two forms), wide_resnet / wrn34_10 "
                "with relu, dm_wide_resnet, resnet50")
  if isinstance(model, ResNet18):
    return parse_arch("resnet18")
  if isinstance(model, ResNet50):
    return parse_arch("resnet50")
  if isinstance(model, PreActResNet18):
    forms = {(False, "raw"): "preact_resnet18", (True, "activated"): "preact_resnet18_v2"}
    form = forms.get((model.final_norm, model.projection_input))
    if form:
      return parse_arch(form)
    raise ConfigError(f"preact_resnet18 with final_norm={model.final_norm} and "
                      f"projection_input={model.projection_input!r} matches no RobustBench "
                      f"class (final_norm=False with 'raw', or True with 'activated')")
  if isinstance(model, DMWideResNet):
    return parse_arch(f"dm-wrn-{model.depth}-{model.width}-{model.activation}")
  if isinstance(model, WideResNet):
    if model.activation != "relu":
      raise ConfigError(f"RobustBench's WideResNet has ReLU activations, this {model_name} has "
                        f"{model.activation!r}: train dm_wide_resnet for a swish WRN")
    return parse_arch(f"wrn-{model.depth}-{model.width}")
  raise ConfigError(f"model {model_name!r} has no PyTorch counterpart in jaxdef's export "
                    f"(exportable: {exportable})")


class Layer(NamedTuple):
  """One parameterised layer: its Flax module path, PyTorch key prefix and kind
  ('conv', 'bn' or 'dense')."""
  path: tuple[str, ...]
  torch: str
  kind: str


def _numbered(roles: tuple[str, ...]) -> dict[str, str]:
  """Flax's auto-names for layers created in the order of ``roles``."""
  names, counts = {}, {"conv": 0, "bn": 0}
  for role in roles:
    kind = "bn" if "bn" in role else "conv"
    names[role] = f"{'BatchNorm' if kind == 'bn' else 'Conv'}_{counts[kind]}"
    counts[kind] += 1
  return names


def _block_roles(spec: ResidualSpec, projects: bool) -> tuple[str, ...]:
  if spec.preact:
    return tuple(r for r in PREACT_ROLES if projects or not r.startswith("proj"))
  plain, projection = BLOCK_ROLES[spec.block]
  return plain + (projection if projects else ())


def layers(model: ResidualNetwork, family: Family) -> list[Layer]:
  """Every parameterised layer of jaxdef ``model`` with its PyTorch name in
  ``family``, in the order of the forward pass."""
  spec = model.spec
  out = [Layer(("Conv_0",), family.stem_conv, "conv")]
  top_bn = 0
  if not spec.preact or spec.imagenet_stem:
    out.append(Layer(("BatchNorm_0",), family.stem_bn, "bn"))
    top_bn = 1
  block_class = {"preact": "PreActBlock", "basic": "BasicBlock",
                 "bottleneck": "Bottleneck"}[spec.block]
  channels, index = spec.stem_width, 0
  for stage, (width, stride, blocks) in enumerate(
      zip(spec.widths, spec.strides, spec.stage_blocks())):
    for b in range(blocks):
      projects = (stride if b == 0 else 1) != 1 or channels != width
      roles = _block_roles(spec, projects)
      prefix = family.block.format(stage=stage + 1, stage0=stage, block=b)
      for role, flax_name in _numbered(roles).items():
        out.append(Layer((f"{block_class}_{index}", flax_name),
                         f"{prefix}.{family.roles[role]}", "bn" if "bn" in role else "conv"))
      channels, index = width, index + 1
  if spec.preact and spec.final_norm:
    out.append(Layer((f"BatchNorm_{top_bn}",), family.final_bn, "bn"))
  out.append(Layer(("head",), family.head, "dense"))
  return out
