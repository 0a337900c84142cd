"""AutoAttack on an imported RobustBench model: jaxdef vs pyautoattack on the PyTorch original.

RobustBench's ``WideResNet(depth, widen_factor)`` (or another ``--arch``
that jaxdef imports) with its own random initialisation, in eval mode, is
written as a .safetensors file, imported as a jaxdef run
(:func:`jaxdef.interop.import_run`) and restored (:func:`jaxdef.restore`).
Then AutoAttack standard (L-inf 8/255, full budget) on the first ``--n``
CIFAR-subset test images, in the same process:

* jaxdef ``attacks.autoattack(logits_fn, x, y, ...)``, first call
  (compilation included) and second call;
* pyautoattack 0.2.0 ``run_standard_evaluation`` on the PyTorch module.

Labels are the PyTorch module's own predictions (``--labels predicted``, the
default): a random network is right on about a tenth of the true labels, and
AutoAttack attacks only the images it classifies correctly. Reported: the
import time, the largest logit difference, seconds and robust accuracy of
each call, and on how many images the two AutoAttacks disagree (robust in
one, broken in the other).

  pip install torch==2.13.0 pyautoattack==0.2.0 && pip install --no-deps robustbench==1.1.1
  python benchmarks/bench_import_autoattack.py --arch wrn-28-10 --n 100 \\
      --npz data/cifar10_subset.npz
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
from benchmarks.bench_autoattack_reference import (EPS, pyautoattack_call,  # noqa: E402
                                                   timing_table)
from benchmarks.torch_references import torch_module  # noqa: E402
import jaxdef  # noqa: E402
from jaxdef import attacks  # noqa: E402
from jaxdef.interop import import_run  # noqa: E402

def robust_mask(logits, y):
  return np.argmax(np.asarray(logits), -1) == y


def jaxdef_autoattack(logits_fn, x, y, log=None):
  """(seconds, robust mask) of one call, compilation included on the first."""
  t0 = time.perf_counter()
  x_adv = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0), eps=EPS, log=log)
  x_adv.block_until_ready()
  return time.perf_counter() - t0, robust_mask(logits_fn(x_adv), y)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="wrn-28-10", help="a jaxdef import --arch name")
  parser.add_argument("--n", type=int, default=100, help="test images attacked")
  parser.add_argument("--npz", default=os.path.join(twin.ROOT, "data", "cifar10_subset.npz"))
  parser.add_argument("--labels", choices=("predicted", "true"), default="predicted")
  parser.add_argument("--seed", type=int, default=0, help="the PyTorch initialisation's seed")
  parser.add_argument("--quiet", action="store_true", help="no per-stage lines")
  args = parser.parse_args()

  import safetensors.torch
  import torch
  if not os.path.exists(args.npz):
    sys.exit(f"error: no CIFAR subset at {args.npz}; give --npz")
  x = twin.load("cifar", args.npz)[2][:args.n]
  torch.manual_seed(args.seed)
  module = torch_module(args.arch).eval()
  with torch.no_grad():
    torch_logits = module(torch.tensor(np.transpose(x, (0, 3, 1, 2)))).numpy()
  y = (np.argmax(torch_logits, -1) if args.labels == "predicted"
       else twin.load("cifar", args.npz)[3][:args.n]).astype(np.int32)

  print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "model.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in module.state_dict().items()},
                                weights)
    t0 = time.perf_counter()
    done = import_run(weights, args.arch, os.path.join(tmp, "run"))
    _, logits_fn = jaxdef.restore(os.path.join(tmp, "run"))
    import_s = time.perf_counter() - t0
    ours = np.asarray(logits_fn(x))
    gap = np.abs(ours - torch_logits).max() / np.abs(torch_logits).max()
    print(f"model: {args.arch} ({done['parameters'] / 1e6:.2f}M parameters, random init), "
          f"{len(x)} CIFAR-subset test images, labels {args.labels}; clean accuracy "
          f"{100 * robust_mask(ours, y).mean():.1f}% (jaxdef) / "
          f"{100 * robust_mask(torch_logits, y).mean():.1f}% (PyTorch)")
    print(f"import + restore {import_s:.1f} s; largest logit difference {gap:.1e} of the "
          f"largest logit; AutoAttack standard, L-inf eps 8/255\n")
    rows = []
    log = None if args.quiet else (lambda line: print("  " + line, flush=True))
    for name in ("first call (compiles)", "second call"):
      seconds, robust = jaxdef_autoattack(logits_fn, x, y, log)
      rows.append((f"jaxdef `attacks.autoattack`, {name}", seconds, robust))
  ref_s, ref_robust = pyautoattack_call(module, x, y)
  rows.append(("pyautoattack 0.2.0 on the PyTorch module", ref_s, ref_robust))
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")
  print(timing_table([(name, seconds, robust.mean()) for name, seconds, robust in rows]))
  differ = int(np.sum(rows[0][2] != ref_robust))
  print(f"\nfirst call {ref_s / rows[0][1]:.2f}x pyautoattack's speed, second call "
        f"{ref_s / rows[1][1]:.2f}x; robust on one side only: {differ} of {len(x)} images")


if __name__ == "__main__":
  main()
