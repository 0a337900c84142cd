"""Single-step adversarial training against PGD-10 AT: ``python -m benchmarks.bench_fast_at``.

Times the train step that training runs (:func:`jaxdef.train.loop.jit_steps`
on synthetic uint8 images, as :mod:`benchmarks.bench` does) for three
training attacks on the same model and batch:

* PGD-10: 10 signed steps of 2/255 from a uniform start (Madry et al. 2018);
* FGSM-RS: one step of 1.25 eps from a uniform start, projected (Wong et al. 2020);
* N-FGSM: one step of eps from U(-2 eps, 2 eps), not projected (de Jorge et al. 2022);
* Free-8: each batch replayed 8 times, one forward-backward pass and one
  optimizer update per replay (Shafahi et al. 2019): its step makes 8 updates,
  so ``update_ms`` (step time / updates) is the figure to set against a
  PGD-10 step, and its FLOPs are XLA's count of one replay times 8.

``--methods`` may add ``pgd10_awp``: PGD-10 with Adversarial Weight
Perturbation (Wu et al. 2020; ``train.awp``, gamma 0.01, proxy lr 0.01 from the
first step), whose proxy adds one forward-backward pass per step;
``adam10``: the DeepMind training attack, 10 Adam steps
(``attack.step_rule='adam'``); ``pgd10_cutmix``: PGD-10 on CutMix batches with
the attack aimed at the mixed labels (``data.cutmix``).

Each step is compiled once, then the three are called in turn for
``--rounds`` rounds (one call each per round, waited for), so that a change
in the machine's load reaches all three alike; the median per method is
printed with its ratio to PGD-10 and XLA's FLOP count of the step (PGD loop
unrolled, lowered on this host). One JSON line per model and method::

  python -m benchmarks.bench_fast_at --model small_cnn,resnet18 --batch 32 --rounds 7
  python -m benchmarks.bench_fast_at --model small_cnn --methods pgd10,pgd10_awp
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional, Sequence

import jax

from benchmarks.bench import Prepared, bench_config, synthetic_meta, unrolled_flops

EPS = 8 / 255
# attack.* fields of each training attack (eps 8/255).
METHODS = {
    "pgd10": dict(steps=10, step_size=2 / 255, init="uniform"),
    "fgsm_rs": dict(steps=1, step_size=1.25 * EPS, init="uniform"),
    "n_fgsm": dict(steps=1, step_size=EPS, init="uniform", init_scale=2.0, project=False),
    "free8": dict(steps=1, step_size=EPS, free_replays=8),
    # The DeepMind training attack: 10 Adam steps (lr 0.1, 0.01 after step 5).
    "adam10": dict(steps=10, step_size=2 / 255, init="uniform", step_rule="adam"),
}
# Cases that are a METHODS attack plus other config fields:
# (attack, {config section: {field: value}}).
TRAIN_CASES = {
    "pgd10_awp": ("pgd10", {"train.awp": dict(gamma=0.01, proxy_lr=0.01, warmup_epochs=0.0)}),
    "pgd10_cutmix": ("pgd10", {"data": dict(cutmix=True)}),
}


def method_config(model: str, batch: int, method: str, model_kwargs: Optional[dict] = None):
  """The benchmark's CIFAR PGD-AT config with ``method``'s attack fields."""
  config = bench_config(model=model, defense="none", batch=batch, pgd_steps=10, eval_steps=1,
                        dtype="float32", augment="crop_flip", model_kwargs=model_kwargs)
  attack, sections = TRAIN_CASES.get(method, (method, {}))
  config.attack.update(METHODS[attack])
  for section, fields in sections.items():
    node = config
    for name in section.split("."):
      node = node[name]
    node.update(fields)
  return config


def bench_model(model: str, batch: int, rounds: int, model_kwargs: Optional[dict] = None,
                methods: Sequence[str] = tuple(METHODS)) -> list[dict[str, Any]]:
  """Compiles the train steps of ``methods`` (with 'pgd10') on ``model`` (built with
  ``model_kwargs``), times them in turn, returns one record per method."""
  meta = synthetic_meta((32, 32, 3), 10)
  compiled, states, args, flops, compile_s, updates = {}, {}, {}, {}, {}, {}
  for method in methods:
    config = method_config(model, batch, method, model_kwargs)
    prepared = Prepared(config, meta)
    args[method] = prepared.args("train")
    t0 = time.perf_counter()
    compiled[method] = prepared.train_step.lower(prepared.state, *args[method]).compile()
    compile_s[method] = time.perf_counter() - t0
    states[method] = prepared.state
    # XLA counts the loop of Free's replays once: times the updates per step.
    updates[method] = max(config.attack.get("free_replays", 0), 1)
    flops[method] = unrolled_flops(config, meta, "train")[0] * updates[method]
    states[method], _ = compiled[method](states[method], *args[method])  # warm-up
    jax.block_until_ready(states[method])
  times: dict[str, list[float]] = {m: [] for m in methods}
  for _ in range(rounds):
    for method in methods:
      t0 = time.perf_counter()
      states[method], metrics = compiled[method](states[method], *args[method])
      jax.block_until_ready(metrics)
      times[method].append(time.perf_counter() - t0)
  base = statistics.median(times["pgd10"])
  out = []
  for method in methods:
    seconds = statistics.median(times[method])
    out.append({"model": model, "method": method, "batch": batch, "rounds": rounds,
                "step_ms": round(seconds * 1e3, 2),
                "images_per_s": round(batch / seconds, 1),
                "vs_pgd10": round(seconds / base, 3), "updates": updates[method],
                "update_ms": round(seconds * 1e3 / updates[method], 2),
                "update_vs_pgd10": round(seconds / updates[method] / base, 3),
                "flops_per_example": flops[method] / batch,
                "flops_vs_pgd10": round(flops[method] / flops["pgd10"], 3),
                "compile_s": round(compile_s[method], 1),
                "backend": jax.default_backend(), "devices": jax.device_count()})
  return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="small_cnn,resnet18",
                 help="comma-separated models (registry names)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=7, help="timed calls per method")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, with pgd10: {', '.join([*METHODS, *TRAIN_CASES])}")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  records = []
  for model in args.model.split(","):
    for record in bench_model(model, args.batch, args.rounds,
                              methods=tuple(args.methods.split(","))):
      print(json.dumps(record), flush=True)
      records.append(record)
  return records


if __name__ == "__main__":
  main()
