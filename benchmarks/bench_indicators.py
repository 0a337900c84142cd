"""What recording the indicators of attack failure costs: PGD-20 with and without
its trace, compiled, on the half-width small CNN at CIFAR size (random weights).

    python -m benchmarks.bench_indicators [--batch 256] [--repeats 5]

Prints the median seconds per call of each and the ratio; the trace adds one
forward pass per step (whether the iterate fools the model) and a (steps + 1,
N) loss array to the loop's carry.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxdef import attacks
from jaxdef.models import create_model


def timed(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))               # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  model = create_model("small_cnn", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                       width=0.5)
  x = jax.random.uniform(jax.random.key(0), (args.batch, 32, 32, 3))
  variables = model.init(jax.random.key(1), x[:1])
  logits_fn = lambda z: model.apply(variables, z)["logits"]
  y = jnp.argmax(logits_fn(x), -1)
  budget = dict(key=jax.random.key(2), eps=8 / 255, step_size=2 / 255, steps=20)
  plain = jax.jit(lambda x, y: attacks.pgd(logits_fn, x, y, **budget))
  traced = jax.jit(lambda x, y: attacks.pgd(logits_fn, x, y, return_trace=True, **budget))
  t_plain = timed(plain, x, y, repeats=args.repeats)
  t_traced = timed(traced, x, y, repeats=args.repeats)
  print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}); batch {args.batch}, PGD-20")
  print(f"PGD-20 plain:  {t_plain:.3f} s per call (median of {args.repeats})")
  print(f"PGD-20 traced: {t_traced:.3f} s per call ({t_traced / t_plain:.2f}x)")


if __name__ == "__main__":
  main()
