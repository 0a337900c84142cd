"""The evaluation suite: accuracies, worst case, reports, masking checks, sharding."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdef import evaluate
from jaxdef.errors import ConfigError

SHAPE, CLASSES = (6, 6, 1), 10


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params


@functools.lru_cache(maxsize=None)
def problem(n=40):
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (int(np.prod(SHAPE)), CLASSES))
  logits_fn = functools.partial(_linear, w)
  x = np.asarray(jax.random.uniform(k2, (n,) + SHAPE))
  y = np.asarray(jnp.argmax(logits_fn(x), -1)).astype(np.int32)
  y[::5] = (y[::5] + 1) % CLASSES  # 20% wrong labels: clean accuracy 80%
  return logits_fn, (x * 255).astype(np.uint8), y


def tiny_eval_config(**overrides):
  c = evaluate.default_eval_config(0.05, "linf")
  c.num_examples = 30       # not a multiple of the batch: the last batch is padded
  c.batch_size = 16
  c.attacks = "clean,fgsm,pgd5,cw,autoattack"
  c.cw_steps = 5
  c.aa_steps = 5
  c.aa_fab_steps = 5
  c.aa_queries = 20
  c.aa_chunks = 2
  c.curve_eps = (0.01, 0.05, 0.5)
  c.curve_attack = "pgd5"
  c.masking_num_examples = 16
  c.masking_pgd_steps = 5
  c.masking_pgd_restarts = 2
  c.update(overrides)
  return c


@functools.lru_cache(maxsize=None)
def suite_results():
  logits_fn, x, y = problem()
  return evaluate.run_suite(logits_fn, x, y, suite_config=tiny_eval_config(),
                            key=jax.random.key(0), progress=False)


def test_suite_reports_clean_and_robust_accuracy_on_the_stated_examples():
  r = suite_results()
  assert r["num_examples"] == 30
  assert r["clean"] == pytest.approx(24 / 30)
  assert set(r["attacks"]) == {"fgsm", "pgd5", "cw", "autoattack"}
  for name, acc in r["attacks"].items():
    assert 0.0 <= acc <= r["clean"], name
  assert r["ensemble"] == pytest.approx(min(r["attacks"].values())) or \
      r["ensemble"] <= min(r["attacks"].values())
  assert list(r["autoattack_stages"]) == [
      "after apgd-ce", "after apgd-t", "after fab-t", "after square"]
  assert r["autoattack_stages"]["after square"] == pytest.approx(r["attacks"]["autoattack"])


def test_worst_case_is_the_per_example_and_over_attacks():
  r = suite_results()
  per = r["per_example"]
  expected = np.logical_and.reduce([per[k] for k in ("clean", "fgsm", "pgd5", "cw", "autoattack")])
  np.testing.assert_array_equal(per["ensemble"], expected)
  assert r["ensemble"] == pytest.approx(expected.mean())


def test_suite_is_deterministic_given_the_key():
  logits_fn, x, y = problem()
  cfg = tiny_eval_config(attacks="clean,pgd5")
  run = lambda: evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(3),
                                   progress=False)
  a, b = run(), run()
  assert a["attacks"] == b["attacks"]


def test_suite_accepts_batches_sharded_over_the_data_axis():
  logits_fn, x, y = problem()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  cfg = tiny_eval_config(attacks="clean,pgd5")
  plain = evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(1),
                             progress=False)
  sharded = evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(1),
                               sharding=sharding, progress=False)
  assert plain["attacks"] == sharded["attacks"]


def test_results_table_is_markdown_with_every_attack():
  table = evaluate.results_table(suite_results())
  assert "| attack | accuracy |" in table
  for name in ("clean", "fgsm", "pgd5", "cw", "autoattack", "worst case"):
    assert f"| {name}" in table
  assert "30 test examples" in table


def test_unknown_attack_name_is_a_config_error():
  logits_fn, x, y = problem()
  with pytest.raises(ConfigError, match="unknown eval attack"):
    evaluate.run_suite(logits_fn, x, y, suite_config=tiny_eval_config(attacks="clean,pgdx"),
                       key=jax.random.key(0), progress=False)


def test_masking_checks_pass_for_an_honest_linear_model():
  logits_fn, x, y = problem()
  failed, evidence = evaluate.masking_checks(
      logits_fn, x, y, results=suite_results(), suite_config=tiny_eval_config(),
      key=jax.random.key(0))
  assert failed == [], failed
  assert evidence["curve_acc"][-1] == 0.0
  assert evidence["curve_acc"] == sorted(evidence["curve_acc"], reverse=True)


def test_masking_checks_flag_a_model_with_masked_gradients():
  """A model of round(x) on binary images has zero gradients and ignores any
  perturbation below 0.5: accuracy stays at its clean value at every eps."""
  _, x, _ = problem()
  x = np.where(x > 127, 255, 0).astype(np.uint8)
  w = jax.random.normal(jax.random.key(5), (int(np.prod(SHAPE)), CLASSES))
  masked = lambda z: _linear(w, jnp.round(z))
  y = np.asarray(jnp.argmax(masked(jnp.asarray(x, jnp.float32) / 255), -1)).astype(np.int32)
  cfg = tiny_eval_config(attacks="clean,pgd5", curve_eps=(0.01, 0.1, 0.45))
  results = evaluate.run_suite(masked, x, y, suite_config=cfg, key=jax.random.key(0),
                               progress=False)
  failed, evidence = evaluate.masking_checks(masked, x, y, results=results, suite_config=cfg,
                                             key=jax.random.key(0))
  assert evidence["curve_acc"] == [1.0, 1.0, 1.0]
  assert any("does not reach ~0" in f and "95% interval" in f for f in failed), failed
  left = [c for c in evidence["checks"] if c["check"].startswith("accuracy left")]
  assert left[0]["failed"] and left[0]["interval"][0] > 0.75


def test_masking_tolerance_knows_the_sample_size():
  from jaxdef.evaluate.masking import judge, wilson_interval
  # Wilson 95% interval of 1/32, by hand: centre 0.0815, half-width 0.0760.
  low, high = wilson_interval(1, 32)
  assert low == pytest.approx(0.0055, abs=5e-4) and high == pytest.approx(0.1575, abs=5e-4)
  one_of_32 = judge("x", 1 / 32, 32, 0.03)       # 3.1 points: above 3, but one example
  assert not one_of_32["failed"] and one_of_32["interval"][0] < 0.03
  assert not judge("x", 10 / 200, 200, 0.03)["failed"]   # lower bound 2.7 points
  assert judge("x", 12 / 200, 200, 0.03)["failed"]       # lower bound 3.5 points
  assert not judge("x", -0.5, 200, 0.03)["failed"]       # the evaluation is not too strong
  assert not judge("x", 0.02, 10000, 0.03)["failed"]     # certain, but within the tolerance


def test_evaluate_and_report_writes_json_markdown_and_png(tmp_path, capsys):
  logits_fn, x, y = problem()
  cfg = tiny_eval_config(attacks="clean,pgd5", curve_eps=(0.05, 0.5))
  results = evaluate.evaluate_and_report(logits_fn, x, y, eval_config=cfg,
                                         workdir=str(tmp_path), key=jax.random.key(0))
  out = tmp_path / "eval"
  saved = json.loads((out / "results.json").read_text())
  assert saved["attacks"] == results["attacks"]
  assert "per_example" not in saved
  assert saved["masking_checks"]["failed"] == results["masking_checks"]["failed"]
  assert (out / "results.md").read_text().startswith("30 test examples")
  assert (out / "eps_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  printed = capsys.readouterr().out
  assert "| worst case over attacks |" in printed
  assert "accuracy left at eps 0.5: +0.0 points (95% interval 0.0-19.4, 16 examples" in printed


def test_default_eval_config_states_the_methods_suite():
  c = evaluate.default_eval_config(8 / 255, "linf")
  assert c.attacks == "clean,fgsm,pgd20,pgd100,cw,autoattack"
  assert c.pgd_step_size == pytest.approx(2 / 255)
  assert (c.aa_version, c.aa_steps, c.aa_queries, c.cw_kappa) == ("auto", 100, 5000, 50.0)
  assert (c.aa_n_target_classes, c.aa_eot_iter) == (9, 0)
  assert max(c.curve_eps) <= 1.0 and c.curve_eps == tuple(sorted(c.curve_eps))
  assert evaluate.default_eval_config(0.5, "l2").curve_eps[-1] == pytest.approx(4.0)
  # MNIST's 0.3: 0.6 x 2 and 0.3 x 8 are both capped at 1, and drawn once.
  assert evaluate.default_eval_config(0.3, "linf").curve_eps == pytest.approx(
      (0.075, 0.15, 0.3, 0.6, 1.0))


def test_pictures_name_what_they_show(tmp_path, monkeypatch):
  """The eps curve marks the evaluated eps and has no repeated point; the
  attention grid has a title, a colour bar and a caption under every image."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.figure
  from jaxdef.evaluate.attention import attention_grid_png
  from jaxdef.evaluate.report import eps_curve_png
  saved = []
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, *a, **k: saved.append(fig))
  eps_curve_png(str(tmp_path / "c.png"), [0.1, 0.3, 1.0, 1.0], [0.8, 0.5, 0.1, 0.1],
                marked_eps=0.3, title="run: pgd20")
  ax = saved[-1].axes[0]
  assert len(ax.lines[0].get_xdata()) == 3 and ax.get_title() == "run: pgd20"
  assert any(list(l.get_xdata()) == [0.3, 0.3] for l in ax.lines[1:])
  images = np.full((2, 8, 8, 1), 0.5, np.float32)
  maps = np.stack([np.eye(8), np.ones((8, 8))]).astype(np.float32)
  attention_grid_png(str(tmp_path / "a.png"), 2,
                     [("image", images, None, ["true 1", "true 2"]),
                      ("PGD-20", images, maps, ["pred 1", "pred 3 FOOLED"])],
                     title="Grad-CAM")
  fig = saved[-1]
  assert fig._suptitle.get_text() == "Grad-CAM"
  labels = [a.get_xlabel() for a in fig.axes]
  assert "pred 3 FOOLED" in labels and "true 1" in labels
  assert any("attention within the image" in a.get_ylabel() for a in fig.axes)  # colour bar


def _saved_run(workdir, config):
  """A run directory holding ``config`` and one checkpoint of its model's initial weights."""
  from jaxdef import checkpoint as ckpt
  from jaxdef.build import DataMeta, build
  from jaxdef.data import load_dataset
  meta = DataMeta.from_dataset(load_dataset(config.data))
  ckpt.write_run_config(str(workdir), config, meta.to_dict())
  model, _, _ = build(config, meta)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *meta.image_shape)), train=False)
  manager = ckpt.checkpoint_manager(str(workdir), max_to_keep=1, async_save=False)
  ckpt.save(manager, 1, {"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})})
  ckpt.finish(manager, 1)
  manager.close()


@pytest.mark.parametrize("field, value", [("model.name", "resnet18"), ("defense.name", "cas")])
def test_eval_refuses_a_config_that_describes_another_run(tmp_path, tiny, field, value):
  """``--mode eval`` with a config whose model or defense differs from the run's
  own: one line naming the field, before any attack runs."""
  from jaxdef.evaluate import evaluate_workdir
  _saved_run(tmp_path, tiny())
  other = tiny(**{field: value})
  with pytest.raises(ConfigError, match=f"{field}=.* but the config has '{value}'") as err:
    evaluate_workdir(str(tmp_path), other)
  assert "\n" not in str(err.value)


def test_eval_refuses_data_of_another_shape(tmp_path, tiny):
  from jaxdef.evaluate import evaluate_workdir
  _saved_run(tmp_path, tiny())
  other = tiny(**{"data.name": "npz"})
  other.data.path = str(tmp_path / "rgb.npz")
  rng = np.random.default_rng(0)
  np.savez(other.data.path, x_train=rng.integers(0, 255, (16, 32, 32, 3), np.uint8),
           y_train=np.arange(16) % 10, x_test=rng.integers(0, 255, (8, 32, 32, 3), np.uint8),
           y_test=np.arange(8) % 10)
  with pytest.raises(ConfigError, match="data image_shape"):
    evaluate_workdir(str(tmp_path), other)


@pytest.mark.parametrize("protocol, columns, step, random_start", [
    ("cas", "clean,fgsm,pgd20,cw,autoattack", 0.003, True),
    ("fsr", "clean,fgsm,pgd20,pgd100,cw,autoattack", 0.8 / 255, False),
    ("aad", "clean,stepll,r+stepll,iterll,autoattack", 2 / 255, True),
])
def test_a_papers_protocol_sets_its_columns_then_autoattack(protocol, columns, step,
                                                            random_start):
  from jaxdef.config import default_eval_config, resolve_eval_config
  c = default_eval_config()
  c.protocol = protocol
  r = resolve_eval_config(c, eps=8 / 255, norm="linf")
  assert r.attacks == columns
  assert r.pgd_step_size == pytest.approx(step) and r.pgd_random_start == random_start
  assert resolve_eval_config(r, eps=8 / 255, norm="linf").attacks == columns  # idempotent
  if protocol == "cas":
    assert r.joint_attacks == "joint-fgsm,joint-pgd20,joint-cw"


def test_an_unknown_protocol_is_a_one_line_error(tiny):
  from jaxdef.config import validate
  config = tiny()
  config.eval.protocol = "madry"
  with pytest.raises(ConfigError, match="eval.protocol") as err:
    validate(config, 1)
  assert "\n" not in str(err.value)


def test_the_suite_runs_a_protocols_columns():
  from jaxdef.config import resolve_eval_config
  logits_fn, x, y = problem()
  cfg = resolve_eval_config(tiny_eval_config(protocol="aad"), eps=0.05, norm="linf")
  r = evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(0),
                         progress=False)
  assert list(r["attacks"]) == ["stepll", "r+stepll", "iterll", "autoattack"]
  assert r["ensemble"] <= min(r["attacks"].values())


def test_autoattack_report_speaks_like_the_reference_and_returns_what_it_returns():
  logits_fn, x, y = problem()
  lines = []
  budget = dict(steps=5, fab_steps=5, queries=20)
  r = evaluate.autoattack_report(logits_fn, x, y, eps=0.05, norm="Linf", batch_size=16,
                                 log=lines.append, **budget)
  assert lines[0] == "using standard version including apgd-ce, apgd-t, fab-t, square."
  assert lines[1] == f"initial accuracy: {100 * r['clean_accuracy']:.2f}%"
  assert r["clean_accuracy"] == pytest.approx(0.8)             # 20% wrong labels
  # Per attack, as it runs: what is left, each batch's successes, the robust accuracy.
  after = [i for i, l in enumerate(lines) if l.startswith("robust accuracy after ")]
  assert [lines[i].split(":")[0] for i in after] == [
      f"robust accuracy after {a}" for a in ("APGD-CE", "APGD-T", "FAB-T", "SQUARE")]
  for name, start, end in zip(("apgd-ce", "apgd-t", "fab-t", "square"), [1] + after, after):
    assert lines[start + 1].startswith(f"running {name}: ")
    assert all(l.startswith(f"{name} - ") and "successfully perturbed" in l
               for l in lines[start + 2:end])
  assert lines[after[-1] + 1].startswith("max Linf perturbation: ")
  assert "nan in tensor: 0" in lines[after[-1] + 1]
  assert lines[-1] == f"robust accuracy: {100 * r['robust_accuracy']:.2f}%"
  stages = list(r["stages"].values())
  assert stages == sorted(stages, reverse=True) and stages[-1] == r["robust_accuracy"]
  x_adv, x_float = r["x_adv"], x.astype(np.float32) / 255
  assert x_adv.shape == x.shape and x_adv.dtype == np.float32
  assert np.abs(x_adv - x_float).max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
  robust = np.argmax(np.asarray(logits_fn(jnp.asarray(x_adv))), -1) == y
  assert robust.mean() == r["robust_accuracy"] < r["clean_accuracy"]
  with pytest.raises(ConfigError, match="unknown norm"):
    evaluate.autoattack_report(logits_fn, x, y, eps=0.05, norm="L3")


def test_a_zero_gradient_transform_marks_the_headline_unreliable_and_bpda_fixes_it(tmp_path):
  """classifier(quantise(x)) has zero input gradients: attacked through its exact
  gradients it looks robust at every eps, the checks fail and the headline says
  so, naming BPDA; attacked with BPDA, the worst case falls and is reliable."""
  from jaxdef import attacks
  logits_fn, x, y = problem()
  quantise = lambda z: jnp.round(z * 4.0) / 4.0
  pipeline = lambda z: logits_fn(quantise(z))
  y = np.asarray(jnp.argmax(pipeline(jnp.asarray(x, jnp.float32) / 255), -1)).astype(np.int32)
  cfg = tiny_eval_config(attacks="clean,pgd5", curve_eps=(0.05, 0.2, 0.6))
  naive = evaluate.Target(predict=pipeline, reference=logits_fn)
  r = evaluate.evaluate_and_report(naive, x, y, eval_config=cfg, workdir=str(tmp_path / "a"),
                                   key=jax.random.key(0))
  claim = r["headline"]
  assert not claim["reliable"] and claim["robust_accuracy"] == r["ensemble"] >= 0.8
  assert any("BPDA" in step for step in claim["next"])
  saved = json.loads((tmp_path / "a" / "eval" / "results.json").read_text())
  assert saved["headline"]["reliable"] is False and saved["headline"]["reasons"]
  assert "UNRELIABLE" in (tmp_path / "a" / "eval" / "results.md").read_text()
  bpda = evaluate.Target(predict=pipeline, label="bpda", reference=logits_fn,
                         attack_view=attacks.defended_logits_fn(logits_fn, quantise))
  fixed = evaluate.evaluate_and_report(naive, x, y, eval_config=cfg,
                                       workdir=str(tmp_path / "b"), key=jax.random.key(0),
                                       adaptive=bpda)
  assert fixed["ensemble"] < 0.5 and fixed["headline"]["robust_accuracy"] == fixed["ensemble"]
  assert fixed["headline"]["reliable"], fixed["masking_checks"]["failed"]


def test_a_weak_fixed_step_pgd_is_caught_by_apgd_ce():
  """PGD with a step a thousand times too small moves nowhere in 5 steps, and so
  does its restarted twin; APGD-CE adapts its step and finds the points."""
  logits_fn, x, y = problem()
  cfg = tiny_eval_config(attacks="clean,pgd5,autoattack", pgd_step_size=0.05 / 1000,
                         curve_eps=(0.05,))
  results = evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(0),
                               progress=False)
  assert results["autoattack_stages"]["after apgd-ce"] < results["attacks"]["pgd5"] - 0.1
  failed, evidence = evaluate.masking_checks(logits_fn, x, y, results=results,
                                             suite_config=cfg, key=jax.random.key(0))
  weak = [c for c in evidence["checks"] if c["kind"] == "weak_attack"]
  assert len(weak) == 1 and weak[0]["failed"] and weak[0]["check"] == "APGD-CE beyond PGD-5"
  assert any("fixed-step PGD is weak" in f for f in failed)
  from jaxdef.evaluate.masking import next_evaluations
  assert any("quote AutoAttack" in s for s in next_evaluations(
      ["weak_attack"], transform=False, heads=False, randomized=False))
  # With a sound step the same check passes.
  sound = evaluate.run_suite(logits_fn, x, y, suite_config=tiny_eval_config(
      attacks="clean,pgd5,autoattack"), key=jax.random.key(0), progress=False)
  _, evidence = evaluate.masking_checks(logits_fn, x, y, results=sound,
                                        suite_config=tiny_eval_config(), key=jax.random.key(0))
  assert not [c for c in evidence["checks"] if c["kind"] == "weak_attack"][0]["failed"]


def test_indicators_of_attack_failure_name_why_an_attack_failed():
  """Known failures by construction: a zero-gradient model (unavailable
  gradients), PGD with a step far too small (incomplete optimisation), a
  sound attack on a linear model (no indicator)."""
  from jaxdef import attacks
  from jaxdef.attacks.indicators import failure_indicators
  logits_fn, x, y = problem()
  xf = jnp.asarray(x, jnp.float32) / 255
  budget = dict(key=jax.random.key(0), eps=0.05, steps=10, random_start=False)
  flat = lambda z: logits_fn(jax.lax.stop_gradient(z))        # no input gradient at all
  _, trace = attacks.pgd(flat, xf, jnp.asarray(y), step_size=0.01, return_trace=True, **budget)
  assert trace.losses.shape == (11, len(y))
  fired = failure_indicators(trace)
  failed = ~np.asarray(trace.fooled_last)
  assert failed.any() and np.array_equal(np.asarray(fired["unavailable gradients"]), failed)
  _, slow = attacks.pgd(logits_fn, xf, jnp.asarray(y), step_size=1e-5, return_trace=True,
                        **budget)
  fired = failure_indicators(slow)
  assert np.asarray(fired["incomplete optimisation"]).sum() >= 0.5 * (~np.asarray(
      slow.fooled_last)).sum() > 0
  assert not np.asarray(fired["unavailable gradients"]).any()
  # The losses of the returned iterate and the start are those of the model.
  start_loss = attacks.cross_entropy(logits_fn(xf), jnp.asarray(y))
  np.testing.assert_allclose(slow.losses[0], start_loss, rtol=1e-5, atol=1e-6)
  # In the suite: per-attack counts, a failed check naming the mitigation.
  cfg = tiny_eval_config(attacks="clean,pgd10", pgd_step_size=0.05 / 1e4, curve_eps=(0.05,))
  results = evaluate.run_suite(logits_fn, x, y, suite_config=cfg, key=jax.random.key(0),
                               progress=False)
  assert results["indicators"]["pgd10"]["incomplete optimisation"] > 0
  failed_checks, evidence = evaluate.masking_checks(logits_fn, x, y, results=results,
                                                    suite_config=cfg, key=jax.random.key(0))
  assert any("incomplete optimisation under pgd10" in f and "more attack steps" in f
             for f in failed_checks)
  assert "Indicators of attack failure" in evaluate.results_table(results)
  off = evaluate.run_suite(logits_fn, x, y, suite_config=tiny_eval_config(
      attacks="clean,pgd5", indicators=False), key=jax.random.key(0), progress=False)
  assert "indicators" not in off
  # AutoAttack's APGD stages record them too: the zero-gradient model is flagged
  # on every example it keeps.
  aa = evaluate.run_suite(flat, x, y, suite_config=tiny_eval_config(attacks="clean,apgd-ce"),
                          key=jax.random.key(0), progress=False)
  kept = int(round(aa["attacks"]["apgd-ce"] * aa["num_examples"]))
  assert kept > 0 and aa["indicators"]["apgd-ce"]["unavailable gradients"] == kept


def test_transfer_failure_flags_white_box_attacks_a_surrogate_beats():
  """classifier(quantise(x)) attacked through its own (zero) gradients stays
  'robust'; PGD made on the bare classifier (a surrogate) transfers and fools
  it: the transfer-failure indicator counts those examples, the check fails
  naming BPDA, and the worst case includes the transferred examples."""
  from jaxdef.evaluate.masking import indicator_checks
  from jaxdef.evaluate.suite import transfer_failures
  logits_fn, x, y = problem()
  quantise = lambda z: jnp.round(z * 4.0) / 4.0
  pipeline = lambda z: logits_fn(quantise(z))
  y = np.asarray(jnp.argmax(pipeline(jnp.asarray(x, jnp.float32) / 255), -1)).astype(np.int32)
  cfg = tiny_eval_config(attacks="clean,pgd5", transfer_attacks="pgd5", eps=0.2, pgd_step_size=0.05,
                         pgd_random_start=False,
                         curve_eps=(0.2,))
  surrogate = evaluate.Target(predict=pipeline, attack_view=logits_fn, label="transfer")
  r = evaluate.run_suite(pipeline, x, y, suite_config=cfg, key=jax.random.key(0),
                         progress=False, surrogate=surrogate)
  white, moved = r["per_example"]["pgd5"], r["per_example"]["transfer pgd5"]
  expected = int((white & ~moved).sum())
  assert r["attacks"]["pgd5"] == r["clean"] and expected > 0.3 * len(y)
  assert r["indicators"]["white-box attacks"] == {"transfer failure": expected}
  assert r["ensemble"] == pytest.approx(float((white & moved).mean()))
  checks = indicator_checks(r, 0.03)
  assert any(c["failed"] and "transfer failure" in s and "BPDA" in s for c, s in checks)
  # Nothing to compare: no indicator.
  assert transfer_failures({"pgd5": white}, white_box=["pgd5"], transfer=[]) is None


def test_an_indicator_whose_remedy_the_suite_ran_does_not_fail_the_headline():
  """The counts are of examples robust under every attack: where the
  indicator's remedy is among them (APGD for an oscillating PGD, more steps
  for an unfinished one) it was applied and failed too, so the check passes
  and names it; without the remedy, or for an indicator the suite cannot
  answer, it fails."""
  from jaxdef.evaluate.masking import answered_by, indicator_checks
  cfg = tiny_eval_config(aa_steps=100, cw_steps=30)
  fired = {"non-converging attack": 20, "incomplete optimisation": 20, "silent success": 20,
           "unavailable gradients": 20}

  def failed(attacks, col="pgd20", label=""):
    prefix = label + " " if label else ""
    results = {"num_examples": 100, "attacks": {prefix + a: 0.8 for a in attacks},
               "indicators": {prefix + col: fired}}
    return {c["check"].split(" under ")[0]: c["failed"]
            for c, _ in indicator_checks(results, 0.03, label, cfg)}

  assert all(failed(["pgd20"]).values())
  assert failed(["pgd20", "autoattack"]) == {
      "non-converging attack": False, "incomplete optimisation": False,
      "silent success": True, "unavailable gradients": True}
  assert failed(["pgd20", "pgd100"])["incomplete optimisation"] is False
  assert failed(["pgd20", "pgd100"])["non-converging attack"] is True
  assert failed(["pgd100", "pgd20"], col="pgd100")["incomplete optimisation"] is True
  assert failed(["pgd20", "apgd-ce"], label="bpda")["non-converging attack"] is False
  assert answered_by("non-converging attack", "joint-pgd20", ["autoattack"], cfg) is None
  assert answered_by("incomplete optimisation", "joint-pgd20", ["joint-pgd100"],
                     cfg) == "joint-pgd100"
  results = {"num_examples": 100, "attacks": {"pgd20": 0.8, "autoattack": 0.8},
             "indicators": {"pgd20": fired}}
  names = [c["check"] for c, _ in indicator_checks(results, 0.03, "", cfg)]
  assert "non-converging attack under pgd20 (its remedy, autoattack, ran and left them robust)" \
      in names


def test_a_logit_scaled_model_defeats_cross_entropy_attacks_but_not_dlr():
  """Logits multiplied by 1e4 saturate the softmax: the cross-entropy
  gradient of every well-classified example is exactly zero, so PGD (CE)
  leaves the model 'robust' and records unavailable gradients, and the check
  names another loss; the scale-invariant DLR loss of APGD-DLR breaks the
  same examples, and with it in the suite the worst case falls and the
  indicator no longer holds on them."""
  from jaxdef.evaluate.masking import indicator_checks
  logits_fn, x, y = problem()
  scaled = lambda z: 1e4 * logits_fn(z)
  cfg = tiny_eval_config(attacks="clean,pgd10", aa_steps=20)
  ce = evaluate.run_suite(scaled, x, y, suite_config=cfg, key=jax.random.key(0), progress=False)
  assert ce["attacks"]["pgd10"] >= ce["clean"] - 0.1
  stuck = ce["indicators"]["pgd10"]["unavailable gradients"]
  assert stuck >= 0.5 * ce["clean"] * ce["num_examples"]
  assert any(c["failed"] and "another loss" in s for c, s in indicator_checks(ce, 0.03))
  both = evaluate.run_suite(scaled, x, y, suite_config=tiny_eval_config(
      attacks="clean,pgd10,apgd-dlr", aa_steps=20), key=jax.random.key(0), progress=False)
  assert both["attacks"]["apgd-dlr"] < both["attacks"]["pgd10"] - 0.25
  assert both["ensemble"] == both["attacks"]["apgd-dlr"]
  assert both["indicators"]["pgd10"]["unavailable gradients"] < stuck


# A randomized target: the linear model behind Gaussian input noise.
NOISE = 0.3


def _noisy_linear(z, key):
  logits_fn, _, _ = problem()
  return logits_fn(z + NOISE * jax.random.normal(key, z.shape))


def test_a_randomized_targets_autoattack_is_scored_stage_by_stage_as_the_reference_does():
  """The suite's AutoAttack column on a randomized target is autoattack_report's
  rand protocol (a fresh draw after the clean pass and after every stage),
  with the same key: the headline and every stage column, which are the
  re-predicted flags, not the attacks' own. Its label names the version and
  the EOT draws; it has no score-draw spread (the clean column keeps its own)."""
  _, x, y = problem()
  # Without the indicators the two calls share their compiled stages.
  cfg = tiny_eval_config(attacks="clean,autoattack", aa_eot_iter=2, score_draws=3,
                         indicators=False, aa_chunks=1)
  target = evaluate.Target(predict=_noisy_linear, randomized=True, eot_samples=2)
  key = jax.random.key(0)
  r = evaluate.run_suite(target, x, y, suite_config=cfg, key=key, progress=False)
  report = evaluate.autoattack_report(
      _noisy_linear, x[:30], y[:30], eps=0.05, norm="linf", version="rand", randomized=True,
      key=jax.random.fold_in(key, 1), batch_size=16, log=None, steps=cfg.aa_steps,
      fab_steps=cfg.aa_fab_steps, queries=cfg.aa_queries, eot_iter=2, chunks=cfg.aa_chunks)
  assert r["attacks"]["autoattack"] == report["robust_accuracy"]
  assert r["autoattack_stages"] == pytest.approx(
      {f"after {k}": v for k, v in report["stages"].items()})
  assert r["autoattack_stages"]["after apgd-dlr"] == r["attacks"]["autoattack"]
  assert report["eot_iter"] == 2
  assert r["autoattack_protocols"]["autoattack"] == {
      "version": "rand", "eot_iter": 2, "label": "autoattack (rand, EOT 2)"}
  assert set(r["draws"]) == {"clean"}
  assert "| autoattack (rand, EOT 2) after apgd-ce |" in evaluate.results_table(r)


def test_a_randomized_target_is_scored_attacked_under_a_fresh_draw():
  """On a model that is all noise, the attacked images (here the clean ones
  again) scored under a fresh draw are correct less often than under the
  clean pass's own draw; the clean column keeps the one draw."""
  from jaxdef.evaluate.suite import score_attacked
  guess = lambda z, key: jax.random.normal(key, (z.shape[0], CLASSES)) + 0.0 * z.sum()
  target = evaluate.Target(predict=guess, randomized=True)
  x, y = jnp.zeros((400,) + SHAPE), jnp.zeros(400, jnp.int32)
  score = functools.partial(score_attacked, target, tiny_eval_config(), x, y, x,
                            jax.random.key(0))
  once, _ = score(fresh=False)
  fresh, extra = score(fresh=True, draws=3)
  once, fresh = np.asarray(once), np.asarray(fresh)
  assert 0.05 < once.mean() < 0.15                       # a guess among 10 classes
  assert not (fresh & ~once).any() and fresh.sum() < once.sum() / 3
  assert sorted(extra) == ["draw 1", "draw 2"]


def test_the_results_name_each_autoattack_columns_version_and_eot_draws(tmp_path):
  from jaxdef.evaluate.attacks import autoattack_protocol
  r = suite_results()
  assert r["autoattack_protocols"] == {"autoattack": {
      "version": "standard", "eot_iter": 1, "label": "autoattack (standard)"}}
  assert r["autoattack_stages_of"] == "autoattack"
  table = evaluate.results_table(r)
  assert "| autoattack (standard) |" in table
  assert "| autoattack (standard) after square |" in table
  evaluate.write_results(str(tmp_path), r)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["autoattack_protocols"]["autoattack"]["label"] == "autoattack (standard)"
  cfg = tiny_eval_config()
  assert autoattack_protocol("autoattack", cfg, True)["label"] == "autoattack (rand, EOT 20)"
  assert autoattack_protocol("apgd-ce", cfg, True)["label"] == "apgd-ce (EOT 20)"
  assert autoattack_protocol("apgd-ce", cfg, False)["label"] == "apgd-ce"
  assert autoattack_protocol("pgd5", cfg, False) is None
  cfg.aa_version = "plus"
  assert autoattack_protocol("autoattack", cfg, False)["label"] == "autoattack (plus)"
