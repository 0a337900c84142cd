"""The public ``jaxdef.attacks.autoattack`` on models written outside jaxdef, against pyautoattack.

Two networks that jaxdef's model zoo did not write, each with a PyTorch twin
carrying the same weights:

* ``lax-cnn``: a plain function of ``lax`` calls, four SAME-padded 3x3
  convolutions (two per resolution) with 2x2 max-pooling after each pair,
  then two dense layers;
* ``vgg``: a VGG-style ``flax.linen`` module, conv-conv-pool three times
  (``nn.Conv`` SAME, ``nn.max_pool``) and one dense layer.

Each is PGD-trained briefly here (PGD-3 AT at L-inf 8/255 ramped over the
first two epochs, weights cached under /tmp, not in git), then attacked on the
first ``--n`` CIFAR-subset test images with AutoAttack standard, L-inf
8/255, full budget. Times, per stage and in all:

* jaxdef, first call in this process: ``attacks.autoattack(logits_fn, x, y,
  key=..., eps=...)`` as the README calls it, compilation included;
* jaxdef, second call (its programs compiled);
* pyautoattack 0.2.0 ``run_standard_evaluation`` on the twin (its own
  per-stage log), unless torch is missing or ``--skip-reference``.

Per-stage seconds are differences of the "total time" each library prints
after a stage (jaxdef's first stage includes the clean pass and the
compilation of both). The correctness check: robust accuracy equal within
one example in 250.

  pip install torch==2.13.0 pyautoattack==0.2.0
  python benchmarks/bench_autoattack_foreign.py --n 250 --npz data/cifar10_subset.npz
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import compare_torch_attacks as twin  # noqa: E402
from benchmarks.bench_autoattack_reference import (EPS, pgd_train,  # noqa: E402
                                                   pyautoattack_call)
from jaxdef import attacks  # noqa: E402

STAGES = ("APGD-CE", "APGD-T", "FAB-T", "SQUARE")


# ----------------------------------------------------------------------------
# (a) A CNN as a plain function of lax calls.

def lax_cnn_init(key, widths=(16, 32), hidden=128, classes=10):
  """He-initialised numpy parameters (HWIO kernels) for 32x32x3 inputs."""
  keys = iter(jax.random.split(key, 6))
  he = lambda shape, fan_in: np.asarray(jax.random.normal(next(keys), shape)
                                        * np.sqrt(2.0 / fan_in), np.float32)
  c0, c1 = widths
  flat = 8 * 8 * c1
  return {"k1": he((3, 3, 3, c0), 27), "k2": he((3, 3, c0, c0), 9 * c0),
          "k3": he((3, 3, c0, c1), 9 * c0), "k4": he((3, 3, c1, c1), 9 * c1),
          "b1": np.zeros(c0, np.float32), "b2": np.zeros(c0, np.float32),
          "b3": np.zeros(c1, np.float32), "b4": np.zeros(c1, np.float32),
          "w5": he((flat, hidden), flat), "b5": np.zeros(hidden, np.float32),
          "w6": he((hidden, classes), hidden), "b6": np.zeros(classes, np.float32)}


def lax_cnn_apply(params, x):
  """Logits for NHWC ``x`` in [0, 1]: (conv-relu x2, 2x2 max-pool) x2, dense-relu, dense."""
  conv = lambda v, k, b: jax.nn.relu(lax.conv_general_dilated(
      v, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b)
  pool = lambda v: lax.reduce_window(v, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  h = pool(conv(conv(x - 0.5, params["k1"], params["b1"]), params["k2"], params["b2"]))
  h = pool(conv(conv(h, params["k3"], params["b3"]), params["k4"], params["b4"]))
  h = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["w5"] + params["b5"])
  return h @ params["w6"] + params["b6"]


# ----------------------------------------------------------------------------
# (b) A VGG-style flax.linen module.

class VGGStyle(nn.Module):
  """(conv-relu, conv-relu, 2x2 max-pool) per width, then one dense layer."""
  widths: tuple = (16, 32, 64)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    h = x - 0.5
    for width in self.widths:
      h = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(h))
      h = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    return nn.Dense(self.classes)(h.reshape(h.shape[0], -1))


def vgg_init(key):
  """Flat numpy parameters ``{'Conv_0/kernel': ..., ...}`` of :class:`VGGStyle`."""
  variables = VGGStyle().init(key, jnp.zeros((1, 32, 32, 3)))
  return {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(variables["params"], sep="/").items()}


def vgg_apply(params, x):
  tree = traverse_util.unflatten_dict(params, sep="/")
  return VGGStyle().apply({"params": tree}, x)


# ----------------------------------------------------------------------------
# The PyTorch twins (same weights, NCHW inputs, flattening in NHWC order).

def _torch_tensor(a):
  import torch
  return torch.tensor(np.asarray(a, np.float32))


def torch_lax_cnn(params):
  import torch
  f = torch.nn.functional
  p = {k: _torch_tensor(np.transpose(v, (3, 2, 0, 1)) if v.ndim == 4 else v)
       for k, v in params.items()}

  class LaxCNN(torch.nn.Module):
    def forward(self, x):
      conv = lambda v, i: f.relu(f.conv2d(v, p[f"k{i}"], p[f"b{i}"], padding=1))
      h = f.max_pool2d(conv(conv(x - 0.5, 1), 2), 2)
      h = f.max_pool2d(conv(conv(h, 3), 4), 2)
      h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
      return f.relu(h @ p["w5"] + p["b5"]) @ p["w6"] + p["b6"]

  return LaxCNN().eval()


def torch_vgg(params):
  import torch
  f = torch.nn.functional
  convs = sorted({k.split("/")[0] for k in params if k.startswith("Conv_")},
                 key=lambda name: int(name.split("_")[1]))
  kernels = [(_torch_tensor(np.transpose(params[f"{c}/kernel"], (3, 2, 0, 1))),
              _torch_tensor(params[f"{c}/bias"])) for c in convs]
  dense = _torch_tensor(params["Dense_0/kernel"]), _torch_tensor(params["Dense_0/bias"])

  class VGG(torch.nn.Module):
    def forward(self, x):
      h = x - 0.5
      for i, (k, b) in enumerate(kernels):
        h = f.relu(f.conv2d(h, k, b, padding=1))
        if i % 2 == 1:
          h = f.max_pool2d(h, 2)
      h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
      return h @ dense[0] + dense[1]

  return VGG().eval()


ARCHS = {
    "lax-cnn": (lax_cnn_init, lax_cnn_apply, torch_lax_cnn),
    "vgg": (vgg_init, vgg_apply, torch_vgg),
}


def trained(arch, path, x, y, epochs):
  """PGD-AT weights of ``arch``, trained once and cached in ``path``."""
  if os.path.exists(path):
    return dict(np.load(path))
  init, apply, _ = ARCHS[arch]
  t0 = time.time()
  params = pgd_train(x, y, key=jax.random.key(0), epochs=epochs, apply=apply,
                     params=init(jax.random.key(0)), steps=3, ramp_epochs=2)
  np.savez(path, **params)
  print(f"trained {arch} with PGD-3 AT for {epochs} epochs in {time.time() - t0:.0f} s "
        f"(cached in {path})", flush=True)
  return params


class StageClock:
  """A ``log`` callback that keeps the lines and reads, from the "robust
  accuracy after X ... (total time T s)" lines both libraries print, the
  seconds spent per stage."""

  def __init__(self, echo=False):
    self.lines, self.totals, self.echo = [], {}, echo

  def __call__(self, line):
    self.lines.append(line)
    if self.echo:
      print("    " + line, flush=True)
    m = re.search(r"robust accuracy after (\S+?): .*total time ([0-9.]+) s", line)
    if m:
      self.totals[m.group(1).upper()] = float(m.group(2))

  def per_stage(self):
    out, last = {}, 0.0
    for name in STAGES:
      if name in self.totals:
        out[name], last = self.totals[name] - last, self.totals[name]
    return out


def jaxdef_call(logits_fn, x, y, echo):
  clock = StageClock(echo)
  t0 = time.perf_counter()
  x_adv = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0), eps=EPS, log=clock)
  x_adv.block_until_ready()
  seconds = time.perf_counter() - t0
  robust = np.argmax(np.asarray(logits_fn(x_adv)), -1) == y
  return seconds, robust, clock


def row(name, seconds, robust, clock):
  stages = clock.per_stage()
  cells = " | ".join(f"{stages[s]:.1f}" if s in stages else "-" for s in STAGES)
  return f"| {name} | {seconds:.1f} | {cells} | {int(robust.sum())} ({100 * robust.mean():.1f}%) |"


def bench_arch(arch, args, data):
  x_train, y_train, x_test, y_test = data
  _, apply, to_torch = ARCHS[arch]
  params = trained(arch, os.path.join(args.weights_dir, f"jaxdef_bench_aa_{arch}.npz"),
                   x_train, y_train, args.epochs)
  x, y = x_test[:args.n], y_test[:args.n]
  logits_fn = functools.partial(apply, jax.tree.map(jnp.asarray, params))
  clean = float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y))
  print(f"\n## {arch}: clean accuracy {100 * clean:.1f}% on {len(x)} images", flush=True)
  rows, results = [], {}
  first = jaxdef_call(logits_fn, x, y, args.verbose)
  rows.append(row("jaxdef, first call (compiles)", *first))
  results["first"] = first
  if not args.skip_second:
    second = jaxdef_call(logits_fn, x, y, args.verbose)
    rows.append(row("jaxdef, second call", *second))
    results["second"] = second
  reference = None
  if not args.skip_reference:
    clock = StageClock(args.verbose)
    seconds, robust = pyautoattack_call(to_torch(params), x, y, log=clock)
    reference = (seconds, robust, clock)
    rows.append(row("pyautoattack 0.2.0", *reference))
  header = ["| call | seconds | " + " | ".join(STAGES) + " | robust |",
            "|---" * (len(STAGES) + 3) + "|"]
  print("\n".join(header + rows), flush=True)
  if reference is not None:
    diff = int(first[1].sum()) - int(reference[1].sum())
    print(f"{arch}: first call {reference[0] / first[0]:.2f}x pyautoattack's speed"
          + (f", second call {reference[0] / results['second'][0]:.2f}x"
             if "second" in results else "")
          + f"; robust examples {int(first[1].sum())} vs {int(reference[1].sum())} "
          f"({diff:+d}): {'SAME within 1 example' if abs(diff) <= 1 else 'DIFFERENT'} "
          f"(disagree on {int(np.sum(first[1] != reference[1]))} images)", flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="lax-cnn,vgg", help="comma-separated: lax-cnn, vgg")
  parser.add_argument("--n", type=int, default=250, help="test images attacked")
  parser.add_argument("--epochs", type=int, default=4, help="PGD-AT epochs of each network")
  parser.add_argument("--npz", default=None, help="CIFAR-10 subset (default data/ of the checkout)")
  parser.add_argument("--weights-dir", default="/tmp")
  parser.add_argument("--skip-reference", action="store_true")
  parser.add_argument("--skip-second", action="store_true")
  parser.add_argument("--verbose", action="store_true", help="echo both libraries' lines")
  args = parser.parse_args()

  try:
    import torch
    versions = f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
  except ImportError:
    versions, args.skip_reference = "torch not installed: no reference", True
  data = twin.load("cifar", args.npz)
  print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()} at start; "
        f"jax {jax.__version__}, {versions}, Python {sys.version.split()[0]}")
  print(f"AutoAttack standard, L-inf 8/255, first {args.n} CIFAR-subset test images; "
        f"stage columns in seconds", flush=True)
  for arch in args.arch.split(","):
    bench_arch(arch, args, data)
  print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
