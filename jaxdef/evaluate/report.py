"""The evaluation's outputs: the Markdown table, ``results.json`` / ``results.md``
and the eps-curve picture."""

from __future__ import annotations

import json
import os
from typing import Sequence


def results_table(results: dict) -> str:
  """Markdown table of clean, per-attack and worst-case robust accuracy.

  With a defended pipeline (``defense_success`` in the results) a column
  gives, per attack, the share of the examples that fooled the bare
  classifier which the pipeline classifies correctly.
  """
  pct = lambda a: f"{100 * a:.2f}%"
  success = results.get("defense_success")
  extra = lambda name: (f" {pct(success[name])} |" if name in success else " |") if success else ""
  head = "| attack | accuracy | seconds |" + (" defense success |" if success else "")
  lines = [f"{results['num_examples']} test examples, {results['norm']} eps = "
           f"{results['eps']:.5g}", "", head, "|---|---|---|" + ("---|" if success else ""),
           f"| clean | {pct(results['clean'])} | {results['seconds'].get('clean', '')} |"
           + extra("clean")]
  for name, acc in results["attacks"].items():
    lines.append(f"| {name} | {pct(acc)} | {results['seconds'].get(name, '')} |" + extra(name))
  lines.append(f"| worst case over attacks | {pct(results['ensemble'])} | |" + extra(""))
  for stage, acc in (results.get("autoattack_stages") or {}).items():
    lines.append(f"| autoattack {stage} | {pct(acc)} | |" + extra(""))
  checks = results.get("masking_checks")
  if checks is not None:
    lines.append("")
    lines.append("Gradient-masking checks: " + ("all passed" if not checks["failed"] else
                                                 f"{len(checks['failed'])} FAILED"))
    lines += [f"- WARNING: {f}" for f in checks["failed"]]
  return "\n".join(lines)


def eps_curve_png(path: str, eps_list: Sequence[float], accs: Sequence[float], *,
                  title: str = "robust accuracy vs eps") -> None:
  """Saves the robust-accuracy-vs-eps curve as a PNG (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(list(eps_list), [100 * a for a in accs], marker="o")
  ax.set_xlabel("eps")
  ax.set_ylabel("robust accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(workdir: str, results: dict) -> str:
  """Writes ``workdir/eval/results.json`` and ``results.md``; returns the folder."""
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  public = {k: v for k, v in results.items() if k != "per_example"}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(public, f, indent=2, sort_keys=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(results_table(results) + "\n")
  return out
