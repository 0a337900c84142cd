"""The evaluation's outputs: the Markdown table, ``results.json`` / ``results.md``
and the eps-curve picture."""

from __future__ import annotations

import json
import os
from typing import Sequence


# Per-attack rates a results table may carry beside the accuracy: (results key, header).
RATE_COLUMNS = (("defense_success", "defense success"),
                ("oracle_success", "oracle success (reads the clean image)"))


def results_table(results: dict) -> str:
  """Markdown table of clean, per-attack and worst-case robust accuracy.

  With a defended pipeline (``defense_success`` in the results) a column
  gives, per attack, the share of the examples that fooled the bare
  classifier which the pipeline classifies correctly; with a paper's oracle
  evaluation (``oracle_success``, NIP) another gives the share the oracle
  restores, with the number of examples it is a share of.
  """
  pct = lambda a: f"{100 * a:.2f}%"
  columns = [(key, header) for key, header in RATE_COLUMNS if results.get(key)]
  counts = results.get("oracle_attacked", {})

  def cell(key: str, name: str) -> str:
    if name not in results[key]:
      return " |"
    n = f" of {counts[name]}" if key == "oracle_success" and name in counts else ""
    return f" {pct(results[key][name])}{n} |"

  extra = lambda name: "".join(cell(key, name) for key, _ in columns)
  head = "| attack | accuracy | seconds |" + "".join(f" {h} |" for _, h in columns)
  lines = [f"{results['num_examples']} test examples, {results['norm']} eps = "
           f"{results['eps']:.5g}", "", head, "|---|---|---|" + "---|" * len(columns),
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
    for c in checks.get("evidence", {}).get("checks", ()):
      low, high = c["interval"]
      lines.append(f"- {c['check']}: {100 * c['excess']:+.1f} points (95% interval "
                   f"{100 * low:.1f}-{100 * high:.1f}, {c['examples']} examples; flagged above "
                   f"{100 * c['tolerance']:.1f}): {'FAILED' if c['failed'] else 'passed'}")
  if "oracle_success" in results:
    lines += ["", "The oracle column is the paper's own evaluation: it reads each "
              "adversarial example's clean image, so it is not a defense."]
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
