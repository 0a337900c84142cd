"""Specification of the model zoo: architectures, tap points, inserts, dtypes.

Full-size networks are checked abstractly (``jax.eval_shape`` of init +
apply, no FLOPs); behaviour is checked by real forward passes on small
variants (WRN-10-1, a post-activation ResNet of the same size, the small
CNN).
"""

import functools
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdef.errors import ConfigError
from jaxdef.models.base import Insert, perturbation_zeros, split_variables
from jaxdef.models.registry import create_model, model_names
from jaxdef.models.resnet import ResidualNetwork, ResidualSpec

N = 2
NUM_CLASSES = 10
CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
IMAGENET = (224, 224, 3)
STATS = {CIFAR: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
         MNIST: ((0.1307,), (0.3081,)),
         IMAGENET: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def make(name, shape=CIFAR, **kwargs):
  mean, std = STATS[shape]
  return create_model(name, num_classes=NUM_CLASSES, mean=mean, std=std,
                      **kwargs)


@functools.cache
def abstract_run(name, shape=CIFAR):
  """(variables, output) of init + apply as shapes only."""
  model = make(name, shape)

  def init_and_apply(key, x):
    variables = model.init(key, x)
    return variables, model.apply(variables, x)
  return jax.eval_shape(init_and_apply, jax.random.key(0),
                        jax.ShapeDtypeStruct((N, *shape), jnp.float32))


class TinyResNet(ResidualNetwork):
  """ResNet-18's post-activation code path at WRN-10-1's size.

  Same kernel shapes as WRN-10-1, so the two share compiled initialisers.
  """
  spec: ClassVar[ResidualSpec] = ResidualSpec(16, (16, 32, 64), (1, 2, 2), 1,
                                               preact=False)


@functools.cache
def tiny(kind):
  """(model, variables, x) of a small variant, initialised once.

  ``variables`` holds params and batch_stats only (what a train state keeps);
  ``init``'s perturbation zeros are tied to its batch size.
  """
  if kind == "tiny_resnet":
    mean, std = STATS[CIFAR]
    model = TinyResNet(num_classes=NUM_CLASSES, mean=mean, std=std)
  elif kind == "wrn10_1":
    model = make("wide_resnet", depth=10, width=1)
  else:
    model = make(kind)
  x = jax.random.uniform(jax.random.key(0), (N, *CIFAR))
  params, batch_stats = split_variables(model.init(jax.random.key(1), x))
  return model, {"params": params, "batch_stats": batch_stats}, x


def stage_taps(blocks, shapes):
  taps = {}
  for s, shape in enumerate(shapes, start=1):
    taps.update({f"stage{s}.{b}": shape for b in range(blocks)})
    taps[f"stage{s}"] = shape
  return taps


RESNET18_TAPS = {
    "stem": (32, 32, 64),
    **stage_taps(2, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)]),
    "penultimate": (512,),
}
RESNET50_TAPS = {  # at 224x224: 3, 4, 6, 3 bottleneck blocks
    "stem": (56, 56, 64), "penultimate": (2048,),
    **{name: shape for blocks, s, shape in zip((3, 4, 6, 3), range(1, 5),
                                                [(56, 56, 256), (28, 28, 512), (14, 14, 1024),
                                                 (7, 7, 2048)])
       for name in [f"stage{s}", *(f"stage{s}.{b}" for b in range(blocks))]},
}
DM_WRN28_10_TAPS = {
    "stem": (32, 32, 16),
    **stage_taps(4, [(32, 32, 160), (16, 16, 320), (8, 8, 640)]),
    "final": (8, 8, 640),
    "penultimate": (640,),
}
WRN34_10_TAPS = {
    "stem": (32, 32, 16),
    **stage_taps(5, [(32, 32, 160), (16, 16, 320), (8, 8, 640)]),
    "final": (8, 8, 640),
    "penultimate": (640,),
}
VGG16_TAPS = {
    "block1.conv0": (32, 32, 64), "block1.conv1": (32, 32, 64),
    "block1": (32, 32, 64),
    "block2.conv0": (16, 16, 128), "block2.conv1": (16, 16, 128),
    "block2": (16, 16, 128),
    "block3.conv0": (8, 8, 256), "block3.conv1": (8, 8, 256),
    "block3.conv2": (8, 8, 256), "block3": (8, 8, 256),
    "block4.conv0": (4, 4, 512), "block4.conv1": (4, 4, 512),
    "block4.conv2": (4, 4, 512), "block4": (4, 4, 512),
    "block5.conv0": (2, 2, 512), "block5.conv1": (2, 2, 512),
    "block5.conv2": (2, 2, 512), "block5": (2, 2, 512),
    "penultimate": (512,),
}
SMALL_CNN_CIFAR_TAPS = {
    "conv1": (30, 30, 32), "conv2": (28, 28, 32), "pool1": (14, 14, 32),
    "conv3": (12, 12, 64), "conv4": (10, 10, 64), "pool2": (5, 5, 64),
    "fc1": (200,), "fc2": (200,), "penultimate": (200,),
}
SMALL_CNN_MNIST_TAPS = {
    "conv1": (26, 26, 32), "conv2": (24, 24, 32), "pool1": (12, 12, 32),
    "conv3": (10, 10, 64), "conv4": (8, 8, 64), "pool2": (4, 4, 64),
    "fc1": (200,), "fc2": (200,), "penultimate": (200,),
}


# --- registry ---------------------------------------------------------------

def test_registry_offers_every_architecture():
  assert set(model_names()) >= {"small_cnn", "resnet18", "preact_resnet18",
                                "wide_resnet", "wrn34_10", "vgg16"}


def test_unknown_model_name_raises_config_error_listing_valid_names():
  with pytest.raises(ConfigError, match="unknown model 'nope'") as err:
    make("nope")
  assert all(name in str(err.value) for name in model_names())


@pytest.mark.parametrize("depth", [12, 33, 4])
def test_wide_resnet_depth_must_be_6n_plus_4(depth):
  with pytest.raises(ConfigError, match="6n \\+ 4"):
    make("wide_resnet", depth=depth)


# --- architectures at full size (abstract) ----------------------------------

@pytest.mark.parametrize("name,shape", [(name, CIFAR) for name in model_names()]
                         + [("small_cnn", MNIST)])
def test_logits_are_float32_with_one_column_per_class(name, shape):
  _, out = abstract_run(name, shape)
  chex.assert_shape(out["logits"], (N, NUM_CLASSES))
  assert out["logits"].dtype == jnp.float32


@pytest.mark.parametrize("name,shape,expected", [
    ("resnet18", CIFAR, RESNET18_TAPS),
    ("preact_resnet18", CIFAR, {**RESNET18_TAPS, "final": (4, 4, 512)}),
    ("wrn34_10", CIFAR, WRN34_10_TAPS),
    ("wide_resnet", CIFAR, WRN34_10_TAPS),  # 34-10 is the default
    ("dm_wide_resnet", CIFAR, DM_WRN28_10_TAPS),  # 28-10 is the default
    ("resnet50", IMAGENET, RESNET50_TAPS),
    ("vgg16", CIFAR, VGG16_TAPS),
    ("small_cnn", CIFAR, SMALL_CNN_CIFAR_TAPS),
    ("small_cnn", MNIST, SMALL_CNN_MNIST_TAPS),
])
def test_tap_points_have_documented_names_and_shapes(name, shape, expected):
  _, out = abstract_run(name, shape)
  actual = {k: v.shape for k, v in out["features"].items()}
  assert actual == {k: (N, *v) for k, v in expected.items()}


@pytest.mark.parametrize("name,shape,count", [
    ("resnet18", CIFAR, 11_173_962),
    ("preact_resnet18", CIFAR, 11_172_170),
    ("wrn34_10", CIFAR, 46_160_474),
    ("dm_wide_resnet", CIFAR, 36_479_194),   # WRN-28-10
    ("resnet50", IMAGENET, 23_528_522),      # torchvision's 25_557_032 with 1000 classes
    ("vgg16", CIFAR, 14_724_042),
    ("small_cnn", MNIST, 312_202),
])
def test_parameter_counts_match_reference_architectures(name, shape, count):
  variables, _ = abstract_run(name, shape)
  assert sum(p.size for p in jax.tree.leaves(variables["params"])) == count


def test_convolutions_followed_by_batchnorm_have_no_bias():
  variables, _ = abstract_run("resnet18")
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(variables["params"])]
  assert not [p for p in paths if "Conv" in p and "bias" in p]


# --- behaviour on small variants --------------------------------------------

@pytest.mark.parametrize("kind", ["wrn10_1", "tiny_resnet", "small_cnn"])
def test_small_variants_give_finite_float32_logits(kind):
  model, variables, x = tiny(kind)
  logits = model.apply(variables, x)["logits"]
  chex.assert_shape(logits, (N, NUM_CLASSES))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", ["wide_resnet", "dm_wide_resnet"])
def test_zero_logits_start_the_classifier_at_zero_and_only_it(name):
  """``zero_logits=True``: the head's kernel is zero at init, so every logit is 0
  (the bias starts at 0 anyway); every other parameter is initialised as without
  the option, and the default head is not zero."""
  x = jax.random.uniform(jax.random.key(1), (N, 32, 32, 3))
  build = lambda zero: create_model(name, num_classes=NUM_CLASSES, mean=(0.5,),
                                    std=(0.25,), depth=10, width=1, zero_logits=zero)
  plain, zero = (build(z).init(jax.random.key(0), x) for z in (False, True))
  assert np.all(zero["params"]["head"]["kernel"] == 0)
  assert np.any(plain["params"]["head"]["kernel"] != 0)
  chex.assert_trees_all_equal(build(True).apply(zero, x)["logits"], jnp.zeros((N, NUM_CLASSES)))
  strip = lambda v: {k: p for k, p in v["params"].items() if k != "head"}
  chex.assert_trees_all_equal(strip(plain), strip(zero))


@pytest.mark.parametrize("kind", ["wrn10_1", "tiny_resnet"])
def test_train_mode_updates_batch_stats(kind):
  model, variables, x = tiny(kind)
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(state["batch_stats"])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


@pytest.mark.parametrize("kind", ["wrn10_1", "tiny_resnet"])
def test_eval_mode_is_deterministic_and_per_example(kind):
  model, variables, x = tiny(kind)
  first = model.apply(variables, x)["logits"]  # immutable variables suffice
  chex.assert_trees_all_equal(first, model.apply(variables, x)["logits"])
  alone = model.apply(variables, x[:1])["logits"]
  chex.assert_trees_all_close(alone, first[:1], atol=1e-5)


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits():
  f32_model, variables, x = tiny("wrn10_1")
  model = f32_model.clone(dtype=jnp.bfloat16)
  initial = jax.eval_shape(model.init, jax.random.key(0), x)
  for collection in ("params", "batch_stats"):
    assert {v.dtype for v in jax.tree.leaves(initial[collection])} == {
        jnp.dtype(jnp.float32)}
  out = model.apply(variables, x)
  assert out["logits"].dtype == jnp.float32
  assert out["features"]["stage3"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["logits"],
                             f32_model.apply(variables, x)["logits"],
                             rtol=0.05, atol=0.05)


# --- defense inserts ----------------------------------------------------------

class Gate(nn.Module):
  """Toy defense: a learnable scalar gate, initialised closed (0)."""

  @nn.compact
  def __call__(self, h, *, train, labels):
    gate = self.param("gate", nn.initializers.zeros, ())
    return h * gate.astype(h.dtype), {"train": train, "labels": labels}


def gated(kind, point):
  """``tiny(kind)`` with a closed :class:`Gate` inserted at ``point``."""
  model, variables, x = tiny(kind)
  model = model.clone(insert=Insert(points=(point,),
                                    make=lambda p: Gate(name=f"gate_{p}")))
  gate_params = jax.eval_shape(model.init, jax.random.key(0), x)["params"][
      f"gate_{point}"]
  params = {**variables["params"],
            f"gate_{point}": jax.tree.map(jnp.zeros_like, gate_params)}
  return model, {**variables, "params": params}, x


def test_insert_at_alias_is_applied_before_the_rest_of_the_network():
  model, variables, x = gated("wrn10_1", "stage2")
  out = model.apply(variables, x)
  chex.assert_trees_all_equal(out["features"]["stage2"],
                              jnp.zeros_like(out["features"]["stage2"]))
  # Everything after a closed gate is input-independent.
  chex.assert_trees_all_close(out["logits"],
                              model.apply(variables, 1 - x)["logits"])


def test_insert_receives_train_flag_and_labels():
  model, variables, x = gated("small_cnn", "penultimate")
  labels = jnp.arange(N)
  out = model.apply(variables, x, labels=labels)
  assert set(out["aux"]) == {"penultimate"}
  assert out["aux"]["penultimate"]["train"] is False
  chex.assert_trees_all_equal(out["aux"]["penultimate"]["labels"], labels)
  out = model.apply(variables, x, train=True, labels=labels)
  assert out["aux"]["penultimate"]["train"] is True


def test_insert_at_unknown_point_raises_listing_valid_points():
  model, _, x = tiny("small_cnn")
  model = model.clone(insert=Insert(points=("stage9",), make=Gate))
  with pytest.raises(ValueError, match="stage9") as err:
    jax.eval_shape(model.init, jax.random.key(0), x)
  assert "valid points" in str(err.value) and "'fc2'" in str(err.value)


# --- gradients at tap points --------------------------------------------------

def test_perturbation_zeros_cover_each_primary_tap_point_once():
  model, variables, x = tiny("wrn10_1")
  zeros = perturbation_zeros(model, variables, x)
  assert set(zeros) == {"stem", "stage1.0", "stage2.0", "stage3.0", "final",
                        "penultimate"}
  chex.assert_shape(zeros["final"], (N, 8, 8, 64))


def test_zero_perturbations_leave_the_output_unchanged():
  model, variables, x = tiny("wrn10_1")
  zeros = perturbation_zeros(model, variables, x)
  chex.assert_trees_all_equal(
      model.apply({**variables, "perturbations": zeros}, x),
      model.apply(variables, x))


def logit_sum_grads(model, variables, x):
  """d(sum of logits)/d(activation) at every primary tap point."""
  def logit_sum(perturbations):
    out = model.apply({**variables, "perturbations": perturbations}, x)
    return out["logits"].sum()
  return jax.grad(logit_sum)(perturbation_zeros(model, variables, x))


def test_perturbation_gradient_at_penultimate_is_head_kernel_row_sum():
  model, variables, x = tiny("small_cnn")
  grads = logit_sum_grads(model, variables, x)
  row_sum = variables["params"]["head"]["kernel"].sum(axis=1)
  chex.assert_trees_all_close(grads["fc2"], jnp.broadcast_to(row_sum, (N, 200)),
                              rtol=1e-5, atol=1e-7)


def test_perturbation_gradient_before_pooling_spreads_head_evenly():
  model, variables, x = tiny("wrn10_1")
  grads = logit_sum_grads(model, variables, x)
  row_sum = variables["params"]["head"]["kernel"].sum(axis=1)
  chex.assert_trees_all_close(
      grads["final"], jnp.broadcast_to(row_sum / 64, (N, 8, 8, 64)),
      rtol=1e-5, atol=1e-7)
