"""FGSM-RS and N-FGSM against PGD-10 AT at equal wall time, on a CIFAR-10 ``.npz``.

``python -m benchmarks.compare_fast_at --data PATH`` (an ``.npz`` with
``x_train, y_train, x_test, y_test``; nothing is downloaded) trains the same
model three times with ``jaxdef train`` and evaluates each run with
``jaxdef eval`` (clean, PGD-20, AutoAttack standard at L-inf 8/255 on the
whole test split). It prints a Markdown table and one JSON line per method.

**Equal wall time, on a loaded machine.** The three train steps are first
compiled and timed in this process, called in turn round after round
(:func:`benchmarks.bench_fast_at.bench_model`), so that a change in the
machine's load reaches all three alike and their ratio holds even when
their absolute times do not. PGD-10 AT then trains ``--pgd-epochs`` E
epochs and each single-step method ``round(E x t_PGD10 / t_method)``
epochs (:func:`epoch_budget`): the same budget of step time. The wall times
of the three trainings are reported as measured; they are not the rule.

**Catastrophic overfitting** is checked as Wong et al. (2020) check it
(``CIFAR10/train_fgsm.py --early-stop`` of locuslab/fast_adversarial): after
every epoch, PGD-5 of step 2/255 from a uniform start on one batch of
training images; the run has overfit at the first epoch whose accuracy falls
more than 20 points below the previous epoch's (:func:`overfit_epoch`).
Here the batch is fixed (the first ``--check-examples`` training images,
not augmented), where the reference takes each epoch's first shuffled,
augmented batch. The check runs inside training as its per-epoch
evaluation: the script writes a copy of the data whose test split is that
batch, trains on the copy and evaluates on the original file (``jaxdef
eval --config.data.path``).

Every training and evaluation runs under ``nice -n --nice`` (other jobs on
the machine stay responsive). The trainings run one at a time; the
evaluations then run ``--eval-jobs`` at once. Logs and runs go to ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from benchmarks.bench_fast_at import METHODS, bench_model

LABELS = {"pgd10": "PGD-10 AT", "fgsm_rs": "FGSM-RS", "n_fgsm": "N-FGSM"}
BASE = "pgd10"
# Wong et al. 2020's check: PGD-5, step 2/255, a fall of more than 20 points.
CHECK_STEPS = 5
CHECK_STEP_SIZE = 2 / 255
CHECK_DROP = 0.2


def epoch_budget(base_epochs: int, step_seconds: Mapping[str, float],
                 base: str = BASE) -> dict[str, int]:
  """Epochs per method for the step-time budget of ``base_epochs`` epochs of ``base``.

  A method whose step takes ``t`` trains ``round(base_epochs x t_base / t)``
  epochs (at least 1); ``base`` itself trains ``base_epochs``.
  """
  if base_epochs < 1:
    raise ValueError(f"base_epochs must be >= 1, got {base_epochs}")
  t_base = step_seconds[base]
  return {m: max(1, int(round(base_epochs * t_base / t))) for m, t in step_seconds.items()}


def overfit_epoch(check_accs: Sequence[float], drop: float = CHECK_DROP) -> Optional[int]:
  """The first epoch (1-based) whose check accuracy is more than ``drop`` below
  the previous epoch's (the first epoch is compared with 0), or None.

  Wong et al. 2020 stop there and keep the previous epoch's weights.
  """
  previous = 0.0
  for epoch, acc in enumerate(check_accs, start=1):
    if acc - previous < -drop:
      return epoch
    previous = acc
  return None


def write_check_copy(source: str, dest: str, check_examples: int, max_train: int) -> dict:
  """Writes ``dest``: ``source``'s training split (its first ``max_train`` images;
  0 = all) with its first ``check_examples`` training images as the test split."""
  with np.load(source, allow_pickle=False) as d:
    x, y = d["x_train"], d["y_train"]
    n_test = len(d["y_test"])
  if max_train:
    x, y = x[:max_train], y[:max_train]
  np.savez(dest, x_train=x, y_train=y, x_test=x[:check_examples], y_test=y[:check_examples])
  return {"train": len(y), "check": min(check_examples, len(y)), "test": n_test}


def _value(v: Any) -> str:
  return repr(float(v)) if isinstance(v, float) else str(v)


def train_argv(method: str, epochs: int, args: argparse.Namespace, data: str,
               workdir: str) -> list[str]:
  """``jaxdef train`` on the CIFAR-subset config with ``method``'s attack,
  ``epochs`` epochs and the training-batch check as the per-epoch evaluation."""
  fields = {
      "seed": args.seed, "data.path": data, "model.kwargs.width": args.width,
      "train.epochs": epochs, "train.batch_size": args.batch,
      "train.optimizer.lr": args.lr,
      # the config's shape (x0.1 at 6/8 and 7/8; eps ramp over the first 2/8)
      "train.optimizer.milestones": f"({0.75 * epochs!r},{0.875 * epochs!r})",
      "attack.warmup_epochs": args.attack_warmup * epochs,
      "train.eval_examples": 0, "train.eval_batch_size": args.check_examples,
      "train.eval_every_epochs": 1, "train.eval_pgd_steps": CHECK_STEPS,
      "train.eval_pgd_step_size": CHECK_STEP_SIZE, "train.eval_pgd_random_start": True,
      **{f"attack.{k}": v for k, v in METHODS[method].items()},
  }
  return (["jaxdef", "train", "--config", "subset_cifar10:at", "--workdir", workdir]
          + [f"--config.{k}={_value(v)}" for k, v in fields.items()])


def eval_argv(workdir: str, args: argparse.Namespace, n_test: int) -> list[str]:
  """``jaxdef eval`` of ``workdir`` on the original file: clean, PGD-20 and
  AutoAttack on ``n_test`` images; masking checks, attention and the attack
  unit test off (their cost is not what this compares)."""
  fields = {"data.path": os.path.abspath(args.data), "eval.attacks": args.eval_attacks,
            "eval.num_examples": n_test, "eval.batch_size": args.eval_batch,
            "eval.masking_checks": False, "eval.attention": False, "eval.unit_test": "off"}
  return (["jaxdef", "eval", "--workdir", workdir]
          + [f"--config.{k}={_value(v)}" for k, v in fields.items()])


def start_logged(argv: list[str], log_path: str, nice: int) -> tuple:
  """Starts ``python -m jaxdef ...`` (under ``nice -n``), output to ``log_path``."""
  cmd = (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", *argv]
  log = open(log_path, "w")
  log.write(" ".join(cmd) + "\n")
  log.flush()
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter()


def wait_logged(started: tuple, log_path: str) -> float:
  """Waits for a :func:`start_logged` process; its wall seconds, or exit with
  the log's tail if it failed."""
  proc, log, t0 = started
  rc = proc.wait()
  seconds = time.perf_counter() - t0
  log.close()
  if rc != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    sys.exit(f"exit status {rc}; {log_path} ends:\n{tail}")
  return seconds


def read_metrics(workdir: str) -> tuple[list[float], dict]:
  """The per-epoch check accuracies (fractions) and the run's summary."""
  checks, summary = {}, {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("split") == "test":
        checks[int(round(rec["epoch"]))] = rec["pgd_acc"]
      elif rec.get("split") == "summary":
        summary = rec
  return [checks[e] for e in sorted(checks)], summary


def read_results(workdir: str) -> dict:
  from jaxdef.evaluate.report import latest_results
  path = latest_results(workdir)
  if path is None:
    sys.exit(f"no finished evaluation in {workdir}")
  with open(path) as f:
    return json.load(f)


def pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(rows: Sequence[dict]) -> str:
  head = ("| method | epochs | step s (interleaved) | vs PGD-10 | train wall s (loaded) | "
          "clean | PGD-20 | AutoAttack | catastrophic overfitting (Wong rule) |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    co = "none" if r["overfit_epoch"] is None else f"at epoch {r['overfit_epoch']}"
    lines.append(f"| {LABELS[r['method']]} | {r['epochs']} | {r['step_s']:.2f} | "
                 f"{r['vs_pgd10']:.3f} | {r['train_wall_s']:.0f} | {pct(r['clean'])} | "
                 f"{pct(r['pgd20'])} | {pct(r['autoattack'])} | {co} |")
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, help="CIFAR-10 .npz (x_train, y_train, x_test, y_test)")
  p.add_argument("--workdir", default="/tmp/compare_fast_at", help="runs, logs, the data copy")
  p.add_argument("--pgd-epochs", type=int, default=4, help="E: PGD-10 AT's epochs")
  p.add_argument("--methods", default="pgd10,fgsm_rs,n_fgsm")
  p.add_argument("--width", type=float, default=0.5, help="small_cnn width multiplier")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--attack-warmup", type=float, default=0.25,
                 help="eps ramp-up, a fraction of each run's epochs")
  p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  p.add_argument("--check-examples", type=int, default=128, help="the check's training batch")
  p.add_argument("--max-train", type=int, default=0, help="first N training images (0: all)")
  p.add_argument("--eval-examples", type=int, default=0, help="test images (0: all)")
  p.add_argument("--eval-batch", type=int, default=339)
  p.add_argument("--eval-attacks", default="clean,pgd20,autoattack")
  p.add_argument("--eval-jobs", type=int, default=3, help="evaluations run at once")
  p.add_argument("--nice", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  args = parse_args(argv)
  methods = args.methods.split(",")
  if BASE not in methods or any(m not in METHODS for m in methods):
    sys.exit(f"--methods must include {BASE} and name only {', '.join(METHODS)}")
  os.makedirs(args.workdir, exist_ok=True)
  loads = [os.getloadavg()]
  copy = os.path.join(args.workdir, "train_with_check.npz")
  sizes = write_check_copy(args.data, copy, args.check_examples, args.max_train)
  n_test = args.eval_examples or sizes["test"]

  import jax
  timing = {r["method"]: r for r in bench_model("small_cnn", args.batch, args.rounds,
                                                model_kwargs={"width": args.width})}
  step_s = {m: timing[m]["step_ms"] / 1e3 for m in methods}
  epochs = epoch_budget(args.pgd_epochs, step_s)
  loads.append(os.getloadavg())
  print(f"interleaved step times ({args.rounds} rounds, batch {args.batch}, small_cnn width "
        f"{args.width}): " + ", ".join(f"{LABELS[m]} {step_s[m]:.3f} s" for m in methods),
        flush=True)
  print(f"rule: PGD-10 AT trains {args.pgd_epochs} epochs; a method whose step takes t trains "
        f"round({args.pgd_epochs} x t_PGD10 / t) epochs: "
        + ", ".join(f"{LABELS[m]} {epochs[m]}" for m in methods), flush=True)

  # Trainings one at a time (their wall times are reported); then the
  # evaluations, --eval-jobs at once (their times are not compared).
  log = {m: {k: os.path.join(args.workdir, f"{m}_{k}.log") for k in ("train", "eval")}
         for m in methods}
  train_s = {}
  for m in methods:
    train_s[m] = wait_logged(start_logged(train_argv(m, epochs[m], args, copy,
                                                     os.path.join(args.workdir, m)),
                                          log[m]["train"], args.nice), log[m]["train"])
    loads.append(os.getloadavg())
    print(f"{LABELS[m]}: trained {epochs[m]} epochs in {train_s[m]:.0f} s", flush=True)
  eval_s = {}
  for i in range(0, len(methods), args.eval_jobs):
    group = methods[i:i + args.eval_jobs]
    started = {m: start_logged(eval_argv(os.path.join(args.workdir, m), args, n_test),
                               log[m]["eval"], args.nice) for m in group}
    for m in group:
      eval_s[m] = wait_logged(started[m], log[m]["eval"])
    loads.append(os.getloadavg())

  rows = []
  for m in methods:
    wd = os.path.join(args.workdir, m)
    checks, summary = read_metrics(wd)
    res = read_results(wd)
    attacks = res.get("attacks", {})
    row = {"method": m, "epochs": epochs[m], "step_s": step_s[m],
           "vs_pgd10": step_s[m] / step_s[BASE], "budget_epochs_pgd10":
           epochs[m] * step_s[m] / step_s[BASE],
           "train_wall_s": train_s[m], "train_loop_s": summary.get("train_seconds"),
           "eval_wall_s": eval_s[m], "clean": res.get("clean"), "pgd20": attacks.get("pgd20"),
           "autoattack": attacks.get("autoattack"), "eval_examples": n_test,
           "check_pgd5_per_epoch": [round(a, 4) for a in checks],
           "overfit_epoch": overfit_epoch(checks)}
    rows.append(row)
    print(json.dumps(row), flush=True)

  print(markdown_table(rows))
  flat = [x for load in loads for x in load]
  print(json.dumps({"summary": True, "data": os.path.abspath(args.data), **sizes,
                    "model": f"small_cnn width {args.width}", "pgd_epochs": args.pgd_epochs,
                    "load_avg_min": min(flat), "load_avg_max": max(flat),
                    "load_avgs_1_5_15": loads, "jax": jax.__version__,
                    "python": platform.python_version(), "cpus": os.cpu_count()}))
  return rows


if __name__ == "__main__":
  main()
