"""``jaxdef eval``: a run directory in, its evaluation report out.

    results = evaluate_workdir("runs/x")                 # the run's own config
    results = evaluate_workdir("runs/x", config)         # eval/data overrides, checked

The run is loaded once (:func:`jaxdef.restored.load_run`: one read of
``config.json``, one model build, one checkpoint restore); the targets the
suite attacks, NIP's statistics and the attention report all use that
record.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from jaxdef import attacks, signals
from jaxdef.attacks.common import keyed
from jaxdef.build import DataMeta
from jaxdef.checkpoint import check_identity
from jaxdef.data import eval_data
from jaxdef.defenses import create_transform
from jaxdef.config import default_eval_config, resolve_eval_config
from jaxdef.evaluate.attacks import attack_names
from jaxdef.errors import ConfigError
from jaxdef.evaluate.attention import attention_report
from jaxdef.evaluate.binarization import failure_reason, unit_test
from jaxdef.evaluate.cost import evaluation_cost
from jaxdef.evaluate.masking import UNIT_TEST_KIND, headline, masking_checks
from jaxdef.evaluate.report import (eps_curve_png, eval_folder, provenance, record_evaluation,
                                    results_table, write_results)
from jaxdef.evaluate.suite import run_suite
from jaxdef.evaluate.target import LogitsFn, Target, as_target
from jaxdef.restored import Restored, load_run

Array = jax.Array


def evaluate_and_report(model: "Target | LogitsFn", x_test: np.ndarray, y_test: np.ndarray, *,
                        eval_config: ml_collections.ConfigDict, workdir: str, key: Array,
                        sharding=None, adaptive: Optional[Target] = None,
                        surrogate: Optional[Target] = None,
                        out: Optional[str] = None,
                        provenance: Optional[dict] = None,
                        stop: Optional[signals.StopFlag] = None) -> dict:
  """Suite + masking checks + attack unit test + printed table + results files +
  eps-curve PNG.

  The files go to ``out`` (default ``workdir/eval``); ``provenance``
  (:func:`jaxdef.evaluate.report.provenance`) is recorded in them. With an
  ``adaptive`` target (a defended pipeline attacked end to end) the masking
  checks run on it: it is the attack whose strength matters. A stop request
  (``stop``) ends the work at the next batch; what is finished is written,
  marked ``partial`` (see :func:`jaxdef.evaluate.run_suite`). The attack unit
  test (``eval.unit_test``, :mod:`jaxdef.evaluate.binarization`) runs on the
  same target as the checks; a failed check or unit test marks the headline
  unreliable.
  """
  results = run_suite(model, x_test, y_test, suite_config=eval_config, key=key,
                      sharding=sharding, adaptive=adaptive, surrogate=surrogate, stop=stop)
  if provenance:
    results["provenance"] = provenance
  out = out or os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  checked = adaptive if adaptive is not None else as_target(model)
  kinds, reasons = [], []
  if eval_config.masking_checks and "partial" not in results:
    try:
      failed, evidence = masking_checks(checked, x_test, y_test, results=results,
                                        suite_config=eval_config,
                                        key=jax.random.fold_in(key, 99), sharding=sharding,
                                        stop=stop)
    except signals.StopRequested as e:
      results["partial"] = {"stopped_by": str(e), "during": "masking checks", "not_run": []}
    else:
      results["masking_checks"] = {"failed": failed, "evidence": evidence}
      run_name = os.path.basename(os.path.normpath(workdir))
      eps_curve_png(os.path.join(out, "eps_curve.png"), evidence["curve_eps"],
                    evidence["curve_acc"], marked_eps=float(eval_config.eps),
                    title=f"{run_name}: {evidence['curve_attack']}, "
                          f"{evidence['num_examples']} examples")
      for f in failed:
        print(f"WARNING (gradient masking?): {f}")
      kinds += [c["kind"] for c in evidence["checks"] if c["failed"]]
      reasons += failed
  if "partial" not in results:
    try:
      # The attacks whose strength the headline rests on: those the masking checks judge.
      tested = unit_test(checked, x_test[:results["num_examples"]], suite_config=eval_config,
                         names=attack_names(eval_config, "adaptive_attacks"
                                            if adaptive is not None else "attacks"),
                         key=jax.random.fold_in(key, 98), stop=stop)
    except signals.StopRequested as e:
      results["partial"] = {"stopped_by": str(e), "during": "attack unit test", "not_run": []}
    else:
      if tested is not None:
        results["unit_test"] = tested
        if tested["passed"] is False:
          kinds.append(UNIT_TEST_KIND)
          reasons.append(failure_reason(tested))
          print(f"WARNING (attack unit test): {reasons[-1]}")
  if "masking_checks" in results or "unit_test" in results:
    main = as_target(model)
    results["headline"] = headline(
        results, kinds, reasons,
        transform=adaptive is not None or main.reference is not None,
        heads=main.joint_loss is not None,
        randomized=main.randomized or (adaptive is not None and adaptive.randomized))
  write_results(out, results)
  print(results_table(results))
  return results

from jaxdef.train.metrics import tensorboard_scalars, unfinished_run_warning


def run_targets(run: Restored, config: ml_collections.ConfigDict,
                eval_config: ml_collections.ConfigDict, data) -> tuple[Target, Optional[Target]]:
  """The targets ``--mode eval`` attacks for ``run``: (main, adaptive).

  * No transform: the restored model with its ``outputs`` (the attack unit
    test reads its penultimate features), and its defense's joint attack
    loss (``joint_loss``) when it has one.
  * ``eval.transform`` set: main = the pipeline scored, the bare classifier
    attacked (non-adaptive); adaptive = the pipeline attacked end to end
    (``eval.adaptive_backward``: BPDA or exact gradients; EOT over
    ``eval.eot_samples`` draws when the transform is randomized). A
    transform with a paper's oracle evaluation (NIP) gives main its
    ``oracle`` column (the attacks on the bare classifier are the ones the
    paper restored).

  ``config`` holds the transform's own section (e.g. ``nip``) and ``data``
  the run's :class:`jaxdef.data.EvalData`, whose training examples a
  transform may read (NIP's statistics).
  """
  name = eval_config.get("transform", "none")
  if name == "none":
    return Target(predict=run.logits, outputs=run.outputs,
                  joint_loss=run.defense.joint_attack_loss), None
  tt = create_transform(name, run=run, config=config, data=data)
  pipeline = attacks.defended_logits_fn(tt.classifier, tt.transform, backward="exact",
                                        randomized=tt.randomized)
  # The bare classifier takes (and ignores) the key when the pipeline does.
  bare = keyed(tt.classifier, False) if tt.randomized else tt.classifier
  backward = eval_config.get("adaptive_backward", "bpda")
  eot = int(eval_config.get("eot_samples", 1))
  main = Target(predict=pipeline, attack_view=bare, randomized=tt.randomized,
                eot_samples=eot, reference=tt.classifier, oracle=tt.oracle)
  adaptive = Target(predict=pipeline, randomized=tt.randomized, eot_samples=eot,
                    attack_view=attacks.defended_logits_fn(
                        tt.classifier, tt.transform, randomized=tt.randomized,
                        backward=backward),
                    reference=tt.classifier,
                    label=("bpda" if backward == "bpda" else "adaptive")
                    + ("+eot" if tt.randomized else ""))
  return main, adaptive


def surrogate_target(main: Target, eval_config: ml_collections.ConfigDict,
                     image_shape: tuple[int, ...]) -> Optional[Target]:
  """The transfer attacks' target: ``main`` scored, the run in
  ``eval.surrogate_workdir`` attacked (None when that field is empty)."""
  where = eval_config.get("surrogate_workdir", "")
  if not where or not eval_config.get("transfer_attacks", ""):
    return None
  other = load_run(where)
  if tuple(other.meta.image_shape) != tuple(image_shape):
    raise ConfigError(f"eval.surrogate_workdir={where!r} holds a model of images "
                      f"{tuple(other.meta.image_shape)}, this run's are {tuple(image_shape)}")
  view = keyed(other.logits, False) if main.randomized else other.logits
  return Target(predict=main.predict, attack_view=view, randomized=main.randomized,
                eot_samples=main.eot_samples, label="transfer")


def wants_attention(eval_config: ml_collections.ConfigDict) -> bool:
  """Whether ``jaxdef eval`` adds the Grad-CAM report: ``eval.attention``, and
  no test-time transform (Grad-CAM is of a classifier's tap point; a
  pipeline with one, e.g. PSSR's model nesting its classifier, has no map
  of its own)."""
  return bool(eval_config.get("attention", True)) and eval_config.get("transform",
                                                                      "none") == "none"


def evaluate_workdir(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """``jaxdef eval``: evaluates the run in ``workdir`` on its test split.

  Without ``config`` everything comes from the run's own ``config.json``.
  With one (the command line's), its ``eval`` and ``data`` sections are
  used (so ``--config.eval.num_examples=...`` or a moved ``data.path``
  apply), after checking in one line that its model, defense and data shape
  are the run's: a checkpoint is only evaluated as the model it is.

  SIGTERM / Ctrl-C stop it at the next batch: the finished attacks are
  written to the results folder marked ``partial`` (the caller exits with
  :func:`jaxdef.signals.exit_status`); a second signal ends the process at once.
  """
  with signals.stop_requests() as stop:
    return _evaluate(workdir, config, stop)


def _evaluate(workdir: str, config: Optional[ml_collections.ConfigDict],
              stop: signals.StopFlag) -> dict:
  run = load_run(workdir)
  print(f"evaluating {run.describe()}", flush=True)
  config = run.config if config is None else config
  eval_config = resolve_eval_config(config.get("eval", default_eval_config()),
                                    eps=config.attack.eps, norm=config.attack.norm)
  # Only the evaluated test images are read (an imported dataset's training
  # split stays on disk), cropped as the per-epoch evaluation crops them.
  data = eval_data(config.data, int(eval_config.num_examples))
  if config is not run.config:
    check_identity(run.config, run.meta.to_dict(), config,
                   DataMeta.from_dataset(data).to_dict(),
                   advice=f"evaluate {workdir!r} with its own config (omit --config)")
  unfinished = unfinished_run_warning(workdir)
  if unfinished:
    print(unfinished, flush=True)
  main, adaptive = run_targets(run, config, eval_config, data)
  prov = provenance(step=run.step, config=run.config, eval_config=eval_config)
  out = eval_folder(workdir, run.step, eval_config)
  print(f"results go to {out}", flush=True)
  surrogate = surrogate_target(main, eval_config, run.meta.image_shape)
  for line in evaluation_cost(eval_config, data.x_test, data.y_test, main=main,
                              adaptive=adaptive, surrogate=surrogate,
                              attention=wants_attention(eval_config)):
    print(line, flush=True)
  results = evaluate_and_report(main, data.x_test, data.y_test, eval_config=eval_config,
                                workdir=workdir, key=jax.random.key(int(eval_config.seed)),
                                adaptive=adaptive, out=out, provenance=prov, stop=stop,
                                surrogate=surrogate)
  if wants_attention(eval_config) and "partial" not in results and stop["signal"] is None:
    results["attention"] = attention_report(run, eval_config, data.x_test, data.y_test,
                                            out=out, provenance=prov)
  record_evaluation(workdir, out, {**prov, "partial": "partial" in results})
  if "partial" not in results:
    tensorboard_scalars(workdir, run.step, {
        f"eval/{name}": acc for name, acc in
        {"clean": results["clean"], **results["attacks"],
         "worst case": results["ensemble"]}.items()})
  return results
