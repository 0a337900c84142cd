"""The evaluation's cost estimate (jaxdef.evaluate.cost): lines, total, advice, scaling,
and agreement with a measured tiny evaluation."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef import evaluate
from jaxdef.evaluate import cost
from jaxdef.evaluate.suite import column, suite_runs
from jaxdef.evaluate.target import Target
from jaxdef.models import create_model

# A made-up machine: a gradient pass costs five forwards, compiling one a second.
SPEED = cost.Speed(grad=1e-3, forward=2e-4, score=2e-4, chunk_grad=8e-4, chunk_forward=2e-4,
                   compile_s=1.0, classes=10)


def _model(x):
  return x.reshape(x.shape[0], -1)[:, :10]


def default_suite(**overrides):
  c = evaluate.default_eval_config(0.3, "linf")
  c.update(overrides)
  return c


def parts_of(cfg, target=Target(predict=_model), attention=True):
  return cost.plan(cfg, suite_runs(cfg, target), checked=target, adaptive=False,
                   attention=attention, classes=10)


def priced(cfg, n, parts=None):
  return cost.estimate(parts or parts_of(cfg), {"": SPEED}, n, batch_size=int(cfg.batch_size),
                       chunks=int(cfg.aa_chunks))


def test_lines_name_every_column_the_suite_runs_and_end_with_their_sum():
  cfg = default_suite()
  target = Target(predict=_model)
  estimates = priced(cfg, 1000)
  names = [e.name for e in estimates]
  for t, name in suite_runs(cfg, target):
    col = column(t, name)
    if name == "autoattack":  # one line per stage, in the version's order
      assert [n for n in names if n.startswith("autoattack: ")] == [
          f"autoattack: {s}" for s in ("apgd-ce", "apgd-t", "fab-t", "square")]
    else:
      assert col in names
  assert any(n.startswith("masking: eps curve") for n in names)
  assert any(n.startswith("attack unit test (apgd-ce)") for n in names)
  assert any(n.startswith("attention report") for n in names)
  lines = cost.format_lines(estimates)
  assert len(lines) == len(estimates) + 1
  for line, e in zip(lines, estimates):
    assert e.name in line and cost.duration(e.seconds) in line
  total = cost.total_seconds(estimates)
  assert total == pytest.approx(sum(e.compute_s + e.compile_s for e in estimates))
  assert lines[-1].split() == ["total", "up", "to", *cost.duration(total).split()]


def test_autoattack_lines_are_the_worst_case_and_say_up_to():
  cfg = default_suite()
  by_name = {e.name: e for e in priced(cfg, 250)}
  apgd_t = by_name["autoattack: apgd-t"]
  assert apgd_t.up_to and not by_name["pgd100"].up_to
  # Every example, 9 targets x (100 steps + the start), at the chunk speed; plus a re-check.
  assert apgd_t.compute_s == pytest.approx(250 * (9 * 101 * 8e-4 + 2e-4 + 2e-4))
  assert by_name["autoattack: square"].compute_s == pytest.approx(
      250 * ((cost.SQUARE_QUERY * 5000 + 1) * 2e-4 + 2e-4))
  assert by_name["pgd100"].compute_s == pytest.approx(250 * (100 * 1e-3 + 2 * 2e-4))


def test_advice_appears_exactly_over_the_budget_with_the_largest_count_that_fits():
  cfg = default_suite()
  parts, n = parts_of(cfg), 1000
  total = cost.total_seconds(priced(cfg, n, parts))
  fits = cost.cost_lines(parts, {"": SPEED}, n, batch_size=250, chunks=5, budget_s=total)
  assert not any("--config.eval" in line for line in fits)
  budget = total / 4
  over = cost.cost_lines(parts, {"": SPEED}, n, batch_size=250, chunks=5, budget_s=budget)
  assert over[:-1] == fits and "--config.eval.num_examples=" in over[-1]
  chosen = int(over[-1].split("--config.eval.num_examples=")[1].split()[0])
  assert chosen == cost.fitting_examples(parts, {"": SPEED}, n, budget_s=budget,
                                         batch_size=250, chunks=5)
  assert cost.total_seconds(priced(cfg, chosen, parts)) <= budget
  assert all(cost.total_seconds(priced(cfg, m, parts)) > budget for m in range(chosen + 1, n + 1))


def test_advice_names_the_suite_without_autoattack_and_its_estimate():
  cfg = default_suite()
  without = cost.without_autoattack(cfg, ["attacks"])
  assert without == {"attacks": "clean,fgsm,pgd20,pgd100,cw"}
  lighter = default_suite(**without)
  lines = cost.cost_lines(parts_of(cfg), {"": SPEED}, 1000, batch_size=250, chunks=5,
                          budget_s=60.0, without=(without, parts_of(lighter)))
  expected = cost.duration(cost.total_seconds(priced(lighter, 1000)))
  assert (f"--config.eval.attacks=clean,fgsm,pgd20,pgd100,cw (about {expected})"
          in lines[-1])
  assert cost.without_autoattack(default_suite(attacks="clean,pgd20"), ["attacks"]) == {}


def test_estimate_scales_linearly_with_the_number_of_examples():
  cfg = default_suite()
  one, two, four = (priced(cfg, n) for n in (250, 500, 1000))
  for a, b, c in zip(one, two, four):
    assert a.compile_s == b.compile_s == c.compile_s, a.name
    if a.name.startswith(("masking", "attack unit test", "attention")):
      assert a.compute_s == b.compute_s == c.compute_s  # capped at their own counts
    else:
      assert b.compute_s == pytest.approx(2 * a.compute_s), a.name
      assert c.compute_s == pytest.approx(4 * a.compute_s), a.name


def test_padding_counts_the_rows_the_suite_computes():
  assert cost.padded_rows(251, 250, "fixed") == 500
  assert cost.padded_rows(100, 250, "fixed") == 100
  # AutoAttack's pieces are bucketed (at most a quarter padding), in units of the chunks.
  assert cost.padded_rows(37, 250, "staged", 5) == 40
  assert cost.padded_rows(37, 250, "exact") == 37


def _unfoolable_cnn():
  """A small CNN whose head ignores its features and always says class 0: no
  attack can fool it, so every attack spends its whole budget (the estimate's
  worst case) while computing exactly what a real CNN computes."""
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.25,), width=0.5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  head = variables["params"]["head"]
  head["kernel"] = jnp.zeros_like(head["kernel"])
  head["bias"] = jnp.zeros_like(head["bias"]).at[0].set(5.0)
  return lambda x: model.apply(variables, x)["logits"]


@pytest.fixture
def no_persistent_compilation_cache():
  """The evaluation compiles for real: an in-process ``jaxdef`` command of an
  earlier test turns JAX's persistent compilation cache on for the whole
  session, and a cache warm from an earlier run would make the measured time
  mostly cache reads while the estimate counts compilation. JAX decides once
  per process whether the cache is used, so the flag alone changes nothing
  after the first compilation: ``reset_cache`` makes it decide again."""
  from jax.experimental.compilation_cache import compilation_cache
  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_enable_compilation_cache", before)
  compilation_cache.reset_cache()


def test_estimate_is_within_3x_of_a_measured_tiny_evaluation(tmp_path,
                                                             no_persistent_compilation_cache):
  # Tiny budgets, so that compilation (estimated as a multiple of the model's
  # own) is a large share, as it is for any short evaluation; 3x is the
  # tolerance for the compile multiples and for other jobs on the machine.
  cfg = evaluate.default_eval_config(0.3, "linf")
  cfg.update(num_examples=24, batch_size=12, attacks="clean,pgd10,autoattack", aa_steps=10,
             aa_fab_steps=5, aa_queries=100, aa_n_target_classes=3, aa_chunks=2,
             masking_checks=False, unit_test="off")
  logits_fn = _unfoolable_cnn()
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8)
  y = np.zeros(24, np.int32)
  target = Target(predict=logits_fn)
  parts = parts_of(cfg, target, attention=False)
  t0 = time.perf_counter()
  results = evaluate.evaluate_and_report(target, x, y, eval_config=cfg, workdir=str(tmp_path),
                                         key=jax.random.key(0))
  measured = time.perf_counter() - t0
  assert results["attacks"]["autoattack"] == 1.0  # nothing fooled: the worst case ran
  for col in results["seconds"]:
    assert any(p.name == col or p.name.startswith(f"{col}: ") for p in parts), col
  speed = cost.measure_speed(target, x, y, rows=12, chunk_rows=cost.chunk_rows(24, 12, 2))
  estimated = cost.total_seconds(cost.estimate(parts, {"": speed}, 24, batch_size=12,
                                               chunks=2))
  assert estimated / 3 <= measured <= 3 * estimated, (estimated, measured)


def test_jaxdef_eval_prints_the_estimate_and_the_advice_over_its_budget():
  cfg = evaluate.default_eval_config(0.3, "linf")
  cfg.update(num_examples=40, batch_size=20, aa_chunks=2)
  x = np.random.default_rng(0).integers(0, 256, (40, 4, 4, 1), dtype=np.uint8)
  y = np.zeros(40, np.int32)
  lines = cost.evaluation_cost(cfg, x, y, main=Target(predict=_model), budget_s=1e-3)
  assert lines[0].startswith("estimated time on this machine")
  assert lines[1].startswith("  (measured: forward + input gradient ")
  assert [line.split()[0] for line in lines[2:7]] == ["clean", "fgsm", "pgd20", "pgd100", "cw"]
  assert lines[-2].split()[:3] == ["total", "up", "to"]
  assert "leave AutoAttack out: --config.eval.attacks=clean,fgsm,pgd20,pgd100,cw" in lines[-1]
  roomy = cost.evaluation_cost(cfg, x, y, main=Target(predict=_model), budget_s=1e6)
  assert roomy[-1].split()[:3] == ["total", "up", "to"]
