"""The evaluation's outputs: the Markdown table, ``results.json`` / ``results.md``
and the eps-curve picture."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Optional, Sequence

from jaxdef.checkpoint import config_hash
from jaxdef.version import VERSION

INDEX = "index.jsonl"


# Per-attack rates a results table may carry beside the accuracy: (results key, header).
RATE_COLUMNS = (("defense_success", "defense success"),
                ("oracle_success", "oracle success (reads the clean image)"))


def results_table(results: dict) -> str:
  """Markdown table of clean, per-attack and worst-case robust accuracy.

  With a defended pipeline (``defense_success`` in the results) a column
  gives, per attack, the share of the examples that fooled the bare
  classifier which the pipeline classifies correctly; with a paper's oracle
  evaluation (``oracle_success``, NIP) another gives the share the oracle
  restores, with the number of examples it is a share of. An AutoAttack
  column is named with the version and EOT draws it ran
  (``autoattack_protocols``), e.g. 'autoattack (rand, EOT 20)'.
  """
  pct = lambda a: f"{100 * a:.2f}%"
  prov = results.get("provenance")
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
           f"{results['eps']:.5g}"
           + (f"; checkpoint step {prov['checkpoint_step']}, config {prov['config_hash']}, "
              f"eval config {prov['eval_config_hash']}, jaxdef {prov['jaxdef_version']}, "
              f"{prov['date']}" if prov else ""),
           "", head, "|---|---|---|" + "---|" * len(columns),
           f"| clean | {pct(results['clean'])} | {results['seconds'].get('clean', '')} |"
           + extra("clean")]
  protocols = results.get("autoattack_protocols", {})
  label = lambda col: protocols[col]["label"] if col in protocols else col
  for name, acc in results["attacks"].items():
    lines.append(f"| {label(name)} | {pct(acc)} | {results['seconds'].get(name, '')} |"
                 + extra(name))
  claim = results.get("headline")
  unreliable = " UNRELIABLE" if claim and not claim["reliable"] else ""
  lines.append(f"| worst case over attacks | {pct(results['ensemble'])}{unreliable} | |"
               + extra(""))
  staged = label(results.get("autoattack_stages_of", "autoattack"))
  for stage, acc in (results.get("autoattack_stages") or {}).items():
    lines.append(f"| {staged} {stage} | {pct(acc)} | |" + extra(""))
  partial = results.get("partial")
  if partial:
    lines += ["", f"PARTIAL: stopped by {partial['stopped_by']} during the {partial['during']}"
              + (f"; not run: {', '.join(partial['not_run'])}" if partial["not_run"] else "")
              + ". The worst case covers only the attacks above."]
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
  if results.get("indicators"):
    lines += ["", "Indicators of attack failure (examples still counted robust where the "
              "attack failed for the indicator's reason):"]
    lines += [f"- {col}: " + ", ".join(f"{name} {count} of {results['num_examples']}"
                                       for name, count in fired.items())
              for col, fired in results["indicators"].items()]
  if results.get("unit_test"):
    lines += ["", unit_test_line(results["unit_test"])]
  if results.get("draws"):
    lines += ["", "A randomized model, scored again under fresh draws of its randomness "
              "(the columns above use the first draw):"]
    lines += [f"- {col}: {pct(d['mean'])} +- {pct(d['std'])} over {d['draws']} draws"
              for col, d in results["draws"].items()]
  if claim and not claim["reliable"]:
    lines += ["", f"Headline {pct(claim['robust_accuracy'])} is UNRELIABLE: "
              f"{len(claim['reasons'])} check(s) failed (above). Run next:"]
    lines += [f"- {step}" for step in claim["next"]]
  if "oracle_success" in results:
    lines += ["", "The oracle column is the paper's own evaluation: it reads each "
              "adversarial example's clean image, so it is not a defense."]
  return "\n".join(lines)


def unit_test_line(record: dict[str, Any]) -> str:
  """One line of the table for ``results['unit_test']`` (:mod:`jaxdef.evaluate.binarization`)."""
  head = f"Attack unit test ({record['mode']}; binarization, Zimmermann et al. 2022)"
  if record.get("skipped"):
    return f"{head}: not run, {record['skipped']}."
  pct = lambda a: f"{100 * a:.1f}%"
  each = ", ".join(f"{name} {a['found']}" for name, a in record["attacks"].items())
  return (f"{head}: {'passed' if record['passed'] else 'FAILED'}: the attacks found "
          f"{record['found']} of {record['valid']} adversarial examples that exist by "
          f"construction ({pct(record['success_rate'])}; {each}; pass mark "
          f"{pct(record['threshold'])}), readout on the model's {record['features']}"
          + (f", {record['fit_failed']} examples left out (readout not fitted)"
             if record["fit_failed"] else "") + f", {record['seconds']} s.")


def eps_curve_png(path: str, eps_list: Sequence[float], accs: Sequence[float], *,
                  title: str = "robust accuracy vs eps",
                  marked_eps: Optional[float] = None) -> None:
  """Saves the robust-accuracy-vs-eps curve as a PNG (matplotlib, Agg backend);
  ``marked_eps`` (the evaluated threat model) gets a dashed line. A repeated
  eps is drawn once."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points = sorted(dict(zip(map(float, eps_list), accs)).items())
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([e for e, _ in points], [100 * a for _, a in points], marker="o")
  if marked_eps is not None:
    ax.axvline(marked_eps, color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"evaluated eps {marked_eps:.4g}", (marked_eps, 95), fontsize=7,
                xytext=(4, 0), textcoords="offset points", va="top")
  ax.set_xlabel("eps")
  ax.set_ylabel("robust accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def eval_config_hash(eval_config: Any) -> str:
  """8 hex digits of SHA-256 over the resolved eval config (sorted JSON)."""
  text = eval_config.to_json_best_effort(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def provenance(*, step: int, config: Any, eval_config: Any) -> dict[str, Any]:
  """What every result file records: the checkpoint step, the run's config hash
  (:func:`jaxdef.checkpoint.config_hash`), the eval config's hash, jaxdef's
  version and the date (UTC)."""
  return {"checkpoint_step": int(step), "config_hash": config_hash(config),
          "eval_config_hash": eval_config_hash(eval_config), "jaxdef_version": VERSION,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def eval_folder(workdir: str, step: int, eval_config: Any) -> str:
  """``workdir/eval/step_<step>_<eval config hash>``: one folder per evaluated
  checkpoint and eval config, so that no evaluation overwrites another's."""
  return os.path.join(workdir, "eval", f"step_{int(step)}_{eval_config_hash(eval_config)}")


def record_evaluation(workdir: str, folder: str, prov: dict[str, Any]) -> None:
  """Appends ``{folder, provenance}`` to ``workdir/eval/index.jsonl``."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", INDEX), "a") as f:
    f.write(json.dumps({"folder": os.path.relpath(folder, workdir), **prov}) + "\n")


def latest_results(workdir: str) -> Optional[str]:
  """The ``results.json`` of the newest finished (not partial) evaluation of
  ``workdir`` (None if none)."""
  index = os.path.join(workdir, "eval", INDEX)
  if not os.path.exists(index):
    return None
  with open(index) as f:
    entries = [json.loads(line) for line in f if line.strip()]
  for entry in reversed(entries):
    if entry.get("partial"):
      continue
    path = os.path.join(workdir, entry["folder"], "results.json")
    if os.path.exists(path):
      return path
  return None


def write_results(folder: str, results: dict) -> str:
  """Writes ``folder/results.json`` and ``results.md``; returns the folder."""
  os.makedirs(folder, exist_ok=True)
  public = {k: v for k, v in results.items() if k != "per_example"}
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump(public, f, indent=2, sort_keys=True)
  with open(os.path.join(folder, "results.md"), "w") as f:
    f.write(results_table(results) + "\n")
  return folder
