"""What recording the indicators of attack failure costs: PGD-20 with and without
its trace, and APGD-CE with and without recording its indicators, compiled, on
the half-width small CNN at CIFAR size (random weights).

    python -m benchmarks.bench_indicators [--batch 256] [--repeats 5] [--apgd-steps 50]

Prints the median seconds per call of each (timed alternately) and the ratio. PGD's trace adds one
forward pass per step (whether the iterate fools the model) and a (steps + 1,
N) loss array to the loop's carry; APGD already keeps its loss history and
whether an iterate fooled the model, so recording adds two reductions of each
input gradient (zero everywhere, finite) and the indicators at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxdef import attacks
from jaxdef.attacks.apgd import apgd_update
from jaxdef.attacks.common import attacked_model, start_from_clean
from jaxdef.models import create_model


def paired(plain, recording, *args, repeats: int) -> tuple[float, float]:
  """Median seconds per call of two compiled functions, timed alternately (so
  that a drift in the machine's speed falls on both alike)."""
  jax.block_until_ready(plain(*args))            # compile
  jax.block_until_ready(recording(*args))
  times: tuple[list, list] = ([], [])
  for _ in range(repeats):
    for fn, out in zip((plain, recording), times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(time.perf_counter() - t0)
  return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--apgd-steps", type=int, default=50)
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
  t_plain, t_traced = paired(plain, traced, x, y, repeats=args.repeats)
  print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}); batch {args.batch}, PGD-20")
  print(f"PGD-20 plain:  {t_plain:.3f} s per call (median of {args.repeats})")
  print(f"PGD-20 traced: {t_traced:.3f} s per call ({t_traced / t_plain:.2f}x)")
  model_fn = attacked_model(logits_fn, False)

  def apgd(x, y, record):
    best = start_from_clean(model_fn, x, y, jax.random.key(3))
    return apgd_update(best, model_fn, x, y, key=jax.random.key(2), eps=8 / 255,
                       steps=args.apgd_steps, record=record)

  a_plain, a_rec = paired(jax.jit(lambda x, y: apgd(x, y, False)),
                          jax.jit(lambda x, y: apgd(x, y, True)), x, y, repeats=args.repeats)
  print(f"APGD-CE-{args.apgd_steps} plain:     {a_plain:.3f} s per call "
        f"(median of {args.repeats})")
  print(f"APGD-CE-{args.apgd_steps} recording: {a_rec:.3f} s per call "
        f"({a_rec / a_plain:.2f}x)")


if __name__ == "__main__":
  main()
