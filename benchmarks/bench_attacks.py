"""Attack speed: seconds per 1000 examples, jaxdef vs the PyTorch references, same model.

PGD-20 (jaxdef vs torchattacks.PGD) and AutoAttack standard at full budget
(jaxdef vs pyautoattack), on the twin CNN of compare_torch_attacks.py trained
briefly on the CIFAR-10 subset, on this machine's CPU. jaxdef's time is the
steady state of the jitted attack; its one-time compilation is printed apart.

  pip install torch==2.13.0 torchattacks==3.5.1 pyautoattack==0.2.0
  python benchmarks/bench_attacks.py --n 500
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import compare_torch_attacks as twin  # noqa: E402


def _jax_seconds(name, params, x, y, budget, chunks):
  logits_fn = functools.partial(twin.cnn_apply, params)
  run = twin.jax_attack_fn(name, logits_fn, chunks=chunks, **budget)
  xb, yb, key = jnp.asarray(x), jnp.asarray(y), jax.random.key(0)
  t0 = time.perf_counter()
  run(xb, yb, key).block_until_ready()
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  x_adv = run(xb, yb, jax.random.key(1)).block_until_ready()
  steady = time.perf_counter() - t0
  correct = (jnp.argmax(logits_fn(xb), -1) == yb) & (jnp.argmax(logits_fn(x_adv), -1) == yb)
  return steady, first - steady, float(correct.mean())


def _torch_seconds(name, params, x, y, budget):
  import torch
  model = twin.torch_twin(params)
  run = twin.torch_attack(name, model, **budget)
  xb = torch.tensor(np.transpose(x, (0, 3, 1, 2))).contiguous()
  yb = torch.tensor(y).long()
  t0 = time.perf_counter()
  x_adv = run(xb, yb)
  seconds = time.perf_counter() - t0
  with torch.no_grad():
    correct = (model(xb).argmax(1) == yb) & (model(x_adv).argmax(1) == yb)
  return seconds, float(correct.float().mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=500, help="examples (one batch)")
  parser.add_argument("--eps", type=float, default=1 / 255)
  parser.add_argument("--train-steps", type=int, default=1500)
  parser.add_argument("--chunks", type=int, default=5,
                      help="AutoAttack: batch chunks skipped once no robust example is left")
  parser.add_argument("--attacks", default="pgd,autoattack")
  args = parser.parse_args()

  import torch
  x_train, y_train, x_test, y_test = twin.load("cifar")
  params = twin.train_cnn(x_train, y_train, key=jax.random.key(0), steps=args.train_steps)
  x, y = x_test[:args.n], y_test[:args.n]
  print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"model: twin CNN (CIFAR-10 subset, 32x32x3); {len(x)} test images in one batch; "
        f"L-inf eps {args.eps:.5g}\n")
  print("| attack | jaxdef s/1000 ex | reference s/1000 ex | reference / jaxdef | "
        "jaxdef compile s | robust acc jaxdef / reference |")
  print("|---|---|---|---|---|---|")
  per_k = 1000.0 / len(x)
  for name in args.attacks.split(","):
    budget = dict(eps=args.eps, norm="linf", steps=20 if name == "pgd" else 100, queries=5000)
    ours, compile_s, acc_ours = _jax_seconds(name, params, x, y, budget, args.chunks)
    theirs, acc_theirs = _torch_seconds(name, params, x, y, budget)
    label = {"pgd": "PGD-20 (torchattacks.PGD)",
             "autoattack": "AutoAttack standard (pyautoattack)"}.get(name, name)
    print(f"| {label} | {ours * per_k:.1f} | {theirs * per_k:.1f} | {theirs / ours:.2f}x "
          f"| {compile_s:.1f} | {100 * acc_ours:.1f}% / {100 * acc_theirs:.1f}% |", flush=True)


if __name__ == "__main__":
  main()
