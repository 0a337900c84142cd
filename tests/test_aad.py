"""AAD (docs/methods.md section 3): Grad-CAM, its losses, StepLL, the trainer hooks, a run."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import tiny_config

from jaxdef import saliency
from jaxdef.defenses import aad, create_defense
from jaxdef.defenses.base import Defense, apply_fn
from jaxdef.models import create_model
from jaxdef.objectives import create_objective
from jaxdef.train.state import init_train_state
from jaxdef.train.step import AttackBudget, adversarial_examples, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
N = 4


def grad_cam(model, variables, x, y, layer, resize=True):
  """:func:`jaxdef.saliency.grad_cam`, jitted (eager second-order calls are slow)."""
  fn = jax.jit(lambda v, z, t: saliency.grad_cam(model, v, z, t, layer, resize=resize))
  return fn(variables, x, y)


@pytest.fixture(scope="module")
def cnn():
  """A quarter-width small CNN on MNIST-sized inputs, its variables and a batch."""
  model = create_model("small_cnn", num_classes=10, mean=(0.5,), std=(0.5,), width=0.25)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  x = jax.random.uniform(jax.random.key(1), (N, 28, 28, 1))
  y = jnp.arange(N, dtype=jnp.int32)
  return model, variables, x, y


def test_grad_cam_cells_sum_to_one_and_maps_have_the_input_size(cnn):
  model, variables, x, y = cnn
  cells = grad_cam(model, variables, x, y, "conv4", resize=False)
  maps = grad_cam(model, variables, x, y, "conv4")
  chex.assert_shape(cells, (N, 8, 8))
  chex.assert_shape(maps, (N, 28, 28))
  np.testing.assert_allclose(jnp.sum(cells, axis=(1, 2)), 1.0, rtol=1e-5)
  assert bool(jnp.all(cells > 0))


def test_grad_cam_auto_layer_is_the_deepest_map_of_at_least_8x8_cells(cnn):
  model, variables, x, y = cnn
  features = model.apply(variables, x)["features"]
  assert saliency.resolve_layer(features, "auto") == "conv4"
  with pytest.raises(ValueError, match="not a 4-D tap point"):
    saliency.resolve_layer(features, "fc1")


def test_grad_cam_of_an_alias_is_that_of_its_tap_point():
  model = create_model("wide_resnet", num_classes=10, mean=(0.5,), std=(0.5,), depth=10,
                       width=1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  y = jnp.array([3, 5])
  alias = grad_cam(model, variables, x, y, "stage2", resize=False)
  primary = grad_cam(model, variables, x, y, "stage2.0", resize=False)
  chex.assert_trees_all_close(alias, primary)
  assert float(jnp.std(primary)) > 0  # not the uniform map of a zero gradient


def test_attention_iou_is_one_for_equal_maps_and_zero_for_disjoint_regions():
  left = jnp.zeros((1, 4, 4)).at[:, :, :2].set(1.0)
  right = jnp.zeros((1, 4, 4)).at[:, :, 2:].set(1.0)
  assert float(saliency.attention_iou(left, left)[0]) == 1.0
  assert float(saliency.attention_iou(left, right)[0]) == 0.0


def test_preservation_loss_is_zero_for_identical_inputs_and_has_a_parameter_gradient(cnn):
  model, variables, x, y = cnn

  def preservation(params, x_adv):
    apply = apply_fn(model, {"params": params}, train=True)
    return jnp.mean(aad.attention_loss(apply, x, x_adv, y, layer="conv4", rect_weight=0.0,
                                       pres_weight=1.0))

  assert float(jax.jit(preservation)(variables["params"], x)) == 0.0
  grads = jax.jit(jax.grad(preservation))(variables["params"], jnp.clip(x + 0.2, 0.0, 1.0))
  assert float(optax.tree.norm(grads)) > 0.0  # second order: through Grad-CAM's gradient


def test_step_ll_moves_towards_the_least_likely_class_and_stays_in_the_eps_ball(cnn):
  model, variables, x, y = cnn
  forward = apply_fn(model, variables, train=False)
  eps = 0.1
  x_adv = aad.step_ll(forward, x, eps=eps, key=jax.random.key(0))
  before = forward(x)["logits"]
  target = jnp.argmin(before, axis=-1)
  log_p = lambda logits: jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], -1)
  assert bool(jnp.all(log_p(forward(x_adv)["logits"]) > log_p(before)))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_strong_sample_selection_reapplies_only_while_the_iou_is_above_threshold(cnn):
  model, variables, x, y = cnn
  forward = apply_fn(model, variables, train=False)
  again = lambda z: z + 0.01
  select = jax.jit(lambda threshold: aad.select_strong(forward, x, y, x, again, layer="conv4",
                                                       threshold=threshold, extra=3))
  chex.assert_trees_all_close(select(-1.0), x + 0.03, atol=1e-6)  # always above: 3 more
  chex.assert_trees_all_close(select(1.1), x)                     # never above: none


def test_aad_defaults_follow_the_paper():
  d = create_defense("aad")
  assert (d.objective_weight, d.updates_per_batch, d.needs_clean_pass) == (8.0, 2, True)
  assert d.generate is not None and d.model_loss is not None
  assert create_defense("aad", generator="pgd", iterated=False).generate is None


def _step_and_state(defense, cnn, objective="at"):
  model, variables, _, _ = cnn
  tx = optax.sgd(optax.piecewise_constant_schedule(0.1, {1: 0.1}), momentum=0.9)
  state = init_train_state(model, tx, jax.random.key(0), image_shape=(28, 28, 1))
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=create_objective(objective), defense=defense,
      budget=AttackBudget(eps=0.3, step_size=0.1, steps=2), augment="none", ema_decay=0.0,
      seed=0))
  images = jax.random.randint(jax.random.key(2), (8, 28, 28, 1), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(8, dtype=jnp.int32) % 10
  return step(state, images, labels)


@pytest.fixture(scope="module")
def default_step(cnn):
  """``(state, metrics)`` after one step of the default (PGD-AT, no defense) trainer."""
  return _step_and_state(Defense(name="none"), cnn)


def test_default_defense_fields_leave_the_training_step_unchanged(cnn, default_step):
  """Neutral hooks (the PGD generator passed explicitly, a zero model loss,
  weight 1, one update) give exactly the default step."""
  objective = create_objective("at")
  plain = Defense(name="none")
  assert (plain.generate, plain.updates_per_batch, plain.objective_weight,
          plain.model_loss) == (None, 1, 1.0, None)

  def pgd(forward, x, y, key, budget, step, x_start):
    return adversarial_examples(forward, x, y, key, objective=objective, defense=plain,
                                budget=budget, step=step)

  neutral = Defense(name="neutral", generate=pgd, objective_weight=1.0,
                    model_loss=lambda apply, x, x_adv, y: jnp.zeros(y.shape))
  chex.assert_trees_all_equal(default_step, _step_and_state(neutral, cnn))


def test_two_updates_per_batch_advance_step_and_schedule_once(cnn, default_step):
  one, _ = default_step
  two, metrics = _step_and_state(Defense(name="none", updates_per_batch=2), cnn)
  assert int(two.step) == 1 and int(optax.tree_utils.tree_get(two.opt_state, "count")) == 1
  assert bool(metrics["finite"])
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, two.params)
  assert max(jax.tree.leaves(diff)) > 0  # the second update did happen


def test_aad_training_step_on_8_devices_equals_1_device(tmp_path):
  # Both processes at once: compilation is mostly single-threaded.
  procs = {devices: subprocess.Popen(
      [sys.executable, os.path.join(HERE, "helpers", "aad_step.py"),
       str(tmp_path / f"aad_{devices}.npz")],
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for devices in (1, 8)}
  saved = {}
  for devices, proc in procs.items():
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    with np.load(tmp_path / f"aad_{devices}.npz") as f:
      saved[devices] = {k: f[k] for k in f.files}
  assert int(saved[1].pop("devices")) == 1 and int(saved[8].pop("devices")) == 8
  chex.assert_trees_all_close(saved[1], saved[8], rtol=1e-4, atol=1e-5)


def test_aad_run_trains_and_its_evaluation_reports_attention(tmp_path):
  from jaxdef.evaluate import default_eval_config, evaluate_workdir
  from jaxdef.train.loop import train_and_evaluate
  config = tiny_config(**{"defense.name": "aad", "defense.kwargs": {"iterated": False},
                          "train.epochs": 1, "train.optimizer.lr": 0.01})
  summary = train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary["defense"] == "aad" and summary["skipped_nonfinite_steps"] == 0
  config.eval = default_eval_config(0.3)
  config.eval.update(attacks="clean", masking_checks=False, num_examples=16, batch_size=16)
  config.eval.attention_examples = 4
  config.eval.compare_workdir = str(tmp_path)  # itself as the baseline: two rows of maps
  results = evaluate_workdir(str(tmp_path), config)
  runs = results["attention"]["runs"]
  assert set(runs) == {"this run", "baseline"} and runs["this run"]["layer"] == "auto"
  assert 0.0 <= runs["this run"]["mean_iou"] <= 1.0
  assert os.path.getsize(results["attention"]["png"]) > 1000
  # Results go to a folder per checkpoint step and eval config, with their provenance.
  import json
  from jaxdef import checkpoint as ckpt
  from jaxdef.evaluate.report import latest_results
  prov = results["provenance"]
  assert prov["checkpoint_step"] == summary["steps"] and prov["jaxdef_version"]
  assert prov["config_hash"] == ckpt.config_hash(ckpt.read_run_config(str(tmp_path))[0])
  folder = tmp_path / "eval" / f"step_{summary['steps']}_{prov['eval_config_hash']}"
  assert latest_results(str(tmp_path)) == str(folder / "results.json")
  saved = json.loads((folder / "results.json").read_text())
  assert saved["provenance"] == prov
  assert json.loads((folder / "attention.json").read_text())["provenance"] == prov
  assert f"checkpoint step {summary['steps']}, config {prov['config_hash']}" in (
      folder / "results.md").read_text()
  # Another eval config: another folder; the first one stays as it was.
  config.eval.num_examples = 8
  other = evaluate_workdir(str(tmp_path), config)
  assert other["provenance"]["eval_config_hash"] != prov["eval_config_hash"]
  assert json.loads((folder / "results.json").read_text()) == saved
  assert other["attention"]["examples"] == 4 and results["attention"]["examples"] == 4
  assert latest_results(str(tmp_path)) != str(folder / "results.json")
  index = (tmp_path / "eval" / "index.jsonl").read_text().splitlines()
  assert len(index) == 2
  from conftest import read_scalars
  scalars = read_scalars(tmp_path / "tensorboard")     # eval accuracies, as fractions
  assert scalars["eval/clean"][-1] == (summary["steps"], pytest.approx(other["clean"]))
