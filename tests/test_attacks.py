"""Invariants of APGD, APGD-T, FAB(-T), Square and AutoAttack on a tiny CNN.

Every attack result is computed once per (attack, norm) and shared by the
property tests below.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import primitive_count

from jaxdef import attacks
from jaxdef.attacks.apgd import checkpoints
from jaxdef.attacks.autoattack import VERSIONS
from jaxdef.attacks.common import Best, keep_worst, run_on_robust
from jaxdef.attacks.fab import project_onto_hyperplane_in_box
from jaxdef.attacks.losses import dlr_targeted_loss
from jaxdef.errors import ConfigError

N, SHAPE, CLASSES = 48, (8, 8, 3), 10
EPS = {"linf": 0.03, "l2": 0.3}
TINY = dict(steps=10)
AUTOATTACK = dict(n_target_classes=3, fab_steps=10, queries=60, chunks=4, return_stages=True,
                  **TINY)


def _cnn(params, x):
  h = jax.lax.conv_general_dilated(x - 0.5, params["k"], (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(h).reshape(x.shape[0], -1)
  return h @ params["w"]


@functools.lru_cache(maxsize=None)
def problem():
  """A random tiny CNN, images, and labels that are 25% wrong on purpose."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"k": jax.random.normal(k1, (3, 3, 3, 8)) * 0.5,
            "w": jax.random.normal(k2, (4 * 4 * 8, CLASSES)) * 0.3}
  logits_fn = functools.partial(_cnn, params)
  x = jax.random.uniform(k3, (N,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1)
  flip = jnp.arange(N) % 4 == 0
  y = jnp.where(flip, (y + 1 + jax.random.randint(k4, (N,), 0, CLASSES - 1)) % CLASSES, y)
  return logits_fn, x, y


ATTACKS = {
    "apgd-ce": lambda f, x, y, key, eps, norm: attacks.apgd(
        f, x, y, key=key, eps=eps, norm=norm, loss="ce", **TINY),
    "apgd-dlr": lambda f, x, y, key, eps, norm: attacks.apgd(
        f, x, y, key=key, eps=eps, norm=norm, loss="dlr", restarts=2, **TINY),
    "apgd-t": lambda f, x, y, key, eps, norm: attacks.apgd_t(
        f, x, y, key=key, eps=eps, norm=norm, n_target_classes=3, chunks=4, **TINY),
    "fab-t": lambda f, x, y, key, eps, norm: attacks.fab_t(
        f, x, y, key=key, eps=eps, norm=norm, n_target_classes=3, **TINY),
    "fab": lambda f, x, y, key, eps, norm: attacks.fab(
        f, x, y, key=key, eps=eps, norm=norm, restarts=2, **TINY),
    "square": lambda f, x, y, key, eps, norm: attacks.square(
        f, x, y, key=key, eps=eps, norm=norm, queries=60, chunks=4),
    "autoattack": lambda f, x, y, key, eps, norm: attacks.autoattack(
        f, x, y, key=key, eps=eps, norm=norm, **AUTOATTACK),
}
# L2 for every attack family once (untargeted FAB and APGD-DLR share their code).
CASES = [(name, norm) for name in ATTACKS for norm in ("linf", "l2")
         if (name, norm) not in (("fab", "l2"), ("apgd-dlr", "l2"))]


@functools.lru_cache(maxsize=None)
def compiled(name, norm):
  logits_fn, _, _ = problem()
  return jax.jit(lambda x, y, key: ATTACKS[name](logits_fn, x, y, key, EPS[norm], norm))


def run_attack(name, norm, seed=0):
  """(x_adv, AutoAttack's stages or None) as numpy."""
  _, x, y = problem()
  out = compiled(name, norm)(x, y, jax.random.key(seed))
  x_adv, stages = out if isinstance(out, tuple) else (out, None)
  return np.asarray(x_adv), stages


@functools.lru_cache(maxsize=None)
def attacked(name, norm):
  return run_attack(name, norm)[0]


def _accuracy(x_adv):
  logits_fn, _, y = problem()
  return np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1) == y)


@pytest.mark.parametrize("name,norm", CASES)
def test_attack_stays_in_eps_ball_and_unit_box(name, norm):
  _, x, _ = problem()
  x_adv = attacked(name, norm)
  chex.assert_shape(x_adv, x.shape)
  delta = (x_adv - np.asarray(x)).reshape(N, -1)
  size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
  assert size.max() <= EPS[norm] * (1 + 1e-5)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.isfinite(x_adv).all()


@pytest.mark.parametrize("name,norm", CASES)
def test_attack_never_helps_the_defender(name, norm):
  """Adversarial accuracy <= clean accuracy, and an example misclassified
  clean stays misclassified (its result is x itself or another error)."""
  logits_fn, x, _ = problem()
  clean = _accuracy(x)
  adv = _accuracy(attacked(name, norm))
  assert adv.mean() <= clean.mean()
  assert not np.any(adv & ~clean)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_deterministic_given_the_key(name):
  np.testing.assert_array_equal(run_attack(name, "linf")[0], attacked(name, "linf"))


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "square", "autoattack"])
def test_attack_finds_adversarial_examples(name):
  """Not a no-op: the tiny model at this eps is fooled on some examples."""
  _, x, _ = problem()
  assert _accuracy(attacked(name, "linf")).mean() < _accuracy(x).mean() - 0.1


def test_autoattack_is_worst_case_over_its_stages():
  _, x, _ = problem()
  x_adv, stages = run_attack("autoattack", "linf")
  order = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  assert sorted(stages) == sorted(order)
  fooled = [np.asarray(stages[k]) for k in order]
  for before, after in zip(fooled, fooled[1:]):
    assert np.all(after >= before)  # once fooled, always fooled
  np.testing.assert_array_equal(~_accuracy(x_adv) | ~_accuracy(x), fooled[-1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_is_not_weaker_than_each_component(norm):
  """AutoAttack's accuracy <= each of its attacks run alone (up to one
  example of attack randomness)."""
  aa = _accuracy(attacked("autoattack", norm)).mean()
  for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
    assert aa <= _accuracy(attacked(name, norm)).mean() + 1.0 / N, name


def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_iterations():
  logits_fn, x, y = problem()
  eps = 0.02
  pgd = jax.jit(lambda x, y: attacks.pgd(logits_fn, x, y, key=jax.random.key(1), eps=eps,
                                         step_size=eps / 4, steps=20))(x, y)
  apgd = jax.jit(lambda x, y: attacks.apgd(logits_fn, x, y, key=jax.random.key(1), eps=eps,
                                           steps=20))(x, y)
  assert _accuracy(apgd).mean() <= _accuracy(pgd).mean() + 1.0 / N


def test_autoattack_rand_averages_gradients_of_a_randomized_model():
  logits_fn, x, y = problem()
  noisy = lambda z, key: logits_fn(z + 0.01 * jax.random.normal(key, z.shape))
  x_adv = jax.jit(lambda x, y: attacks.autoattack(
      noisy, x, y, key=jax.random.key(0), eps=EPS["linf"], version="rand", eot_iter=3,
      randomized=True, **TINY))(x, y)
  assert np.abs(np.asarray(x_adv - x)).max() <= EPS["linf"] * (1 + 1e-5)
  assert _accuracy(x_adv).mean() < _accuracy(x).mean()


def test_autoattack_versions_run_the_reference_sequences():
  assert VERSIONS == {
      "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
      "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
      "rand": ("apgd-ce", "apgd-dlr"),
  }


def test_apgd_checkpoints_follow_the_reference_schedule():
  is_check, window = checkpoints(100)
  np.testing.assert_array_equal(np.flatnonzero(is_check), [21, 40, 56, 69, 79, 86, 92, 98])
  np.testing.assert_array_equal(window[is_check], [22, 19, 16, 13, 10, 7, 6, 6])
  assert checkpoints(1)[0].tolist() == [True]


def test_targeted_dlr_loss_matches_its_definition():
  z = jnp.array([[5.0, 3.0, 1.0, 0.0, -1.0], [0.0, 1.0, 2.0, 4.0, 3.0]])
  y, t = jnp.array([0, 3]), jnp.array([1, 4])
  expected = [-(5 - 3) / (5 - 0.5 * (1 + 0)), -(4 - 3) / (4 - 0.5 * (2 + 1))]
  np.testing.assert_allclose(dlr_targeted_loss(z, y, t), expected, rtol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_projection_reaches_the_hyperplane_inside_the_box(norm):
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  t = jax.random.uniform(k1, (64, 30))
  w = jax.random.normal(k2, (64, 30))
  b = jnp.sum(w * t, 1) + 0.3 * jax.random.normal(k3, (64,))  # reachable targets
  z = t + jax.jit(project_onto_hyperplane_in_box, static_argnums=3)(t, w, b, norm)
  assert float(z.min()) >= -1e-6 and float(z.max()) <= 1 + 1e-6
  np.testing.assert_allclose(jnp.sum(w * z, 1), b, atol=1e-4)
  if norm == "l2":  # where the box does not bind, the plain orthogonal projection
    plain = t - ((jnp.sum(w * t, 1) - b) / jnp.sum(w * w, 1))[:, None] * w
    inside = jnp.all((plain >= 0) & (plain <= 1), axis=1)
    np.testing.assert_allclose(z[inside], plain[inside], atol=1e-5)


def test_fab_projection_gives_the_box_corner_when_the_plane_is_unreachable():
  t = jnp.full((1, 4), 0.5)
  w = jnp.array([[1.0, -1.0, 2.0, 0.0]])
  d = project_onto_hyperplane_in_box(t, w, jnp.array([100.0]), "linf")
  np.testing.assert_allclose(d, [[0.5, -0.5, 0.5, 0.0]])


def test_run_on_robust_leaves_fooled_examples_alone():
  x = jnp.zeros((8, 2, 2, 1))
  best = Best(x, jnp.arange(8) % 2 == 0, jnp.zeros(8))
  calls = []

  def attack(batch, key):
    xb, = batch
    calls.append(xb.shape[0])
    return Best(xb + 1.0, jnp.ones(xb.shape[0], bool), jnp.ones(xb.shape[0]))

  out = run_on_robust(attack, (x,), best, jax.random.key(0), chunks=4)
  np.testing.assert_array_equal(out.fooled, np.ones(8, bool))
  np.testing.assert_array_equal(out.x_adv[:, 0, 0, 0], (np.arange(8) % 2 == 1).astype(float))
  assert calls == [2]  # traced once for a chunk of 8 / 4


def test_keep_worst_prefers_fooling_then_higher_loss():
  x = jnp.zeros((3, 1, 1, 1))
  best = Best(x, jnp.array([True, False, False]), jnp.array([0.0, 1.0, 1.0]))
  cand = Best(x + 1, jnp.array([False, False, True]), jnp.array([5.0, 2.0, 0.0]))
  out = keep_worst(best, cand)
  np.testing.assert_array_equal(out.x_adv[:, 0, 0, 0], [0.0, 1.0, 1.0])
  np.testing.assert_array_equal(out.fooled, [True, False, True])


@pytest.mark.parametrize("call", [
    lambda f, x, y: attacks.apgd(f, x, y, key=jax.random.key(0), eps=0.1, loss="kl"),
    lambda f, x, y: attacks.apgd(f, x, y, key=jax.random.key(0), eps=0.1, norm="l1"),
    lambda f, x, y: attacks.apgd(f, x, y, key=jax.random.key(0), eps=0.1, restarts=0),
    lambda f, x, y: attacks.autoattack(f, x, y, key=jax.random.key(0), eps=0.1, version="x"),
    lambda f, x, y: attacks.autoattack(f, x, y, key=jax.random.key(0), eps=0.1,
                                       attacks=["apgd-ce", "pgd"]),
    lambda f, x, y: attacks.square(f, x, y, key=jax.random.key(0), eps=0.1, p_init=0.0),
])
def test_bad_attack_settings_are_one_line_config_errors(call):
  logits_fn, x, y = problem()
  with pytest.raises(ConfigError):
    call(logits_fn, x, y)


def test_apgd_t_needs_four_classes():
  f = lambda z: z.reshape(z.shape[0], -1)[:, :3]
  x = jnp.full((2, 2, 2, 1), 0.5)
  with pytest.raises(ConfigError, match="4 classes"):
    attacks.apgd_t(f, x, jnp.zeros(2, jnp.int32), key=jax.random.key(0), eps=0.1, steps=2)


def test_autoattack_plus_runs_its_six_stages_as_a_growing_worst_case():
  logits_fn, x, y = problem()
  x_adv, stages = jax.jit(lambda x, y: attacks.autoattack(
      logits_fn, x, y, key=jax.random.key(0), eps=EPS["linf"], version="plus",
      n_target_classes=3, fab_steps=5, queries=30, restarts=2, steps=5,
      return_stages=True))(x, y)
  assert tuple(k for k in VERSIONS["plus"]) == ("apgd-ce", "apgd-dlr", "fab", "square",
                                                 "apgd-t", "fab-t")
  assert set(stages) == {"clean", *VERSIONS["plus"]}
  order = ("clean",) + VERSIONS["plus"]
  for before, after in zip(order, order[1:]):
    assert np.all(np.asarray(stages[after]) >= np.asarray(stages[before])), after
  np.testing.assert_array_equal(~_accuracy(x_adv), np.asarray(stages["fab-t"]))
  assert np.abs(np.asarray(x_adv - x)).max() <= EPS["linf"] * (1 + 1e-5)
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0
  assert np.asarray(stages["fab-t"]).mean() > np.asarray(stages["clean"]).mean()


# Called eagerly (no jax.jit around them) the attacks compile themselves; AutoAttack
# then attacks only the still-robust examples of each stage, compacted on the host.

@functools.lru_cache(maxsize=None)
def eager_autoattack():
  """(x_adv, stages, progress lines) of AutoAttack called with concrete arrays."""
  logits_fn, x, y = problem()
  lines = []
  x_adv, stages = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0), eps=EPS["linf"],
                                     log=lines.append, **AUTOATTACK)
  return np.asarray(x_adv), {k: np.asarray(v) for k, v in stages.items()}, lines


@pytest.mark.parametrize("name", ["apgd-ce", "fab"])
def test_eager_call_gives_the_jitted_result(name):
  logits_fn, x, y = problem()
  eager = ATTACKS[name](logits_fn, x, y, jax.random.key(0), EPS["linf"], "linf")
  assert not isinstance(eager, jax.core.Tracer)
  chex.assert_trees_all_close(np.asarray(eager), attacked(name, "linf"), atol=1e-6)


def test_eager_autoattack_fools_the_examples_the_one_program_path_fools():
  """Compacting the still-robust examples between stages changes neither
  which examples each stage fools nor their worst case (each example draws
  its own randomness, whatever batch it is in)."""
  x_adv, stages, _ = eager_autoattack()
  one_x, one_stages = run_attack("autoattack", "linf")
  assert sorted(stages) == sorted(one_stages)
  for name in stages:
    np.testing.assert_array_equal(stages[name], np.asarray(one_stages[name]), err_msg=name)
  np.testing.assert_allclose(x_adv, one_x, atol=1e-6)
  assert stages["apgd-ce"].sum() > stages["clean"].sum()


def test_eager_autoattack_reports_each_stage_as_it_finishes():
  _, stages, lines = eager_autoattack()
  assert lines[0] == f"initial accuracy: {100 * (1 - stages['clean'].mean()):.2f}%"
  order = ["apgd-ce", "apgd-t", "fab-t", "square"]
  starts = [i for i, l in enumerate(lines) if l.startswith("running ")]
  assert [lines[i].split(":")[0] for i in starts] == [f"running {a}" for a in order]
  previous = "clean"
  for name, i in zip(order, starts):
    left = int((~stages[previous]).sum())
    assert lines[i].startswith(f"running {name}: {left} examples left to attack")
    assert lines[i + 1].startswith(f"{name} - 1/1 - ") and f"out of {left} " in lines[i + 1]
    assert lines[i + 2].startswith(f"robust accuracy after {name.upper()}: "
                                   f"{100 * (1 - stages[name].mean()):.2f}% (total time ")
    previous = name


def test_pieces_take_every_example_once_in_one_program_size():
  from jaxdef.attacks.autoattack import compacted, pieces
  for cap, multiple in ((40, 1), (40, 4), (250, 1), (7, 2)):
    for count in range(1, 300):
      layout = pieces(count, cap, multiple)
      sizes = {rows for _, rows in layout}
      assert len(sizes) == 1, (count, cap, layout)
      rows = sizes.pop()
      assert rows % multiple == 0 and sum(c for c, _ in layout) == count
      assert all(0 < c <= min(cap, rows) for c, _ in layout)
      if count >= 8 and multiple == 1:  # at most a quarter padding (the buckets') per piece
        assert len(layout) * rows <= 1.25 * count + len(layout)
  assert pieces(130, 40) == [(26, 28)] * 5
  order = np.random.default_rng(0).permutation(130)
  taken = [(r, c) for r, c in compacted(order, 40)]
  np.testing.assert_array_equal(np.concatenate([r[:c] for r, c in taken]), order)
  assert all(len(r) == 28 and np.all(r[c:] == r[0]) for r, c in taken)


def test_eager_autoattack_in_several_pieces_gives_the_same_result():
  """The default on CPU (at most 40 examples a compiled attack) and smaller
  pieces change nothing: each example draws its own randomness."""
  from jaxdef.attacks.autoattack import CPU_BATCH, default_batch_size
  assert default_batch_size(None, 1000) == (CPU_BATCH if jax.default_backend() == "cpu"
                                            else 1000)
  assert default_batch_size(None, 12) == 12 and default_batch_size(64, 1000) == 64
  x_adv, stages, _ = eager_autoattack()
  logits_fn, x, y = problem()
  lines = []
  small, small_stages = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0),
                                           eps=EPS["linf"], log=lines.append, batch_size=14,
                                           **AUTOATTACK)
  assert any(line.startswith("apgd-ce - 3/3 - ") for line in lines)
  for name in stages:
    np.testing.assert_array_equal(np.asarray(small_stages[name]), stages[name], err_msg=name)
  np.testing.assert_allclose(np.asarray(small), x_adv, atol=1e-6)


def test_a_second_eager_call_compiles_nothing():
  eager_autoattack()
  compiles = []
  count = lambda event, seconds, **kw: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    logits_fn, x, y = problem()
    again = ATTACKS["autoattack"](logits_fn, x, y, jax.random.key(0), EPS["linf"], "linf")
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  np.testing.assert_array_equal(np.asarray(again[0]), eager_autoattack()[0])


def test_attacks_stay_traceable_inside_the_callers_transformations():
  """Under the caller's jit or vmap the attacks are traced as before, also
  when the images are constants of the caller's program."""
  logits_fn, x, y = problem()
  budget = dict(eps=EPS["linf"], attacks=["apgd-ce"], steps=3)
  constants = jax.jit(lambda k: attacks.autoattack(logits_fn, x, y, key=k, **budget))
  x_adv = constants(jax.random.key(0))
  assert np.abs(np.asarray(x_adv - x)).max() <= EPS["linf"] * (1 + 1e-5)
  one = lambda xi, yi: attacks.apgd(logits_fn, xi[None], yi[None], key=jax.random.key(0),
                                    eps=EPS["linf"], steps=3)[0]
  chex.assert_shape(jax.jit(jax.vmap(one))(x[:4], y[:4]), (4,) + SHAPE)


def test_square_stops_once_every_example_is_fooled():
  """Square's query loop ends when no example is left (a while_loop), not
  after its budget: counted by the model's calls at run time."""
  logits_fn, x, y = problem()
  calls = []

  def counted(z):
    jax.debug.callback(lambda: calls.append(1))
    return logits_fn(z)

  x_adv = attacks.square(counted, x, y, key=jax.random.key(0), eps=0.3, queries=5000)
  assert not _accuracy(x_adv).any()
  assert len(calls) < 100


def test_one_restart_is_one_call_and_more_are_a_loop():
  """``repeat``: one restart adds no loop around the attack (XLA:CPU runs
  Square's query loop 1.5x slower nested in a one-trip loop); several are a
  loop whose carry goes through every run, as a Python loop would."""
  from jaxdef.attacks.common import repeat
  body = lambda i, c: c * 2.0 + i
  for times in (1, 2, 5):
    expected = 1.0
    for i in range(times):
      expected = body(i, expected)
    assert float(repeat(times, body, jnp.float32(1.0))) == expected
  logits_fn, x, y = problem()
  best = Best(x, jnp.zeros(y.shape, bool), jnp.full(y.shape, -jnp.inf))
  from jaxdef.attacks.square import square_update

  def loops(restarts):
    update = lambda b: square_update(b, lambda z, k: logits_fn(z), x, y, key=jax.random.key(0),
                                     eps=0.1, queries=10, restarts=restarts)
    return primitive_count(jax.make_jaxpr(update)(best).jaxpr, "while", "scan")
  assert loops(1) == 1  # the query loop alone
  assert loops(3) == 2  # the query loop inside the restarts' loop


def _flat(logits_fn):
  """The same model with no input gradient at all (unavailable gradients by construction)."""
  return lambda z: logits_fn(jax.lax.stop_gradient(z))


def test_apgd_records_its_indicators_in_its_own_loop():
  """Recording moves no attacked point; a model without input gradients
  raises 'unavailable gradients' on exactly the examples APGD failed on; the
  tiny CNN raises none of it; APGD returns its best (or a fooling) iterate,
  so 'silent success' and 'non-converging attack' cannot fire."""
  from jaxdef.attacks.apgd import apgd_update
  from jaxdef.attacks.common import attacked_model, start_from_clean
  from jaxdef.attacks.indicators import NAMES
  logits_fn, x, y = problem()
  budget = dict(key=jax.random.key(1), eps=EPS["linf"], steps=10)

  def run(f, record):
    model = attacked_model(f, False)
    return jax.jit(lambda: apgd_update(start_from_clean(model, x, y, jax.random.key(0)),
                                       model, x, y, record=record, **budget))()

  plain, rec = run(logits_fn, False), run(logits_fn, True)
  assert plain.flags is None and sorted(rec.flags) == sorted(NAMES)
  np.testing.assert_array_equal(np.asarray(rec.x_adv), np.asarray(plain.x_adv))
  np.testing.assert_array_equal(np.asarray(rec.fooled), np.asarray(plain.fooled))
  chex.assert_shape(list(rec.flags.values()), (N,))
  for name in ("unavailable gradients", "silent success", "non-converging attack"):
    assert not np.asarray(rec.flags[name]).any(), name
  flat = run(_flat(logits_fn), True)
  robust = ~np.asarray(flat.fooled)
  assert robust.sum() > N // 2
  np.testing.assert_array_equal(np.asarray(flat.flags["unavailable gradients"]), robust)


@pytest.mark.parametrize("eager", [False, True])
def test_autoattack_returns_the_indicators_its_apgd_stages_recorded(eager):
  """Both paths return the same flags, set only where every stage failed:
  without input gradients, on every example still robust at the end."""
  logits_fn, x, y = problem()
  budget = dict(eps=EPS["linf"], return_indicators=True, **AUTOATTACK)
  call = lambda f, k: attacks.autoattack(f, x, y, key=k, **budget)
  x_adv, stages, fired = (call(_flat(logits_fn), jax.random.key(0)) if eager else
                          jax.jit(lambda k: call(_flat(logits_fn), k))(jax.random.key(0)))
  robust = ~np.asarray(stages["square"])
  assert robust.sum() > 0
  np.testing.assert_array_equal(np.asarray(fired["unavailable gradients"]), robust)
  assert not np.asarray(fired["silent success"]).any()
  # The CNN's own gradients: flags only on examples every attack failed on.
  _, stages, fired = call(logits_fn, jax.random.key(0))
  for name, flags in fired.items():
    assert not np.any(np.asarray(flags) & np.asarray(stages["square"])), name


# A model whose logits tie exactly: class 0 scores 1, class 1 scores min(1, 4 *
# mean of the top row). From a grey image of 0.1, eps 0.2 lets that mean reach
# 0.3, and from 0.25 on both score exactly 1: Square's margin reaches 0 (its own
# flag: fooled), while argmax returns the label 0 (the reference's
# re-prediction: not fooled). The other pixels do not matter, so each attack
# leaves its own mark on them.
TIE_EPS = 0.2


def _tying(z):
  n = z.shape[0]
  rising = jnp.minimum(1.0, 4.0 * z[:, 0].reshape(n, -1).mean(1))
  return jnp.stack([jnp.ones(n), rising, -jnp.ones(n), -jnp.ones(n)], axis=1)


@pytest.mark.parametrize("eager", [False, True])
def test_an_exact_tie_under_square_is_not_fooled_and_goes_on_to_the_next_stage(eager):
  from jaxdef.attacks.common import attacked_model
  from jaxdef.attacks.square import square_run
  x, y = jnp.full((4, 4, 4, 1), 0.1), jnp.zeros(4, jnp.int32)
  budget = dict(key=jax.random.key(0), eps=TIE_EPS, queries=200, steps=5,
                return_stages=True)
  lines = []
  call = lambda parts, x, y: attacks.autoattack(_tying, x, y, attacks=parts, **budget,
                                                **(dict(log=lines.append) if eager else {}))
  run = functools.partial(call if eager else jax.jit(call, static_argnums=0), x=x, y=y)
  x_square, stages = run(("square",))
  logits = np.asarray(_tying(x_square))
  # The crafted case: an exact tie that Square's own flag calls a success.
  np.testing.assert_array_equal(logits[:, 0], logits[:, 1])
  own = square_run(attacked_model(_tying, False), x, y, key=jax.random.key(1), eps=TIE_EPS,
                   norm="linf", queries=200)
  assert np.asarray(own.fooled).all()
  # Re-predicted as the reference does: argmax returns the label, so not fooled ...
  assert not np.asarray(stages["square"]).any()
  # ... and every example is attacked again by the next stage, which moves it.
  x_next, stages = run(("square", "apgd-ce"))
  assert not np.asarray(stages["apgd-ce"]).any()
  moved = np.abs(np.asarray(x_next) - np.asarray(x_square)).reshape(4, -1).max(1)
  assert (moved > 0).all()
  if eager:
    assert any(line.startswith("running apgd-ce: 4 examples left to attack") for line in lines)
