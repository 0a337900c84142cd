"""The GPU remedies as options, checked on CPU: each reaches the program it changes.

* ``train.cast_params_once``: the attack's ``while`` loop reads weights already
  in the compute dtype (no kernel cast inside the loop body of the lowered
  step), with the same model outputs.
* rematerialisation (``model.kwargs remat=True``): the same outputs and
  gradients, the residual blocks checkpointed in the traced program.
* XLA command buffers: the GPU kit's ``XLA_FLAGS`` for a GPU backend, nothing
  on CPU (``benchmarks/gpu/kit.py``).
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bench

SIZE = 16
# A float32 -> bfloat16 convert of a convolution kernel (1x1 or 3x3) in StableHLO text.
KERNEL_CAST = re.compile(r"tensor<[13]x[13]x\d+x\d+xf32>\) -> tensor<[13]x[13]x\d+x\d+xbf16>")


def kernel_casts(stablehlo: str) -> tuple[int, int]:
  """(inside ``while`` bodies, elsewhere): kernel casts of a lowered module,
  following ``call``s into the functions they call."""
  funcs: dict[str, list[str]] = {}
  current = None
  for line in stablehlo.splitlines():
    m = re.match(r"\s*func\.func (?:public |private )?@([\w.\-$]+)", line)
    if m:
      current = m.group(1)
      funcs[current] = []
    if current is not None:
      funcs[current].append(line)
  counts = {True: 0, False: 0}

  def visit(lines: list[str], inside: bool) -> None:
    level, loops = 0, []  # brace depth; depths at which open while ops started
    for line in lines:
      in_loop = inside or bool(loops)
      if "stablehlo.convert" in line and KERNEL_CAST.search(line):
        counts[in_loop] += 1
      for callee in re.findall(r"call @([\w.\-$]+)", line):
        visit(funcs.get(callee, []), in_loop)
      if "stablehlo.while" in line:
        loops.append(level)
      level += line.count("{") - line.count("}")
      while loops and level <= loops[-1] and "}" in line:
        loops.pop()

  visit(funcs["main"], False)
  return counts[True], counts[False]


def lowered_steps(cast_params_once: bool) -> tuple[str, str]:
  """StableHLO of the bf16 train and eval steps of WRN-10-1 with a rolled PGD loop."""
  config = bench.bench_config(model="wide_resnet", defense="none", batch=4, pgd_steps=2,
                              eval_steps=2, dtype="bfloat16", augment="none", unroll=1,
                              model_kwargs={"depth": 10, "width": 1})
  config.train.cast_params_once = cast_params_once
  prepared = bench.Prepared(config, bench.synthetic_meta((SIZE, SIZE, 3), 10), abstract=True)
  return tuple(prepared.jitted(kind).lower(prepared.state, *prepared.args(kind)).as_text()
               for kind in ("train", "eval"))


def test_cast_params_once_takes_the_weight_casts_out_of_the_attack_loop():
  """WRN-10-1 has 9 convolutions: by default each PGD iteration casts their 9
  kernels to bfloat16 again; with the option the loop casts none, and the
  kernels are cast outside it (once for the attack, and where the train step's
  weight gradient needs float32 weights)."""
  for before, after in zip(lowered_steps(False), lowered_steps(True)):
    assert kernel_casts(before)[0] == 9
    inside, outside = kernel_casts(after)
    assert inside == 0 and outside in (9, 18)


def test_precast_params_keeps_outputs_and_leaves_float32_layers_alone():
  """WRN-10-1 with CAS in bfloat16: every convolution kernel and the head
  are cast, CAS's own linear layer (computed in float32) is not, and logits
  and CAS's auxiliary outputs are bit for bit the same."""
  from jaxdef.build import build
  from jaxdef.config import base_config
  from jaxdef.models.base import precast_params
  config = base_config()
  config.model.name, config.model.kwargs = "wide_resnet", {"depth": 10, "width": 1}
  config.defense.name, config.defense.kwargs = "cas", {"depth": 10}
  config.train.dtype = "bfloat16"
  model, _, _ = build(config, bench.synthetic_meta((SIZE, SIZE, 3), 10))
  x = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  # Positive values: a valid variance for every BatchNorm (no init to compile).
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.1, 0.3, s.shape), s.dtype),
                           shapes)
  cast = precast_params(lambda v: model.apply(v, x), variables)
  dtypes = {jax.tree_util.keystr(path): leaf.dtype
            for path, leaf in jax.tree_util.tree_leaves_with_path(cast["params"])}
  convs = [k for k in dtypes if "Conv_" in k and k.endswith("['kernel']")]
  assert len(convs) == 9 and all(dtypes[k] == jnp.bfloat16 for k in convs)
  assert dtypes["['head']['kernel']"] == jnp.bfloat16
  cas = [k for k in dtypes if "cas" in k.lower()]
  assert cas and all(dtypes[k] == jnp.float32 for k in cas)
  assert all(dtypes[k] == jnp.float32 for k in dtypes if "BatchNorm" in k)
  apply = jax.jit(model.apply)
  out = apply(variables, x)
  assert jnp.all(jnp.isfinite(out["logits"]))
  chex.assert_trees_all_equal(out, apply(cast, x))


def remat_pair(name: str, **kwargs):
  from jaxdef.models.registry import create_model
  return tuple(create_model(name, num_classes=10, mean=(0.5,), std=(0.25,), remat=remat,
                            **kwargs) for remat in (False, True))


@pytest.mark.parametrize("name, kwargs", [
    ("resnet18", {}), ("resnet50", {}), ("dm_wide_resnet", {"depth": 28, "width": 10})])
def test_remat_changes_no_parameter_path_or_shape(name, kwargs):
  """A checkpoint of the plain model restores into the rematerialised one."""
  plain, remat = remat_pair(name, **kwargs)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = [jax.eval_shape(m.init, jax.random.key(0), x) for m in (plain, remat)]
  chex.assert_trees_all_equal_shapes_and_dtypes(*shapes)
  assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(shapes[1])


def test_remat_keeps_outputs_and_gradients_and_reaches_the_program():
  """WRN-10-1 with ``remat=True``: the same logits and BatchNorm updates in
  training mode and the same gradients with respect to the weights and the
  input, and every residual block is a checkpointed call in the traced
  gradient (none without the option)."""
  plain, remat = remat_pair("wide_resnet", depth=10, width=1)
  x = jax.random.uniform(jax.random.key(1), (2, SIZE, SIZE, 3))
  shapes = jax.eval_shape(plain.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.uniform(0.1, 0.3, s.shape), s.dtype),
                           shapes)
  y = jnp.array([1, 2])

  def loss(model):
    def f(params, z):
      out, new = model.apply({**variables, "params": params}, z, train=True,
                             mutable=["batch_stats"])
      logp = jax.nn.log_softmax(out["logits"])
      return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1)), (out["logits"], new)
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

  results = [jax.jit(loss(m))(variables["params"], x) for m in (plain, remat)]
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)
  assert jnp.isfinite(results[0][0][0])
  jaxpr = str(jax.make_jaxpr(loss(remat))(variables["params"], x))
  blocks = len([k for k in variables["params"] if "Block" in k])
  assert blocks == 3
  assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= blocks
  assert "checkpoint[" not in str(jax.make_jaxpr(loss(plain))(variables["params"], x))


def test_model_remat_field_builds_the_rematerialised_model_or_refuses_in_one_line():
  """``model.remat=True`` (the config field a command line can set) reaches the
  model's constructor; a model without the option is one ConfigError line."""
  import ml_collections
  from jaxdef.build import DataMeta, build
  from jaxdef.config import base_config
  from jaxdef.errors import ConfigError
  meta = DataMeta("tiny", 10, (32, 32, 3), (0.5,) * 3, (0.25,) * 3)
  config = base_config()
  config.model = ml_collections.ConfigDict(dict(
      name="wide_resnet", kwargs={"depth": 10, "width": 1}, normalize=True, remat=True))
  assert build(config, meta)[0].remat
  config.model.remat = False
  assert not build(config, meta)[0].remat
  config.model = ml_collections.ConfigDict(dict(name="small_cnn", kwargs={}, remat=True))
  with pytest.raises(ConfigError, match="remat") as e:
    build(config, meta)
  assert "\n" not in str(e.value)


def test_command_buffer_flags_are_for_gpus_only():
  """The kit's XLA_FLAGS add the command buffer types to XLA:GPU's defaults;
  CPU and TPU runs get none, and nothing is probed off GPU."""
  from benchmarks.gpu import kit
  flags = kit.command_buffer_flags("gpu", ("CONVOLUTION", "WHILE", "CONDITIONAL"))
  assert flags == ("--xla_gpu_enable_command_buffer=+CONVOLUTION,+WHILE,+CONDITIONAL "
                   "--xla_gpu_graph_min_graph_size=1")
  assert kit.command_buffer_flags("cuda", ("WHILE",)).startswith(
      "--xla_gpu_enable_command_buffer=+WHILE ")
  for backend in ("cpu", "tpu"):
    assert kit.command_buffer_flags(backend, kit.COMMAND_BUFFER_TYPES) == ""
    assert kit.accepted_command_buffer_types(backend, kit.COMMAND_BUFFER_TYPES) == ()
  assert kit.command_buffer_flags("gpu", ()) == ""


def test_fit_search_keeps_the_largest_batch_that_does_not_run_out_of_memory():
  from benchmarks.gpu import kit
  tried = []

  def run(batch):
    tried.append(batch)
    if batch > 256:
      raise kit.BenchFailed("RESOURCE_EXHAUSTED", out_of_memory=True)
    return [{"batch": batch}]

  assert kit.first_fitting((256, 1024, 512, 128), run) == ([{"batch": 256}], [1024, 512])
  assert tried == [1024, 512, 256]
  assert kit.first_fitting((1024,), run) == ([], [1024])

  def broken(batch):
    raise kit.BenchFailed("bench exited 2: ConfigError", out_of_memory=False)

  with pytest.raises(kit.BenchFailed, match="ConfigError"):
    kit.first_fitting((64, 32), broken)
