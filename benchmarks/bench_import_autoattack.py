"""AutoAttack on an imported RobustBench model: jaxdef vs pyautoattack on the PyTorch original.

RobustBench's ``WideResNet(depth, widen_factor)`` (or another ``--arch``
that jaxdef imports), with its own random initialisation or briefly trained
in PyTorch (``--train_steps``: Adam on the CIFAR subset's training images),
in eval mode, is written as a .safetensors file, imported as a jaxdef run
(:func:`jaxdef.interop.import_run`) and restored (:func:`jaxdef.restore`).
Then AutoAttack standard (L-inf 8/255, full budget) on the first ``--n``
CIFAR-subset test images, in the same process:

* jaxdef ``attacks.autoattack(logits_fn, x, y, ...)``, first call
  (compilation included) and second call;
* pyautoattack 0.2.0 ``run_standard_evaluation`` on the PyTorch module.

Labels: the true ones (``--labels true``), or the PyTorch module's own
predictions (``--labels predicted``, the default without training: a random
network is right on about a tenth of the true labels, and AutoAttack attacks
only the images it classifies correctly). A random network gives one class
almost wherever it looks, so no attack breaks it and every stage runs its
whole budget on every image; a briefly trained one is broken within the
first stage, as a non-robust model is. Reported: the import time, the
largest logit difference, seconds and robust accuracy of each call, and on
how many images the two AutoAttacks disagree (robust in one, broken in the
other). The GPU kit's ``imported`` part calls :func:`compare` the same way.

  pip install torch==2.13.0 pyautoattack==0.2.0 && pip install --no-deps robustbench==1.1.1
  python benchmarks/bench_import_autoattack.py --arch wrn-28-10 --n 100 \\
      --train_steps 60 --labels true --npz data/cifar10_subset.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import compare_torch_attacks as twin  # noqa: E402
from benchmarks.bench_autoattack_reference import (EPS, batched,  # noqa: E402
                                                   pyautoattack_call, timing_table)
from benchmarks.torch_references import briefly_trained, torch_module  # noqa: E402
import jaxdef  # noqa: E402
from jaxdef import attacks  # noqa: E402
from jaxdef.interop import import_run  # noqa: E402

def robust_mask(logits, y):
  return np.argmax(np.asarray(logits), -1) == y


def jaxdef_autoattack(logits_fn, x, y, log=None, batch_size=None, stages=None):
  """(seconds, robust mask) of one call, compilation included on the first
  (``stages``: the first attacks of the standard version only, e.g.
  ``('apgd-ce', 'apgd-t')``; None: all four)."""
  t0 = time.perf_counter()
  x_adv = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0), eps=EPS, log=log,
                             batch_size=batch_size, attacks=stages)
  x_adv.block_until_ready()
  seconds = time.perf_counter() - t0
  return seconds, robust_mask(batched(logits_fn, x_adv, batch_size or len(x)), y)


def module_logits(module, x, device, batch):
  """The PyTorch module's logits on NHWC ``x``, in batches, as numpy."""
  import torch
  nchw = lambda a: torch.tensor(np.transpose(a, (0, 3, 1, 2))).to(device)
  with torch.no_grad():
    return batched(lambda a: module(nchw(a)).cpu(), x, batch)


def compare(module, arch, x, y, *, device="cpu", batch_size=None, log=None, second=True,
            stages=None):
  """Imports ``module`` (eval mode, on ``device``) as a jaxdef run and runs
  AutoAttack standard on ``(x, y)`` in both libraries (``y`` None: the
  module's predictions). Returns a dict: parameters, import seconds, the
  largest logit difference relative to the largest logit, clean accuracy in
  both, and per call (jaxdef first and second, pyautoattack) its seconds
  and robust mask. ``batch_size``: the most images one call takes at a time
  in both (None: each library's default, pyautoattack all at once);
  ``stages``: only these first attacks of the standard version in both."""
  import safetensors.torch
  batch = batch_size or len(x)
  torch_logits = module_logits(module, x, device, batch)
  y = np.argmax(torch_logits, -1).astype(np.int32) if y is None else y.astype(np.int32)
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "model.safetensors")
    safetensors.torch.save_file({k: v.detach().cpu().contiguous()
                                 for k, v in module.state_dict().items()}, weights)
    t0 = time.perf_counter()
    done = import_run(weights, arch, os.path.join(tmp, "run"))
    _, logits_fn = jaxdef.restore(os.path.join(tmp, "run"))
    import_s = time.perf_counter() - t0
  ours = batched(logits_fn, x, batch)
  out = {"parameters": done["parameters"], "import_s": import_s,
         "logit_gap": float(np.abs(ours - torch_logits).max() / np.abs(torch_logits).max()),
         "clean": {"jaxdef": robust_mask(ours, y), "pyautoattack": robust_mask(torch_logits, y)},
         "calls": []}
  for name in ("first call (compiles)", "second call")[:2 if second else 1]:
    seconds, robust = jaxdef_autoattack(logits_fn, x, y, log, batch_size, stages)
    out["calls"].append((f"jaxdef `attacks.autoattack`, {name}", seconds, robust))
  seconds, robust = pyautoattack_call(module, x, y, log=log, device=device,
                                      batch_size=batch_size, attacks=stages)
  out["calls"].append(("pyautoattack 0.2.0 on the PyTorch module", seconds, robust))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="wrn-28-10", help="a jaxdef import --arch name")
  parser.add_argument("--n", type=int, default=100, help="test images attacked")
  parser.add_argument("--npz", default=os.path.join(twin.ROOT, "data", "cifar10_subset.npz"))
  parser.add_argument("--labels", choices=("predicted", "true"), default="predicted")
  parser.add_argument("--train_steps", type=int, default=0,
                      help="Adam steps on the subset's training images before the import")
  parser.add_argument("--train_batch", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0, help="the PyTorch initialisation's seed")
  parser.add_argument("--stages", default="apgd-ce,apgd-t,fab-t,square",
                      help="the first attacks of the standard version to run, in order")
  parser.add_argument("--skip_second", action="store_true", help="no second jaxdef call")
  parser.add_argument("--quiet", action="store_true", help="no per-stage lines")
  args = parser.parse_args()

  import torch
  if not os.path.exists(args.npz):
    sys.exit(f"error: no CIFAR subset at {args.npz}; give --npz")
  x_train, y_train, x_test, y_test = twin.load("cifar", args.npz)
  x = x_test[:args.n]
  torch.manual_seed(args.seed)
  print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        flush=True)
  module = torch_module(args.arch).eval()
  t0 = time.perf_counter()
  if args.train_steps:
    module = briefly_trained(module, x_train, y_train, steps=args.train_steps,
                             batch=args.train_batch, seed=args.seed)
  train_s = time.perf_counter() - t0
  log = None if args.quiet else (lambda line: print("  " + line, flush=True))
  stages = tuple(args.stages.split(","))
  standard = ("apgd-ce", "apgd-t", "fab-t", "square")
  if stages != standard[:len(stages)]:
    sys.exit(f"error: --stages must be the first attacks of {','.join(standard)} in order")
  out = compare(module, args.arch, x, y_test[:args.n] if args.labels == "true" else None,
                log=log, second=not args.skip_second,
                stages=None if stages == standard else stages)
  trained = (f"{args.train_steps} Adam steps of {args.train_batch} in {train_s:.0f} s"
             if args.train_steps else "random init")
  print(f"model: {args.arch} ({out['parameters'] / 1e6:.2f}M parameters, {trained}), "
        f"{len(x)} CIFAR-subset test images, labels {args.labels}; clean accuracy "
        f"{100 * out['clean']['jaxdef'].mean():.1f}% (jaxdef) / "
        f"{100 * out['clean']['pyautoattack'].mean():.1f}% (PyTorch)")
  print(f"import + restore {out['import_s']:.1f} s; largest logit difference "
        f"{out['logit_gap']:.1e} of the largest logit; AutoAttack standard "
        f"({', '.join(stages)}), L-inf eps 8/255\n")
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")
  rows = out["calls"]
  print(timing_table([(name, seconds, robust.mean()) for name, seconds, robust in rows]))
  (_, first_s, ours), *_, (_, ref_s, theirs) = rows
  second = (f", second call {ref_s / rows[1][1]:.2f}x" if len(rows) == 3 else "")
  print(f"\nfirst call {ref_s / first_s:.2f}x pyautoattack's speed{second}; robust on one "
        f"side only: {int(np.sum(ours != theirs))} of {len(x)} images")


if __name__ == "__main__":
  main()
