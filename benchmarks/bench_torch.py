"""The PyTorch twin of jaxdef's training and evaluation steps, for ``benchmarks.bench``.

Imported only by ``python -m benchmarks.bench --compare torch`` (and its test):
PyTorch is a benchmark extra, never a dependency of the library.

The twins are the same networks as jaxdef's ``small_cnn``, ``resnet18``,
``preact_resnet18`` and ``wide_resnet`` / ``wrn34_10`` (read from the Flax
module itself: its ``spec``, ``width``, ``num_classes``, ``mean``, ``std``),
with every submodule named as its Flax counterpart (``Conv_0``,
``BasicBlock_3.BatchNorm_1``, ``head``, ...), so :func:`load_flax_variables`
copies a Flax checkpoint leaf by leaf and the test checks equal logits.
jaxdef's ``resnet50`` runs as torchvision's own ``resnet50`` (its weights
through :func:`jaxdef.interop.convert.to_torch`; the torchvision package files
must be installed, CUDA build or not: :mod:`benchmarks.torch_references`).

``mode`` (:data:`TORCH_MODES`) is how the twin runs: ``eager`` (the usual
best practice below) or ``torch.compile`` of the network in its ``default``,
``reduce-overhead`` (CUDA graphs) or ``max-autotune`` mode; the step around
it (the PGD loop, ``torch.autograd.grad``, the SGD update) stays eager, as a
user compiling the model writes it.

The step is the usual eager best practice for PGD-AT (Madry et al. 2018;
docs/methods.md section 0), the same computation as
:func:`jaxdef.train.step.make_train_step` with defense ``none`` and objective
``at``: on-device crop + flip, PGD (uniform start, ``steps`` signed-gradient
steps, BatchNorm in eval mode, ``torch.autograd.grad`` with respect to the
input only), then one SGD update (momentum, coupled weight decay) on the CE
loss of the adversarial batch in training mode. On CUDA: channels_last,
cuDNN autotuning and bf16 autocast (AMP); on CPU the plain NCHW float32
(or bf16 autocast when asked) path. Not mirrored: jaxdef's gradient-norm
metric and its non-finite-update guard (a few element-wise ops).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# How the twin network runs: eager, or torch.compile in one of its modes (one
# list, which benchmarks.bench's flags check without importing PyTorch).
from benchmarks.bench import TORCH_MODES


# Modes that replay CUDA graphs (a new step must be marked before each call).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclasses.dataclass(frozen=True)
class TorchSettings:
  """How the twin runs: the device, AMP dtype (None: float32) and memory format."""
  device: str
  amp_dtype: Optional[torch.dtype]
  channels_last: bool
  mode: str = "eager"

  def autocast(self):
    if self.amp_dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device.split(":")[0], dtype=self.amp_dtype)

  def describe(self) -> dict[str, Any]:
    return {"device": self.device, "threads": torch.get_num_threads(),
            "amp": None if self.amp_dtype is None else str(self.amp_dtype).split(".")[-1],
            "channels_last": self.channels_last, "mode": self.mode}

  def mark_step(self) -> None:
    """Before each call of a CUDA-graph-compiled network: its previous outputs
    may be overwritten (torch.compiler.cudagraph_mark_step_begin)."""
    if self.mode in CUDA_GRAPH_MODES and self.device.startswith("cuda"):
      torch.compiler.cudagraph_mark_step_begin()


def default_settings(dtype: str, layout: str = "auto", mode: str = "eager") -> TorchSettings:
  """CUDA if present: AMP in bf16 and channels_last (the best-practice
  baseline, whatever jaxdef's ``dtype``). CPU: float32 unless ``dtype`` is
  'bfloat16' (then bf16 autocast), NCHW. ``layout`` 'nhwc' / 'nchw' forces
  the memory format; ``mode``: one of :data:`TORCH_MODES`."""
  if mode not in TORCH_MODES:
    raise ValueError(f"unknown PyTorch mode {mode!r} (known: {', '.join(TORCH_MODES)})")
  cuda = torch.cuda.is_available()
  if cuda:
    torch.backends.cudnn.benchmark = True
  amp = torch.bfloat16 if cuda or dtype == "bfloat16" else None
  channels_last = cuda if layout == "auto" else layout == "nhwc"
  return TorchSettings("cuda" if cuda else "cpu", amp, channels_last, mode)


def compiled(net: nn.Module, mode: str, compile_fn: Optional[Callable] = None) -> nn.Module:
  """``net`` itself for 'eager'; otherwise ``torch.compile(net, mode=...)``
  ('default' is torch.compile's own default). ``compile_fn`` replaces
  ``torch.compile`` (the test of the dispatch)."""
  if mode not in TORCH_MODES:
    raise ValueError(f"unknown PyTorch mode {mode!r} (known: {', '.join(TORCH_MODES)})")
  if mode == "eager":
    return net
  return (compile_fn or torch.compile)(net, mode=None if mode == "default" else mode)


# ----------------------------------------------------------------------------
# The twin networks (NCHW in, logits out; the Flax names as module names).

def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, *, padding: Optional[int] = None,
          bias: bool = False) -> nn.Conv2d:
  """jaxdef's ``layers.conv``: symmetric padding ``kernel // 2`` by default."""
  return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2 if padding is None else padding,
                   bias=bias)


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class _Normalize(nn.Module):
  """(x - mean) / std per channel, inside the model as in jaxdef."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    super().__init__()
    # (C,) or (1,) statistics broadcast over NCHW, as over NHWC's last axis in Flax.
    as_nchw = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
    self.register_buffer("mean", as_nchw(mean), persistent=False)
    self.register_buffer("std", as_nchw(std), persistent=False)

  def forward(self, x):
    return (x - self.mean) / self.std


class SmallCNNTwin(nn.Module):
  """jaxdef ``small_cnn``: 4 unpadded 3x3 convs (32, 32, 64, 64) with max-pools
  after the 2nd and 4th, dense 200 - 200 - classes; flattened in NHWC order."""

  def __init__(self, *, width: float, num_classes: int, mean, std, image_shape):
    super().__init__()
    h, w, c = image_shape
    units = lambda n: max(1, int(round(n * width)))
    chans = [c] + [units(n) for n in (32, 32, 64, 64)]
    self.normalize = _Normalize(mean, std)
    for i in range(4):
      self.add_module(f"Conv_{i}", _conv(chans[i], chans[i + 1], 3, padding=0, bias=True))
    side = lambda s: ((s - 4) // 2 - 4) // 2
    self.Dense_0 = nn.Linear(chans[4] * side(h) * side(w), units(200))
    self.Dense_1 = nn.Linear(units(200), units(200))
    self.head = nn.Linear(units(200), num_classes)

  def forward(self, x):
    h = self.normalize(x)
    for i in range(4):
      h = F.relu(getattr(self, f"Conv_{i}")(h))
      if i % 2 == 1:
        h = F.max_pool2d(h, 2, 2)
    h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
    h = F.relu(self.Dense_1(F.relu(self.Dense_0(h))))
    return self.head(h)


class BasicBlockTwin(nn.Module):
  """jaxdef ``BasicBlock``: conv-BN-ReLU-conv-BN + (1x1 conv + BN) shortcut, ReLU."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.Conv_0, self.BatchNorm_0 = _conv(c_in, c_out, 3, stride), _bn(c_out)
    self.Conv_1, self.BatchNorm_1 = _conv(c_out, c_out, 3), _bn(c_out)
    self.project = stride != 1 or c_in != c_out
    if self.project:
      self.Conv_2, self.BatchNorm_2 = _conv(c_in, c_out, 1, stride), _bn(c_out)

  def forward(self, x):
    h = F.relu(self.BatchNorm_0(self.Conv_0(x)))
    h = self.BatchNorm_1(self.Conv_1(h))
    shortcut = self.BatchNorm_2(self.Conv_2(x)) if self.project else x
    return F.relu(h + shortcut)


class PreActBlockTwin(nn.Module):
  """jaxdef ``PreActBlock``: a = ReLU(BN(x)); conv(ReLU(BN(conv(a)))) + shortcut,
  the projection (created first in Flax, hence ``Conv_0``) reading ``a``."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.BatchNorm_0 = _bn(c_in)
    self.project = stride != 1 or c_in != c_out
    first = 1 if self.project else 0
    if self.project:
      self.Conv_0 = _conv(c_in, c_out, 1, stride)
    self.add_module(f"Conv_{first}", _conv(c_in, c_out, 3, stride))
    self.BatchNorm_1 = _bn(c_out)
    self.add_module(f"Conv_{first + 1}", _conv(c_out, c_out, 3))
    self.names = (f"Conv_{first}", f"Conv_{first + 1}")

  def forward(self, x):
    a = F.relu(self.BatchNorm_0(x))
    shortcut = self.Conv_0(a) if self.project else x
    h = F.relu(self.BatchNorm_1(getattr(self, self.names[0])(a)))
    return getattr(self, self.names[1])(h) + shortcut


class ResidualTwin(nn.Module):
  """jaxdef's residual trunk for a ``ResidualSpec`` (ResNet-18, PreAct, WRN)."""

  def __init__(self, *, spec, num_classes: int, mean, std, image_shape):
    super().__init__()
    c = image_shape[-1]
    self.normalize = _Normalize(mean, std)
    self.preact = spec.preact
    self.Conv_0 = _conv(c, spec.stem_width, 3)
    if not spec.preact:
      self.BatchNorm_0 = _bn(spec.stem_width)
    kind, block = ("PreActBlock", PreActBlockTwin) if spec.preact else (
        "BasicBlock", BasicBlockTwin)
    blocks, c_in = [], spec.stem_width
    for width, stride in zip(spec.widths, spec.strides):
      for b in range(spec.blocks_per_stage):
        blocks.append((f"{kind}_{len(blocks)}", block(c_in, width, stride if b == 0 else 1)))
        c_in = width
    for name, module in blocks:
      self.add_module(name, module)
    self.block_names = [name for name, _ in blocks]
    if spec.preact:
      self.BatchNorm_0 = _bn(c_in)
    self.head = nn.Linear(c_in, num_classes)

  def forward(self, x):
    h = self.Conv_0(self.normalize(x))
    if not self.preact:
      h = F.relu(self.BatchNorm_0(h))
    for name in self.block_names:
      h = getattr(self, name)(h)
    if self.preact:
      h = F.relu(self.BatchNorm_0(h))
    return self.head(h.mean(dim=(2, 3)))


def torch_twin(model: Any, image_shape: Sequence[int]) -> nn.Module:
  """The PyTorch network of the Flax ``model`` (a jaxdef classifier without
  defense inserts) for NHWC ``image_shape``; raises ``NotImplementedError``
  for architectures without a twin (VGG) or with inserts."""
  from jaxdef.models.resnet import ResidualNetwork
  from jaxdef.models.small_cnn import SmallCNN
  if model.insert is not None:
    raise NotImplementedError("no PyTorch twin of models with defense modules")
  common = dict(num_classes=model.num_classes, mean=model.mean, std=model.std,
                image_shape=tuple(image_shape))
  if isinstance(model, SmallCNN):
    return SmallCNNTwin(width=model.width, **common)
  if isinstance(model, ResidualNetwork):
    spec = model.spec
    if spec.activation != "relu" or spec.downsample_padding != "torch" or spec.bottleneck:
      raise NotImplementedError(f"no twin of {type(model).__name__} with its activation, "
                                f"padding or blocks")
    return ResidualTwin(spec=spec, **common)
  raise NotImplementedError(f"no PyTorch twin of {type(model).__name__}")


def torchvision_resnet50(model: Any, variables: dict) -> nn.Module:
  """torchvision's ``resnet50`` holding jaxdef ``resnet50`` ``variables``,
  behind the model's input normalisation. Raises ``NotImplementedError``
  when torchvision's files are not installed."""
  from benchmarks.torch_references import MissingReference, torch_module
  from jaxdef.interop.convert import to_torch
  try:
    net = torch_module("resnet50", num_classes=model.num_classes)
  except MissingReference as e:
    raise NotImplementedError(f"no torchvision for the ResNet-50 twin ({e})") from None
  _, state = to_torch(model, "resnet50", variables)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  return nn.Sequential(_Normalize(model.mean, model.std), net)


def load_flax_variables(twin: nn.Module, variables: dict) -> nn.Module:
  """Copies Flax ``params`` (and ``batch_stats``) into ``twin`` by name.

  Conv kernels HWIO -> OIHW ``weight``, dense kernels (in, out) -> (out, in),
  BatchNorm ``scale`` -> ``weight``, ``mean`` / ``var`` -> ``running_mean`` /
  ``running_var``. Every Flax leaf must find its tensor (KeyError otherwise).
  """
  import jax
  names = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
  state = twin.state_dict()
  for collection in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get(collection, {})):
      keys = [p.key for p in path]
      target = ".".join(keys[:-1] + [names.get(keys[-1], keys[-1])])
      value = np.asarray(leaf, np.float32)
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:
        value = value.T
      if target not in state or tuple(state[target].shape) != value.shape:
        raise KeyError(f"Flax leaf {'/'.join(keys)} has no twin tensor {target} of shape "
                       f"{value.shape}")
      state[target] = torch.from_numpy(value.copy())
  twin.load_state_dict(state)
  return twin


# ----------------------------------------------------------------------------
# The steps.

def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
  """jaxdef's ``random_crop_flip`` on NCHW: zero-pad, per-example random crop,
  horizontal flip with probability 1/2 (gather with per-example indices)."""
  n, _, h, w = x.shape
  padded = F.pad(x, (pad, pad, pad, pad))
  dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
  dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
  cols = dx + torch.arange(w, device=x.device)
  flip = torch.rand(n, 1, device=x.device) < 0.5
  cols = torch.where(flip, cols.flip(1), cols)
  rows = dy + torch.arange(h, device=x.device)
  batch = torch.arange(n, device=x.device)[:, None, None]
  # (n, h, w, c) after advanced indexing of the batch and both spatial axes.
  out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
  return out.permute(0, 3, 1, 2)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
             step_size: float, steps: int, settings: TorchSettings) -> torch.Tensor:
  """L-inf PGD on the summed CE with a uniform start, as ``attacks.perturb``:
  gradients by ``torch.autograd.grad`` with respect to the input only."""
  x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    settings.mark_step()
    with settings.autocast():
      loss = F.cross_entropy(model(x_adv).float(), y, reduction="sum")
    grad, = torch.autograd.grad(loss, x_adv)
    x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
  return x_adv.detach()


def gradient_check(net: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   settings: Optional[TorchSettings] = None) -> dict[str, Any]:
  """The attack's gradient (summed CE w.r.t. the input, BatchNorm in eval
  mode, under ``settings``' autocast) through ``net`` against ``reference``
  (the same network eager), on ``x``: a compiled network must compute the
  same attack. Matches: the largest difference is within 5% of the largest
  gradient entry (bf16 autocast rounds differently in fused kernels)."""
  grads = []
  for model in (net, reference):
    model.eval()
    z = x.detach().clone().requires_grad_(True)
    if settings is not None:
      settings.mark_step()
    with settings.autocast() if settings is not None else contextlib.nullcontext():
      loss = F.cross_entropy(model(z).float(), y, reduction="sum")
    grads.append(torch.autograd.grad(loss, z)[0].float())
  scale = grads[1].abs().max().item()
  diff = (grads[0] - grads[1]).abs().max().item()
  return {"max_abs_diff": diff, "max_abs": scale,
          "matches_eager": bool(scale > 0 and diff <= 0.05 * scale)}


def _to_input(images_uint8: torch.Tensor, settings: TorchSettings) -> torch.Tensor:
  x = images_uint8.float() / 255.0
  return x.contiguous(memory_format=torch.channels_last) if settings.channels_last else x


def make_train_step(model: nn.Module, *, eps: float, step_size: float, steps: int, lr: float,
                    momentum: float, weight_decay: float, augment: str,
                    settings: TorchSettings) -> Callable:
  """``step(images_uint8_nchw, labels) -> loss``: PGD-``steps`` AT, one SGD update."""
  opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                        weight_decay=weight_decay)

  def step(images, labels):
    x = _to_input(images, settings)
    if augment == "crop_flip":
      x = crop_flip(x)
    model.eval()  # the attack sees BatchNorm running statistics (attack.bn = 'eval')
    x_adv = pgd_linf(model, x, labels, eps=eps, step_size=step_size, steps=steps,
                     settings=settings)
    model.train()
    settings.mark_step()
    with settings.autocast():
      loss = F.cross_entropy(model(x_adv).float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return step


def make_eval_step(model: nn.Module, *, eps: float, step_size: float, steps: int,
                   settings: TorchSettings) -> Callable:
  """``step(images_uint8_nchw, labels) -> (clean correct, robust correct)``."""
  def step(images, labels):
    model.eval()
    x = _to_input(images, settings)
    settings.mark_step()
    with torch.no_grad(), settings.autocast():
      clean = model(x).argmax(1) == labels
    x_adv = pgd_linf(model, x, labels, eps=eps, step_size=step_size, steps=steps,
                     settings=settings)
    settings.mark_step()
    with torch.no_grad(), settings.autocast():
      robust = clean & (model(x_adv).argmax(1) == labels)
    return clean.sum(), robust.sum()

  return step


def prepare(model: Any, variables: dict, image_shape: Sequence[int],
            settings: TorchSettings, compile_fn: Optional[Callable] = None) -> nn.Module:
  """The twin of ``model`` holding ``variables``, on the device and memory
  format, compiled as ``settings.mode`` says (:func:`compiled`)."""
  from jaxdef.models.resnet import ResNet50
  if isinstance(model, ResNet50) and model.insert is None:
    twin = torchvision_resnet50(model, variables)
  else:
    twin = load_flax_variables(torch_twin(model, image_shape), variables)
  twin = twin.to(settings.device)
  if settings.channels_last:
    twin = twin.to(memory_format=torch.channels_last)
  return compiled(twin, settings.mode, compile_fn)


def to_device(images_nhwc: np.ndarray, labels: np.ndarray,
              settings: TorchSettings) -> tuple[torch.Tensor, torch.Tensor]:
  """uint8 NHWC numpy -> uint8 NCHW tensor (channels_last memory if set), int64 labels."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).to(settings.device)
  x = x.permute(0, 3, 1, 2)
  x = x.contiguous(memory_format=torch.channels_last) if settings.channels_last else x.contiguous()
  return x, torch.from_numpy(np.asarray(labels, np.int64)).to(settings.device)


def synchronize(settings: TorchSettings) -> None:
  if settings.device.startswith("cuda"):
    torch.cuda.synchronize()
