"""Agreement with the PyTorch reference implementations (a small case).

The twin CNN of benchmarks/compare_torch_attacks.py is trained briefly in JAX
on the embedded MNIST5k digits and copied into PyTorch; both frameworks
attack the same 160 test images. Robust accuracy must agree within 1.5
points for PGD (torchattacks), APGD-CE, APGD-T and AutoAttack standard
(pyautoattack), at reduced budgets. The larger run is the benchmark script.

A randomized model (an MLP behind Gaussian input noise,
benchmarks/compare_randomized_scoring.py) is scored by AutoAttack ``rand`` in
both frameworks: jaxdef must count no more robust examples than the
reference does.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the reference comparison needs the test extra "
    "(torch==2.13.0, torchattacks==3.5.1, pyautoattack==0.2.0)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import compare_randomized_scoring as noisy  # noqa: E402
from benchmarks import compare_torch_attacks as twin  # noqa: E402
from jaxdef.attacks.fab import project_onto_hyperplane_in_box  # noqa: E402

N_IMAGES = 160
BUDGET = dict(eps=0.08, norm="linf", steps=20, n_target_classes=3, fab_steps=10, queries=100)
TOLERANCE = 0.015


@functools.lru_cache(maxsize=None)
def trained():
  x_train, y_train, x_test, y_test = twin.load("mnist")
  params = twin.train_cnn(x_train, y_train, key=jax.random.key(0), steps=150, batch_size=64)
  return params, x_test[:N_IMAGES], y_test[:N_IMAGES]


def test_twin_models_compute_the_same_logits():
  params, x, _ = trained()
  ours = np.asarray(twin.cnn_apply(params, jnp.asarray(x)))
  with torch.no_grad():
    theirs = twin.torch_twin(params)(torch.tensor(np.transpose(x, (0, 3, 1, 2)))).numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_matches_the_reference(norm):
  from pyautoattack.fab_projections import projection_l2, projection_linf
  rng = np.random.default_rng(0)
  t = rng.uniform(size=(96, 200)).astype(np.float32)
  w = (rng.normal(size=(96, 200)) * (rng.uniform(size=(96, 200)) > 0.2)).astype(np.float32)
  # a third each: box not binding, partly binding, plane out of reach
  b = ((w * t).sum(1) + rng.normal(size=96) * np.repeat([0.1, 3.0, 300.0], 32)).astype(np.float32)
  ref = {"linf": projection_linf, "l2": projection_l2}[norm]
  theirs = ref(torch.tensor(t), torch.tensor(w), torch.tensor(b)).numpy()
  ours = np.asarray(project_onto_hyperplane_in_box(jnp.asarray(t), jnp.asarray(w),
                                                   jnp.asarray(b), norm))
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("name", twin.ATTACK_NAMES)
def test_robust_accuracy_matches_the_reference_within_1_5_points(name):
  params, x, y = trained()
  budget = dict(BUDGET, steps=10 if name == "pgd" else BUDGET["steps"])
  ours = twin.jax_robust_accuracy(name, params, x, y, batch_size=N_IMAGES, **budget)
  theirs = twin.torch_robust_accuracy(name, params, x, y, batch_size=N_IMAGES, **budget)
  clean = float(np.mean(np.argmax(np.asarray(twin.cnn_apply(params, x)), -1) == y))
  assert 0.1 < theirs < clean - 0.1, "the case should be neither trivial nor hopeless"
  assert abs(ours - theirs) <= TOLERANCE, f"jaxdef {ours:.3f} vs reference {theirs:.3f}"


# AutoAttack 'rand' at a tenth of its iterations and half its EOT draws, on
# every MNIST5k test digit under two seeds: each example's fate is a coin flip
# under the noise, and 2000 of them keep the comparison's spread near one point.
RAND_SIGMA = 0.15
RAND_BUDGET = dict(eps=0.1, steps=10, eot=10)
RAND_SEEDS = (0, 1)


def test_randomized_autoattack_counts_no_more_robust_than_the_reference():
  """Robust means classified correctly under the clean draw and under a fresh
  draw after each attack, in both. Scoring clean and attacked images under
  one shared draw instead counted about three times the reference's figure here."""
  params, x, y = noisy.trained()
  ours_model = noisy.noisy_mlp(params, RAND_SIGMA)
  their_model = noisy.torch_noisy_twin(params, RAND_SIGMA)
  ours = sum(noisy.jax_robust_count(ours_model, x, y, seed=s, **RAND_BUDGET)[0]
             for s in RAND_SEEDS)
  theirs = sum(noisy.torch_robust_count(their_model, x, y, seed=s, **RAND_BUDGET)
               for s in RAND_SEEDS)
  total = len(x) * len(RAND_SEEDS)
  clean = float(np.mean(np.argmax(np.asarray(ours_model(jnp.asarray(x), jax.random.key(0))),
                                  -1) == y))
  assert 0.03 < theirs / total < clean - 0.2, "the case should be neither trivial nor hopeless"
  assert ours <= theirs + total / 64, f"jaxdef {ours} vs reference {theirs} of {total}"
