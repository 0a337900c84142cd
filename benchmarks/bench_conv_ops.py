"""Where a CPU PGD-AT step of ResNet-18 spends its time: per-convolution timing.

Times, for every distinct convolution of ResNet-18 at 32x32 (NHWC, HWIO in
XLA; NCHW in PyTorch), the three passes a PGD-AT step runs: forward, input
gradient (``dgrad``: every attack step and the update) and weight gradient
(``wgrad``: the update only), in jaxdef's framework (one jitted XLA op,
``lax.conv_general_dilated`` and its VJPs) and in PyTorch (``F.conv2d``,
``torch.nn.grad.conv2d_input`` / ``conv2d_weight``). Multiplied by how often
each shape occurs, the table shows which pass and which layer make up the
difference between ``python -m benchmarks.bench --compare torch`` figures.

  python benchmarks/bench_conv_ops.py --batch 32 --iters 5
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench import median_seconds  # noqa: E402

# (c_in, c_out, kernel, stride, input side, occurrences in ResNet-18 at 32x32)
RESNET18_CONVS = (
    (3, 64, 3, 1, 32, 1), (64, 64, 3, 1, 32, 4),
    (64, 128, 3, 2, 32, 1), (128, 128, 3, 1, 16, 3), (64, 128, 1, 2, 32, 1),
    (128, 256, 3, 2, 16, 1), (256, 256, 3, 1, 8, 3), (128, 256, 1, 2, 16, 1),
    (256, 512, 3, 2, 8, 1), (512, 512, 3, 1, 4, 3), (256, 512, 1, 2, 8, 1),
)


def median_ms(fn, iters: int) -> float:
  """Median milliseconds of ``fn()`` after a warm-up (:func:`benchmarks.bench.median_seconds`)."""
  return 1e3 * median_seconds(fn, iters)


def jax_passes(batch, c_in, c_out, k, stride, side, iters):
  """Forward, input-gradient and weight-gradient ms of one XLA convolution."""
  pad = ((k // 2, k // 2),) * 2

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, side, side, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)), jnp.float32)
  y, vjp = jax.vjp(conv, x, w)
  ct = jnp.ones_like(y)
  fwd = jax.jit(conv)
  dgrad = jax.jit(lambda x, w, ct: jax.vjp(lambda z: conv(z, w), x)[1](ct)[0])
  wgrad = jax.jit(lambda x, w, ct: jax.vjp(lambda v: conv(x, v), w)[1](ct)[0])
  return [median_ms(lambda: f(*a).block_until_ready(), iters)
          for f, a in ((fwd, (x, w)), (dgrad, (x, w, ct)), (wgrad, (x, w, ct)))]


def torch_passes(batch, c_in, c_out, k, stride, side, iters):
  import torch
  import torch.nn.functional as F
  x = torch.randn(batch, c_in, side, side)
  w = torch.randn(c_out, c_in, k, k)
  y = F.conv2d(x, w, stride=stride, padding=k // 2)
  ct = torch.ones_like(y)
  with torch.no_grad():
    return [median_ms(f, iters) for f in (
        lambda: F.conv2d(x, w, stride=stride, padding=k // 2),
        lambda: torch.nn.grad.conv2d_input(x.shape, w, ct, stride=stride, padding=k // 2),
        lambda: torch.nn.grad.conv2d_weight(x, w.shape, ct, stride=stride, padding=k // 2))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args()
  import torch
  print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load {os.getloadavg()[0]:.1f}\n")
  print("| conv (c_in>c_out, k, s, side) x n | XLA fwd / dgrad / wgrad ms "
        "| torch fwd / dgrad / wgrad ms | XLA / torch (fwd, dgrad, wgrad) |")
  print("|---|---|---|---|")
  totals = np.zeros((2, 3))
  for c_in, c_out, k, stride, side, n in RESNET18_CONVS:
    ours = np.array(jax_passes(args.batch, c_in, c_out, k, stride, side, args.iters))
    theirs = np.array(torch_passes(args.batch, c_in, c_out, k, stride, side, args.iters))
    totals += n * np.stack([ours, theirs])
    print(f"| {c_in}>{c_out}, {k}, {stride}, {side} x{n} | "
          f"{' / '.join(f'{v:.1f}' for v in ours)} | {' / '.join(f'{v:.1f}' for v in theirs)} | "
          f"{', '.join(f'{a / b:.2f}' for a, b in zip(ours, theirs))} |", flush=True)
  print(f"| **network total (x occurrences)** | {' / '.join(f'{v:.0f}' for v in totals[0])} | "
        f"{' / '.join(f'{v:.0f}' for v in totals[1])} | "
        f"{', '.join(f'{a / b:.2f}' for a, b in totals.T)} |")
  # A PGD-10 AT step: 10 x (fwd + dgrad) for the attack, fwd + dgrad + wgrad for the update.
  step = lambda t: 11 * (t[0] + t[1]) + t[2]
  print(f"\nconvolutions of one PGD-10 AT step (11 fwd + 11 dgrad + 1 wgrad): "
        f"XLA {step(totals[0]):.0f} ms, torch {step(totals[1]):.0f} ms")


if __name__ == "__main__":
  main()
