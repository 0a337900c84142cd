"""Specification of ``python -m benchmarks.bench`` and its PyTorch twin (issue 7).

One tiny case (quarter-width small CNN, batch 8, PGD-2 training and PGD-1
evaluation, one timed call) is run once with ``--compare torch`` and shared
by the tests; the rest only trace or lower, never compile a second step.
"""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench
from jaxdef.errors import ConfigError

WIDTH, BATCH, PGD_STEPS, EVAL_STEPS, SIZE = 0.25, 8, 2, 1, 20
TINY_ARGS = ["--model", "small_cnn", "--model_kwargs", json.dumps({"width": WIDTH}),
             "--batch", str(BATCH), "--pgd_steps", str(PGD_STEPS),
             "--eval_steps", str(EVAL_STEPS), "--iters", "1", "--image_size", str(SIZE)]
FIELDS = ("kind", "model", "defense", "dtype", "batch", "steps", "image_shape", "unroll",
          "backend", "device_kind", "devices", "iters", "images_per_s", "step_ms",
          "compile_s", "peak_memory_bytes", "peak_memory_source", "xla_memory_bytes",
          "flops_per_example", "flops_source", "peak_flops", "mfu")
POSITIVE = ("images_per_s", "step_ms", "compile_s", "peak_memory_bytes", "xla_memory_bytes",
            "flops_per_example")


@functools.lru_cache(maxsize=None)
def tiny_run() -> tuple[tuple[dict, ...], str]:
  """The tiny case with the PyTorch comparison: (records, printed text)."""
  import contextlib
  import io
  pytest.importorskip("torch", reason="--compare torch needs the benchmark extra (torch)")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    records = bench.main(TINY_ARGS + ["--compare", "torch"])
  return tuple(records), out.getvalue()


def small_cnn_forward_flops(width: float, size: int, channels: int = 3,
                            classes: int = 10) -> float:
  """2 x multiply-adds of one small-CNN forward pass (convs and dense layers)."""
  units = lambda n: max(1, int(round(n * width)))
  c = [channels] + [units(n) for n in (32, 32, 64, 64)]
  macs, side = 0, size
  for i in range(4):
    side -= 2  # 3x3 'VALID'
    macs += side * side * 9 * c[i] * c[i + 1]
    if i % 2:
      side //= 2
  dims = [side * side * c[4], units(200), units(200), classes]
  macs += sum(a * b for a, b in zip(dims, dims[1:]))
  return 2.0 * macs


def test_prints_one_json_line_per_case_with_every_field_positive():
  records, text = tiny_run()
  lines = [json.loads(line) for line in text.strip().splitlines()]
  assert [r["kind"] for r in lines] == ["train", "eval"]
  assert lines == [json.loads(json.dumps(r)) for r in records]
  for r, steps in zip(lines, (PGD_STEPS, EVAL_STEPS)):
    assert set(FIELDS) <= set(r)
    assert (r["model"], r["defense"], r["batch"], r["steps"]) == (
        "small_cnn", "none", BATCH, steps)
    for field in POSITIVE:
      assert r[field] > 0, field
    assert r["images_per_s"] == pytest.approx(BATCH / (r["step_ms"] / 1e3))
    if r["backend"] == "cpu":
      assert r["peak_memory_source"] == "process_peak_rss" and r["mfu"] is None


def test_flops_per_example_match_the_analytic_count_of_the_small_cnn():
  """Analytic: a forward pass F, an input gradient F, a weight gradient F
  (2 FLOPs per multiply-add of convs and dense layers). Training with PGD-s:
  s x (forward + input gradient) + forward + backward = (2s + 3) F;
  evaluation: clean forward + s x 2F + final forward = (2s + 2) F. XLA also
  counts element-wise work (ReLU, biases, pooling, projection, SGD), a few
  per cent here, and reorders convolutions; hence the band [0.9, 1.3]."""
  records, _ = tiny_run()
  f = small_cnn_forward_flops(WIDTH, SIZE)
  expected = {"train": (2 * PGD_STEPS + 3) * f, "eval": (2 * EVAL_STEPS + 2) * f}
  for r in records:
    assert 0.9 <= r["flops_per_example"] / expected[r["kind"]] <= 1.3, r["kind"]


def test_compare_torch_reports_the_twin_speed_and_the_ratio():
  records, _ = tiny_run()
  for r in records:
    assert r["torch_images_per_s"] > 0 and r["torch_step_ms"] > 0
    assert r["ratio"] == pytest.approx(r["images_per_s"] / r["torch_images_per_s"])
    assert r["torch_settings"]["device"] in ("cpu", "cuda")


def test_rolled_loop_flops_are_counted_on_the_unrolled_program():
  """XLA counts a while body once: the rolled program's count is short of
  the unrolled one by (steps - 1) attack iterations, which unrolled_flops
  (the accelerator path) restores."""
  meta = bench.synthetic_meta((SIZE, SIZE, 3), 10)
  config = bench.bench_config(model="small_cnn", defense="none", batch=BATCH, pgd_steps=3,
                              eval_steps=1, dtype="float32", augment="none", unroll=1,
                              model_kwargs={"width": WIDTH})
  assert not bench.loop_is_unrolled(config.attack.unroll, 3)
  prepared = bench.Prepared(config, meta, abstract=True)
  rolled = bench.cost_flops(prepared.train_step.lower(prepared.state, *prepared.args(
      "train")).cost_analysis())
  unrolled, source = bench.unrolled_flops(config, meta, "train")
  assert source == "lowered_unrolled"  # XLA:CPU analyses lowered programs
  per_iteration = 2 * small_cnn_forward_flops(WIDTH, SIZE) * BATCH
  assert (unrolled - rolled) / (2 * per_iteration) == pytest.approx(1.0, rel=0.15)


def test_accelerator_flops_come_from_a_cpu_only_process():
  """On an accelerator the count is XLA:CPU's, taken in a subprocess (the CUDA
  plugin counts no lowered FLOPs and leaves cuDNN convolutions out of compiled
  ones); the subprocess gives this process's count."""
  meta = bench.synthetic_meta((SIZE, SIZE, 3), 10)
  config = bench.bench_config(model="small_cnn", defense="none", batch=BATCH, pgd_steps=2,
                              eval_steps=1, dtype="float32", augment="none", unroll=1,
                              model_kwargs={"width": WIDTH})
  here, _ = bench.unrolled_flops(config, meta, "train")
  assert bench.cpu_flops_in_subprocess(config, meta, "train") == pytest.approx(here, rel=1e-6)


def test_bfloat16_step_keeps_float32_master_weights_and_computes_in_bfloat16():
  meta = bench.synthetic_meta((SIZE, SIZE, 3), 10)
  config = bench.bench_config(model="wide_resnet", defense="none", batch=BATCH, pgd_steps=1,
                              eval_steps=1, dtype="bfloat16", augment="none",
                              model_kwargs={"depth": 10, "width": 1})
  prepared = bench.Prepared(config, meta, abstract=True)
  new_state, _ = jax.eval_shape(prepared.train_step, prepared.state, *prepared.args("train"))
  for tree in (new_state.params, new_state.batch_stats, new_state.opt_state):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  x = jnp.zeros((2, SIZE, SIZE, 3))
  out = jax.eval_shape(lambda v: prepared.model.apply(v, x, train=False),
                       {"params": prepared.state.params,
                        "batch_stats": prepared.state.batch_stats})
  assert out["logits"].dtype == jnp.float32
  assert {f.dtype for f in jax.tree.leaves(out["features"])} == {jnp.dtype(jnp.bfloat16)}
  hlo = prepared.train_step.lower(prepared.state, *prepared.args("train")).as_text()
  convs = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
  assert convs and all("bf16" in line for line in convs)


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}), ("wide_resnet", {"depth": 10, "width": 2}), ("small_cnn", {"width": 0.5})])
def test_torch_twin_computes_the_same_logits_with_the_same_parameters(name, kwargs):
  """Every Flax leaf lands in a twin tensor of the same shape (else KeyError),
  parameter counts agree, and logits agree for random weights and statistics."""
  torch = pytest.importorskip("torch")
  from benchmarks import bench_torch
  from jaxdef.models.registry import create_model
  model = create_model(name, num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                       **kwargs)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  variables = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  if "batch_stats" in variables:  # a valid variance
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, v: np.abs(v) + 0.5 if p[-1].key == "var" else v, variables["batch_stats"])
  twin = bench_torch.load_flax_variables(bench_torch.torch_twin(model, x.shape[1:]),
                                         variables).eval()
  with torch.no_grad():
    theirs = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  ours = jax.jit(model.apply)(variables, jnp.asarray(x))["logits"]
  chex.assert_trees_all_close(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
  assert sum(p.numel() for p in twin.parameters()) == sum(
      a.size for a in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("argv, field", [
    (["--model", "resnet9000"], "model"),
    (["--defense", "cas,bogus"], "defense"),
    (["--dtype", "float16"], "dtype"),
    (["--compare", "tensorflow"], "compare"),
    (["--torch_modes", "eager,turbo"], "torch_modes"),
    (["--iters", "0"], "iters"),
    (["--batch", "0"], "batch_size"),
])
def test_bad_flags_are_one_line_config_errors(argv, field):
  with pytest.raises(ConfigError, match=field) as err:
    bench.main(argv + ["--kind", "train"])
  assert "\n" not in str(err.value)


def test_torch_modes_reach_torch_compile():
  """--torch_modes: eager leaves the network as it is; every other mode is
  torch.compile's mode of that name ('default': torch.compile's own default)."""
  pytest.importorskip("torch")
  from benchmarks import bench_torch
  calls = []
  fake = lambda net, mode: calls.append(mode) or ("compiled", net)
  net = object()
  assert bench_torch.compiled(net, "eager", fake) is net and not calls
  for mode, passed in (("default", None), ("reduce-overhead", "reduce-overhead"),
                       ("max-autotune", "max-autotune")):
    assert bench_torch.compiled(net, mode, fake) == ("compiled", net)
    assert calls[-1] == passed
  with pytest.raises(ValueError, match="turbo"):
    bench_torch.compiled(net, "turbo", fake)


def test_default_mode_compiles_the_twin_for_real():
  """torch.compile's default mode (Inductor) on the WRN-10-1 twin: Dynamo
  captures it, and logits and input gradients equal eager's. (The small CNN
  is not used: on CPU, torch 2.13's Inductor returns zero input gradients
  through max_pool2d, which the bench's gradient check catches.)"""
  torch = pytest.importorskip("torch")
  from benchmarks import bench_torch
  from jaxdef.models.registry import create_model
  model = create_model("wide_resnet", num_classes=10, mean=(0.5,), std=(0.25,), depth=10,
                       width=1)
  twin = bench_torch.torch_twin(model, (8, 8, 3)).eval()
  fast = bench_torch.compiled(twin, "default")
  assert fast is not twin
  x = torch.rand(2, 3, 8, 8)
  check = bench_torch.gradient_check(fast, twin, x, torch.tensor([1, 2]))
  torch._dynamo.reset()
  assert check["matches_eager"] and check["max_abs_diff"] <= 1e-4 * check["max_abs"]
  assert check["max_abs"] > 0


def test_resnet50_twin_is_torchvisions_with_the_same_logits():
  """jaxdef's resnet50 runs against torchvision's own ResNet-50 (its weights
  through jaxdef.interop), behind the model's input normalisation."""
  torch = pytest.importorskip("torch")
  from benchmarks import bench_torch
  from benchmarks.torch_references import MissingReference, definitions
  try:
    definitions("torchvision.models.resnet")
  except MissingReference:
    pytest.skip("torchvision is not installed")
  from jaxdef.models.registry import create_model
  model = create_model("resnet50", num_classes=10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
  x = np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x))
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda s: rng.uniform(0.05, 0.15, s.shape).astype(np.float32), shapes)
  settings = bench_torch.TorchSettings("cpu", None, False)
  twin = bench_torch.prepare(model, variables, x.shape[1:], settings).eval()
  assert type(twin[1]).__name__ == "ResNet" and type(twin[1]).__module__.startswith("torchvision")
  with torch.no_grad():
    theirs = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  ours = jax.jit(model.apply)(variables, jnp.asarray(x))["logits"]
  chex.assert_trees_all_close(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
