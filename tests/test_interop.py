"""Models from PyTorch and back (jaxdef.interop, jaxdef import torch / jaxdef export).

The references are the real PyTorch definitions: RobustBench's architecture
modules (``pip install --no-deps robustbench==1.1.1``, as .ci/run does) and
torchvision's ResNet-50, loaded by benchmarks/torch_references.py. Small
depths and widths keep every case to a few seconds; the full sizes are
checked by parameter count.
"""

import json
import os
import sys

import chex
import flax.traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the reference models need the test extra")

from benchmarks import torch_references  # noqa: E402
from jaxdef import cli  # noqa: E402
from jaxdef.build import DataMeta, build  # noqa: E402
from jaxdef.config import base_config  # noqa: E402
from jaxdef.errors import ConfigError  # noqa: E402
from jaxdef.interop import (export_run, from_torch, import_run, parse_arch,  # noqa: E402
                            read_weights, to_torch)
from jaxdef.interop.architectures import FAMILIES, arch_of_model  # noqa: E402
from jaxdef.interop.convert import slots, variable_shapes  # noqa: E402
from jaxdef.interop.runs import refuse_defenses  # noqa: E402
from jaxdef.interop.tensors import unwrap  # noqa: E402
from jaxdef.models import create_model  # noqa: E402

RTOL = 1e-4  # the float32 tolerance, relative to the largest logit


# --arch -> the input size its reference runs at (small depths and widths).
SIZES = {"resnet18": 32, "preact_resnet18": 32, "preact_resnet18_v2": 32, "wrn-10-1": 32,
         "wrn-16-2": 32, "dm-wrn-10-1-swish": 32, "dm-wrn-16-2-relu": 32, "resnet50": 64}


def module_of(arch, **kwargs):
  try:
    return torch_references.torch_module(arch, **kwargs)
  except torch_references.MissingReference as e:
    pytest.skip(str(e))


def reference(arch, seed=0):
  """The PyTorch module of ``arch`` in eval mode with random weights and
  BatchNorm statistics (so that the statistics' mapping is tested too)."""
  torch.manual_seed(seed)
  module = module_of(arch)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return module.eval(), SIZES[arch]


def images(n, size, seed=0):
  """(n, size, size, 3) float32 images in [0, 1]."""
  return np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)


def torch_logits(module, x, mean=(0.0,), std=(1.0,)):
  """Logits of ``module`` on NHWC ``x``, normalised as jaxdef's model would."""
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  with torch.no_grad():
    return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def jax_logits(model, variables, x):
  return np.asarray(model.apply(variables, jnp.asarray(x), train=False)["logits"])


def assert_close(ours, ref):
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= RTOL * scale, (np.abs(ours - ref).max(), scale)


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", list(SIZES))
def test_imported_model_computes_the_pytorch_logits(arch):
  module, size = reference(arch)
  x = images(4, size)
  ref = torch_logits(module, x)  # [0, 1] images, as RobustBench feeds them
  model, variables = from_torch(module.state_dict(), arch)
  ours = jax_logits(model, variables, x)
  chex.assert_shape(ours, (4, 10))
  assert_close(ours, ref)


def random_variables(model, image_shape, seed=1):
  """Random params and BatchNorm statistics of ``model`` (numpy; no Flax init),
  scaled so that activations stay of order one through the depth."""
  rng = np.random.RandomState(seed)

  def draw(path, shape):
    if path[-1] in ("scale", "var"):
      return rng.uniform(0.5, 1.5, shape)
    if path[-1] in ("bias", "mean"):
      return rng.normal(0.0, 0.1, shape)
    return rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[:-1])), shape)
  flat = {k: jnp.asarray(draw(k, s), jnp.float32)
          for k, s in variable_shapes(model, image_shape).items()}
  return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("arch", list(SIZES))
def test_exported_weights_load_into_the_pytorch_class_and_round_trip(arch):
  module, size = reference(arch, seed=1)
  spec = parse_arch(arch)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  model = create_model(spec.model, num_classes=10, mean=mean, std=std, **dict(spec.kwargs))
  x = images(4, size, seed=1)
  variables = random_variables(model, (size, size, 3))
  exported_arch, tensors = to_torch(model, spec.model, variables)
  assert exported_arch == spec
  module.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  # The DeepMind class normalises inside; the others are fed normalised images.
  if spec.mean is not None:
    module.mean.copy_(torch.tensor(mean).view(3, 1, 1))
    module.std.copy_(torch.tensor(std).view(3, 1, 1))
    ref = torch_logits(module, x)
  else:
    ref = torch_logits(module, x, mean, std)
  assert_close(jax_logits(model, variables, x), ref)
  _, back = from_torch(tensors, arch, mean=mean, std=std)
  chex.assert_trees_all_equal(back, {k: variables[k] for k in ("params", "batch_stats")})


@pytest.mark.parametrize("arch,published,size", [
    ("resnet50", 25.6e6, 224), ("wrn-28-10", 36.5e6, 32), ("dm-wrn-70-16-swish", 267e6, 32)])
def test_full_sizes_have_the_published_parameter_counts(arch, published, size):
  """Counted from shapes alone (jax.eval_shape); the key table names each variable once."""
  spec = parse_arch(arch)
  classes = 1000 if arch == "resnet50" else 10
  model = create_model(spec.model, num_classes=classes, mean=(0.0,), std=(1.0,),
                       **dict(spec.kwargs))
  shapes = variable_shapes(model, (size, size, 3))
  count = sum(int(np.prod(s)) for k, s in shapes.items() if k[0] == "params")
  assert abs(count - published) / published < 0.003, count
  table = slots(model, FAMILIES[spec.family])
  assert sorted((s.collection, *s.path) for s in table.values()) == sorted(shapes)


def test_wrapped_checkpoints_are_unwrapped():
  module, _ = reference("wrn-10-1")
  plain = state_dict(module)
  for wrapped in ({"state_dict": {f"module.{k}": v for k, v in plain.items()}, "epoch": 3},
                  {"model": {f"model.{k}": v for k, v in plain.items()}},
                  {f"module.{k}": v for k, v in plain.items()}):
    got = unwrap(wrapped)
    assert sorted(got) == sorted(plain)
    chex.assert_trees_all_equal(got, plain)


def test_unused_sub_block1_of_trades_checkpoints_is_dropped():
  module, _ = reference("wrn-10-1")
  tensors = state_dict(torch_references.robustbench("wide_resnet").WideResNet(
      depth=10, widen_factor=1, sub_block1=True))
  assert any(k.startswith("sub_block1.") for k in tensors)
  tensors.update(state_dict(module))
  model, variables = from_torch(tensors, "wrn-10-1")
  x = images(2, 32)
  assert_close(jax_logits(model, variables, x), torch_logits(module, x))


def test_missing_unexpected_and_wrong_shaped_tensors_are_refused_in_one_line():
  tensors = state_dict(reference("wrn-10-1")[0])
  del tensors["block2.layer.0.conv1.weight"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  tensors["fc.weight"] = tensors["fc.weight"][:, :8]
  with pytest.raises(ConfigError) as e:
    from_torch(tensors, "wrn-10-1", what="w.safetensors")
  line = str(e.value)
  print(line)
  assert "\n" not in line
  assert line.startswith("w.safetensors does not fit --arch wrn-10-1 (WideResNet(depth=10, "
                         "widen_factor=1), 10 classes): ")
  assert "1 missing (block2.layer.0.conv1.weight)" in line
  assert "1 unexpected (extra.weight)" in line
  assert "1 wrong-shaped (fc.weight (10, 8) where (10, 64))" in line


def test_a_wrong_architecture_is_refused_with_counts():
  tensors = state_dict(reference("wrn-10-1")[0])
  with pytest.raises(ConfigError) as e:
    from_torch(tensors, "dm-wrn-10-1-swish")
  assert "39 missing (init_conv.weight, " in str(e.value)
  assert "unexpected (conv1.weight, " in str(e.value)
  with pytest.raises(ConfigError, match=r"unknown --arch 'wrn-28' \(valid: resnet18, "):
    parse_arch("wrn-28")


class RunsCode:
  """Unpickling this calls os.system: what a malicious checkpoint does."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pt"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": RunsCode(marker)},
             path)
  with pytest.raises(ConfigError) as e:
    read_weights(str(path))
  print(e.value)
  assert str(e.value).startswith(f"refused {path}: it holds pickled objects other than tensors")
  assert "\n" not in str(e.value)
  assert not marker.exists()
  with open(path, "rb") as f:  # the same file does run code when unpickled plainly
    assert b"system" in f.read()


def test_files_that_are_not_checkpoints_get_one_line(tmp_path, monkeypatch):
  import safetensors.numpy
  good = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({"a": np.ones(4, np.float32)}, str(good))
  truncated = tmp_path / "cut.safetensors"
  truncated.write_bytes(good.read_bytes()[:-3])
  text = tmp_path / "notes.pt"
  text.write_text("not a checkpoint")
  listed = tmp_path / "list.pt"
  torch.save([torch.zeros(2)], listed)
  other = tmp_path / "w.onnx"
  other.write_bytes(b"x")
  cases = {truncated: "is not a readable safetensors file (",
           text: "is not a PyTorch checkpoint (",
           listed: "holds a list, not a state dict",
           tmp_path / "absent.safetensors": "no such file",
           other: "unknown checkpoint format '.onnx'"}
  for path, message in cases.items():
    with pytest.raises(ConfigError) as e:
      read_weights(str(path))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  # Without PyTorch a pickle gets the command that converts it.
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ConfigError, match=r"is a PyTorch pickle, .* convert it where PyTorch is: "
                                        r"python -c"):
    read_weights(str(listed))


def _config(**fields):
  config = base_config()
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


@pytest.mark.parametrize("fields,message", [
    (dict(defense__name="cas"), "defense 'cas' adds modules at stage4.0, stage4.1"),
    (dict(defense__name="fsr"), "defense 'fsr' adds modules at stage4"),
    (dict(eval__transform="nip"), "test-time transform 'nip'"),
])
def test_defenses_without_a_pytorch_counterpart_are_refused(fields, message):
  config = _config(**fields)
  model, _, _ = build(config, DataMeta("cifar10", 10, (32, 32, 3), (0.0,), (1.0,)))
  with pytest.raises(ConfigError, match=message):
    refuse_defenses(config, model)
  with pytest.raises(ConfigError, match="model 'pssr' .* has no PyTorch counterpart"):
    refuse_defenses(_config(model__name="pssr"), model)
  small = create_model("small_cnn", num_classes=10, mean=(0.0,), std=(1.0,))
  with pytest.raises(ConfigError, match="model 'small_cnn' has no PyTorch counterpart"):
    arch_of_model(small, "small_cnn")


def test_import_then_eval_and_export_from_the_command_line(tmp_path, capsys, monkeypatch):
  """jaxdef import torch -> jaxdef eval (its clean accuracy is the PyTorch
  module's agreement with the labels) -> jaxdef export (the original tensors)."""
  monkeypatch.setenv("JAXDEF_COMPILATION_CACHE", "off")
  module, _ = reference("wrn-10-1")
  import safetensors.torch
  weights = tmp_path / "wrn.safetensors"
  safetensors.torch.save_file(module.state_dict(), str(weights))
  x = (images(12, 32, seed=3) * 255).astype(np.uint8)
  predicted = torch_logits(module, x.astype(np.float32) / 255).argmax(1)
  y_test = np.where(np.arange(12) < 9, predicted, (predicted + 1) % 10)  # 9 of 12 agree
  np.savez(tmp_path / "data.npz", x_train=x[:10], y_train=np.arange(10), x_test=x,
           y_test=y_test)
  workdir = str(tmp_path / "run")
  assert cli.run(["import", "torch", "--arch", "wrn-10-1", "--weights", str(weights),
                  "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  print(out)
  assert "model wide_resnet(depth=10, width=1): 0.08M parameters, 10 classes" in out
  assert cli.run(["import", "torch", "--arch", "wrn-10-1", "--weights", str(weights),
                  "--workdir", workdir]) == 2
  assert capsys.readouterr().err.strip() == (f"error: {workdir!r} already holds a run; import "
                                             f"into a new --workdir")
  assert cli.run(["eval", "--workdir", workdir, "--config.data.name=npz",
                  f"--config.data.path={tmp_path / 'data.npz'}",
                  "--config.eval.num_examples=12", "--config.eval.batch_size=12",
                  "--config.eval.attacks=clean,pgd3", "--config.eval.masking_checks=False",
                  "--config.eval.attention=False", "--config.eval.unit_test=off"]) == 0
  capsys.readouterr()
  results = [os.path.join(r, "results.json") for r, _, files in os.walk(workdir)
             if "results.json" in files]
  with open(results[0]) as f:
    scored = json.load(f)
  assert scored["clean"] == pytest.approx(9 / 12)
  assert scored["ensemble"] <= scored["clean"]
  exported = tmp_path / "back.safetensors"
  assert cli.run(["export", "--workdir", workdir, "--to", "torch", str(exported)]) == 0
  tensors, metadata = read_weights(str(exported))
  assert metadata["jaxdef.arch"] == "wrn-10-1" and metadata["jaxdef.checkpoint_step"] == "0"
  assert json.loads(metadata["jaxdef.mean"]) == [0.0, 0.0, 0.0]
  original = {k: v for k, v in state_dict(module).items() if "num_batches" not in k}
  chex.assert_trees_all_equal({k: v for k, v in tensors.items() if k in original}, original)
  assert cli.run(["export", "--workdir", workdir, "--to", "onnx", "x.safetensors"]) == 2
  assert capsys.readouterr().err.count("\n") == 1


def test_export_of_an_imported_run_keeps_its_normalisation(tmp_path):
  module, _ = reference("dm-wrn-10-1-swish")
  import safetensors.torch
  weights = tmp_path / "dm.safetensors"
  safetensors.torch.save_file(module.state_dict(), str(weights))
  done = import_run(str(weights), "dm-wrn-10-1-swish", str(tmp_path / "a"),
                    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  assert done["mean"] == (0.5, 0.5, 0.5)
  export_run(str(tmp_path / "a"), str(tmp_path / "dm2.safetensors"))
  # Re-imported without --mean/--std: the file's metadata gives them.
  again = import_run(str(tmp_path / "dm2.safetensors"), "dm-wrn-10-1-swish", str(tmp_path / "b"))
  assert again["mean"] == (0.5, 0.5, 0.5) and again["std"] == (0.25, 0.25, 0.25)
