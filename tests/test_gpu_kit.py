"""The GPU kit (``benchmarks/gpu``) end to end on CPU at tiny sizes.

``run.sh all --smoke`` runs every part through the same code as on a GPU
(bench cases with the PyTorch twin, each remedy as its own case, profiler
traces, the recipes' models: a SiLU WRN with TRADES, ResNet-50 with FGSM-RS
beside torchvision's, a rematerialised WRN at the largest batch that fits; a
launch.py-trained model attacked by jaxdef's AutoAttack and by pyautoattack,
two subset variants trained and evaluated by launch.py) on a made-up 64-image
set, so the kit cannot rot between GPU runs. One run (about 8 minutes on 2
loaded cores) is shared by the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the kit compares with PyTorch (the test extra)")
pytest.importorskip("pyautoattack", reason="the kit compares with pyautoattack (the test extra)")

ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255


def run_kit(part: str, out: Path, work: Path, cache: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "KIT_NO_INSTALL": "1", "PYTHON": sys.executable, "OUT": str(out),
         "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache)}
  return subprocess.run(["bash", "benchmarks/gpu/run.sh", part, "--smoke", "--work", str(work),
                         "--budget_s", "3000"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1800)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("kit")
  proc = run_kit("all", tmp / "out", tmp / "work", tmp / "cache")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = json.loads((tmp / "out" / "kit.json").read_text())
  return tmp, records


def part(records, name):
  return [r for r in records if r["part"] == name]


def test_every_part_ran_without_error(kit):
  tmp, records = kit
  assert not [r for r in records if "error" in r or "skipped" in r]
  assert {r["part"] for r in records} == {"environment", "throughput", "models", "extras",
                                          "streamed", "autoattack", "subset_table", "imported"}
  env = part(records, "environment")[0]
  assert env["backend"] == "cpu" and "jax" in env["versions"]
  md = (tmp / "out" / "kit.md").read_text()
  for heading in ("### Throughput, anchors and remedies", "### Throughput of the recipes' models",
                  "### AutoAttack standard", "### ResNet-18 on the CIFAR-10",
                  "### AutoAttack standard (L-inf 8/255) on imported PyTorch models"):
    assert heading in md
  assert {"kit.json", "kit.md", "log.txt", "logs.tgz", "trace_small_cas.tgz"} <= {
      p.name for p in (tmp / "out").iterdir()}


def test_throughput_cases_carry_figures_and_the_torch_ratio(kit):
  from benchmarks.gpu.kit import SMOKE_CASES
  _, records = kit
  cases = [r for r in part(records, "throughput") if "images_per_s" in r]
  assert {r["case"] for r in cases} == set(SMOKE_CASES)
  for r in cases:
    assert r["images_per_s"] > 0 and r["flops_per_example"] > 0
    assert "python -m benchmarks.bench " in r["command"]
    if "torch_modes" in r:
      assert r["ratio"] == pytest.approx(r["images_per_s"] / r["torch_images_per_s"])
      assert r["torch_best_mode"] in r["torch_modes"]
  by_case = {r["case"]: r for r in cases if r["kind"] == "train"}
  assert by_case["small_cast"]["cast_params_once"] and "--cast_params_once" in (
      by_case["small_cast"]["command"])
  assert not by_case["small"]["cast_params_once"]
  # XLA command buffers: the flags are for GPUs; this CPU run is left as it is.
  cmdbuf = by_case["small_cmdbuf"]
  assert cmdbuf["command_buffer_flags"] == "" and cmdbuf["command_buffer_types"] == []
  assert "xla_gpu" not in cmdbuf["xla_flags"]
  # 'best': eager and the fastest compiled mode measured before (none here).
  assert set(by_case["small_best"]["torch_modes"]) == {"eager"}
  # One FLOP count per model and attack, reused by the cases after it.
  assert by_case["small_best"]["flops_source"] == "given"
  assert by_case["small_best"]["flops_per_example"] == by_case["small_cast"]["flops_per_example"]


def test_models_cases_cover_the_recipes_models(kit):
  from benchmarks.gpu.kit import SMOKE_MODEL_CASES
  _, records = kit
  cases = {r["case"]: r for r in part(records, "models") if "images_per_s" in r}
  assert set(cases) == set(SMOKE_MODEL_CASES)
  for r in cases.values():
    assert r["images_per_s"] > 0 and r["flops_per_example"] > 0 and r["peak_memory_bytes"] > 0
  trades = cases["tiny_wrn_silu_trades"]
  assert trades["objective"] == "trades" and trades["model"] == "dm_wide_resnet"
  assert "torch_modes" not in trades  # no PyTorch twin of TRADES
  r50 = cases["tiny_r50_fgsm_rs"]
  assert (r50["model"], r50["steps"], r50["image_shape"]) == ("resnet50", 1, [64, 64, 3])
  assert r50["step_size"] == pytest.approx(1.25 * r50["eps"])
  assert r50["ratio"] == pytest.approx(r50["images_per_s"] / r50["torch_images_per_s"])
  fit = cases["tiny_wrn_remat_fit"]
  assert fit["batch"] == 16 and fit["batches_out_of_memory"] == []  # the largest fits on CPU
  assert fit["model_kwargs"]["remat"] is True
  assert fit["flops_source"] != "compiled"  # the plain model's FLOPs, not recomputation

def test_the_streamed_case_times_the_step_on_streamed_and_synthetic_batches(kit):
  tmp, records = kit
  rows = [r for r in part(records, "streamed") if "ratio" in r]
  assert [r["workers"] for r in rows] == [0, 1]  # in process, then a worker process
  for r in rows:
    assert r["streamed_images_per_s"] > 0 and r["synthetic_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["streamed_images_per_s"] / r["synthetic_images_per_s"])
  assert "### The train step fed by the streamed source" in (tmp / "out" / "kit.md").read_text()


def test_profiler_trace_is_packed(kit):
  tmp, records = kit
  [trace] = [r for r in part(records, "throughput") if "trace" in r]
  assert trace["trace"] == "trace_small_cas.tgz"
  with tarfile.open(tmp / "out" / "trace_small_cas.tgz") as tar:
    assert any(name.endswith(".xplane.pb") for name in tar.getnames())


def test_autoattack_both_frameworks_attack_the_same_weights(kit):
  _, records = kit
  [r] = [r for r in part(records, "autoattack") if "n" in r]
  # The twin holds the same weights: the same clean predictions.
  assert r["jaxdef_clean_acc"] == r["pyautoattack_clean_acc"]
  assert r["jaxdef_max_linf"] <= EPS + 1e-6
  assert 0 <= r["jaxdef_robust_acc"] <= r["jaxdef_clean_acc"]
  assert 0 <= r["pyautoattack_robust_acc"] <= r["pyautoattack_clean_acc"]
  assert r["speedup"] == pytest.approx(r["pyautoattack_s"] / r["jaxdef_s"])


def test_imported_models_are_attacked_by_both_libraries(kit):
  """The imported part: a RobustBench WRN briefly trained in PyTorch,
  imported, its logits those of the original, and AutoAttack's robust counts
  from jaxdef and pyautoattack on the same images."""
  _, records = kit
  [r] = [r for r in part(records, "imported") if "n" in r]
  assert r["arch"] == "wrn-10-1" and r["n"] == 4
  assert r["logit_gap"] < 1e-4
  assert r["clean"]["jaxdef"] == r["clean"]["pyautoattack"]
  for side in ("jaxdef", "pyautoattack"):
    assert 0 <= r[f"{side}_robust"] <= r["clean"][side]
  assert abs(r["jaxdef_robust"] - r["pyautoattack_robust"]) <= r["robust_on_one_side_only"]
  assert r["speedup"] == pytest.approx(r["pyautoattack_s"] / r["jaxdef_s"])


def test_subset_variants_are_trained_and_evaluated_by_the_suite(kit):
  _, records = kit
  rows = [r for r in part(records, "subset_table") if "variant" in r]
  assert [r["variant"] for r in rows] == ["at", "at_cas"]
  for r in rows:
    assert r["finished"], r
    res = r["results"]
    assert set(res["attacks"]) >= {"pgd20", "autoattack"}
    if r["variant"] == "at_cas":  # aux heads: the joint attack runs too
      assert "joint-pgd20" in res["attacks"]
    assert res["ensemble"] <= min(res["attacks"].values()) <= res["clean"] <= 1
    assert r["summary"]["epochs"] == 1 and r["curve"]


def test_subset_rerun_reuses_finished_runs(kit):
  """A second call (the GPU rerun) repeats nothing that finished."""
  tmp, _ = kit
  work = tmp / "work"
  before = {v: (work / "subset" / v / "metrics.jsonl").read_text() for v in ("at", "at_cas")}
  proc = run_kit("subset_table", tmp / "out2", work, tmp / "cache")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = [r for r in json.loads((tmp / "out2" / "kit.json").read_text())
          if r["part"] == "subset_table" and "variant" in r]
  assert all(r["finished"] for r in rows)
  for v, text in before.items():
    assert (work / "subset" / v / "metrics.jsonl").read_text() == text


def test_a_second_call_goes_on_where_the_first_stopped(kit):
  """What a call finished is kept with --work: the next call skips it."""
  tmp, _ = kit
  proc = run_kit("throughput", tmp / "out3", tmp / "work", tmp / "cache")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [r for r in json.loads((tmp / "out3" / "kit.json").read_text())
             if r["part"] == "throughput" and ("case" in r or "trace_case" in r)]
  assert records and all(r.get("skipped", "").startswith("done in an earlier call")
                         for r in records)
