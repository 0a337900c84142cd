"""Agreement of jaxdef's attacks with the PyTorch reference implementations.

The same small CNN (trained here in JAX, weights copied to PyTorch) is
attacked on the same test images by jaxdef and by torchattacks (PGD) /
pyautoattack (APGD-CE, APGD-T, AutoAttack standard). Prints robust accuracy
per attack in both frameworks and the difference in points.

  pip install torch==2.13.0 torchattacks==3.5.1 pyautoattack==0.2.0
  python benchmarks/compare_torch_attacks.py --n 1000

Data: ``--data cifar`` reads data/cifar10_subset.npz of the checkout (or --npz),
``--data mnist`` the embedded jaxdef/data/assets/mnist5k.npz. PyTorch is only
needed here and in tests/test_attacks_torch.py, never by jaxdef itself.

The helpers (twin CNN in both frameworks, running one named attack in each)
are imported by that test and by benchmarks/bench_attacks.py.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdef import attacks

ROOT = Path(__file__).resolve().parents[1]
ATTACK_NAMES = ("pgd", "apgd-ce", "apgd-t", "autoattack")


# ----------------------------------------------------------------------------
# The twin model: conv(3x3, stride 2) -> relu -> conv(3x3, stride 2) -> relu
# -> dense -> relu -> dense, NHWC in JAX and NCHW in PyTorch.

def init_cnn(key, image_shape, num_classes=10, widths=(16, 32), hidden=64):
  """He-initialised parameters as numpy arrays (JAX layouts: HWIO, (in, out))."""
  h, w, c = image_shape
  keys = jax.random.split(key, 4)
  he = lambda k, shape, fan_in: np.asarray(jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in))
  out = lambda size: ((size + 1) // 2 + 1) // 2  # two stride-2 convs, padding 1
  flat = widths[1] * out(h) * out(w)
  return {
      "conv1": he(keys[0], (3, 3, c, widths[0]), 9 * c), "b1": np.zeros(widths[0], np.float32),
      "conv2": he(keys[1], (3, 3, widths[0], widths[1]), 9 * widths[0]),
      "b2": np.zeros(widths[1], np.float32),
      "dense1": he(keys[2], (flat, hidden), flat), "b3": np.zeros(hidden, np.float32),
      "dense2": he(keys[3], (hidden, num_classes), hidden),
      "b4": np.zeros(num_classes, np.float32),
  }


def cnn_apply(params, x):
  """Logits of the twin CNN for NHWC ``x`` in [0, 1] (centred at 0.5 inside)."""
  conv = lambda v, k, b: jax.lax.conv_general_dilated(
      v, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  h = jax.nn.relu(conv(x - 0.5, params["conv1"], params["b1"]))
  h = jax.nn.relu(conv(h, params["conv2"], params["b2"]))
  h = jax.nn.relu(h.reshape(h.shape[0], -1) @ params["dense1"] + params["b3"])
  return h @ params["dense2"] + params["b4"]


def torch_twin(params):
  """The same network as a ``torch.nn.Module`` taking NCHW input."""
  import torch

  class TwinCNN(torch.nn.Module):
    def __init__(self):
      super().__init__()
      t = lambda a: torch.nn.Parameter(torch.tensor(np.asarray(a, np.float32)), requires_grad=False)
      self.k1, self.b1 = t(np.transpose(params["conv1"], (3, 2, 0, 1))), t(params["b1"])
      self.k2, self.b2 = t(np.transpose(params["conv2"], (3, 2, 0, 1))), t(params["b2"])
      self.w3, self.b3 = t(params["dense1"]), t(params["b3"])
      self.w4, self.b4 = t(params["dense2"]), t(params["b4"])

    def forward(self, x):
      f = torch.nn.functional
      h = f.relu(f.conv2d(x - 0.5, self.k1, self.b1, stride=2, padding=1))
      h = f.relu(f.conv2d(h, self.k2, self.b2, stride=2, padding=1))
      h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # flatten in NHWC order
      return f.relu(h @ self.w3 + self.b3) @ self.w4 + self.b4

  return TwinCNN().eval()


def train_cnn(x, y, *, key, steps=1500, batch_size=128, lr=2e-3, num_classes=10,
              init=init_cnn, apply=cnn_apply):
  """Plain (non-adversarial) training with Adam; returns numpy parameters (of
  the twin CNN, or of another twin given its ``init`` and ``apply``)."""
  params = jax.tree.map(jnp.asarray, init(key, x.shape[1:], num_classes))
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    params, state = step(params, state, x[idx], y[idx])
  return jax.tree.map(np.asarray, params)


# ----------------------------------------------------------------------------
# One named attack in each framework, returning robust accuracy.

def jax_attack_fn(name, logits_fn, *, eps, norm, steps, n_target_classes=9, fab_steps=None,
                  queries=5000, chunks=1):
  """A jitted ``(x, y, key) -> x_adv`` for attack ``name`` at the given budget."""
  fab_steps = fab_steps or steps
  if name == "pgd":
    fn = functools.partial(attacks.pgd, eps=eps, step_size=eps / 4, steps=steps, norm=norm)
  elif name in ("apgd-ce", "apgd-dlr"):
    fn = functools.partial(attacks.apgd, eps=eps, norm=norm, steps=steps, loss=name[5:],
                           chunks=chunks)
  elif name == "apgd-t":
    fn = functools.partial(attacks.apgd_t, eps=eps, norm=norm, steps=steps,
                           n_target_classes=n_target_classes, chunks=chunks)
  elif name == "autoattack":
    fn = functools.partial(attacks.autoattack, eps=eps, norm=norm, steps=steps,
                           n_target_classes=n_target_classes, fab_steps=fab_steps,
                           queries=queries, chunks=chunks)
  else:
    raise ValueError(name)
  return jax.jit(lambda x, y, key: fn(logits_fn, x, y, key=key))


def jax_robust_accuracy(name, params, x, y, *, batch_size=500, seed=0, **budget):
  logits_fn = functools.partial(cnn_apply, params)
  run = jax_attack_fn(name, logits_fn, **budget)
  correct = []
  for i in range(0, len(x), batch_size):
    xb, yb = jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size])
    x_adv = run(xb, yb, jax.random.fold_in(jax.random.key(seed), i))
    clean = jnp.argmax(logits_fn(xb), -1) == yb
    correct.append(np.asarray(clean & (jnp.argmax(logits_fn(x_adv), -1) == yb)))
  return float(np.concatenate(correct).mean())


def torch_attack(name, model, *, eps, norm, steps, n_target_classes=9, fab_steps=None,
                 queries=5000, seed=0, device="cpu"):
  """``(x_nchw, y) -> x_adv`` by the reference implementation of ``name`` (on
  ``device``: 'cpu' or 'cuda', where ``model`` and the batches must be)."""
  import logging
  import torchattacks
  from pyautoattack import AutoAttack
  from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
  from pyautoattack.fab_pt import FABAttack_PT
  from pyautoattack.square import SquareAttack

  logging.getLogger("auto-attack").setLevel(logging.ERROR)
  ref_norm = {"linf": "Linf", "l2": "L2"}[norm]
  fab_steps = fab_steps or steps
  if name == "pgd":
    if norm == "linf":
      return torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)
    return torchattacks.PGDL2(model, eps=eps, alpha=eps / 4, steps=steps, random_start=True)
  if name in ("apgd-ce", "apgd-dlr"):
    a = APGDAttack(model, n_iter=steps, norm=ref_norm, eps=eps, loss=name[5:], seed=seed,
                   device=device)
    return a.perturb
  if name == "apgd-t":
    a = APGDAttack_targeted(model, n_iter=steps, norm=ref_norm, eps=eps, seed=seed,
                            n_target_classes=n_target_classes, device=device)
    return a.perturb
  if name == "autoattack":
    aa = AutoAttack(model, norm=ref_norm, eps=eps, version="standard", seed=seed, device=device)
    # Same attacks and order as 'standard', at the requested budget.
    aa.apgd = APGDAttack(model, n_iter=steps, norm=ref_norm, eps=eps, n_restarts=1, seed=seed,
                         device=device, logger=aa.logger)
    aa.apgd_targeted = APGDAttack_targeted(model, n_iter=steps, norm=ref_norm, eps=eps,
                                           n_target_classes=n_target_classes, seed=seed,
                                           device=device, logger=aa.logger)
    aa.fab = FABAttack_PT(model, n_restarts=1, n_iter=fab_steps, eps=eps, seed=seed,
                          norm=ref_norm, n_target_classes=n_target_classes, device=device)
    aa.square = SquareAttack(model, p_init=0.8, n_queries=queries, eps=eps, norm=ref_norm,
                             n_restarts=1, seed=seed, device=device, resc_schedule=False)
    aa.verbose = False
    return lambda x, y: aa.run_standard_evaluation(x, y, batch_size=len(x))[0]
  raise ValueError(name)


def torch_robust_accuracy(name, params, x, y, *, batch_size=500, seed=0, **budget):
  import torch
  torch.manual_seed(seed)  # torchattacks draws PGD's random start from the global RNG
  model = torch_twin(params)
  run = torch_attack(name, model, seed=seed, **budget)
  correct = []
  for i in range(0, len(x), batch_size):
    xb = torch.tensor(np.transpose(x[i:i + batch_size], (0, 3, 1, 2))).contiguous()
    yb = torch.tensor(y[i:i + batch_size]).long()
    x_adv = run(xb, yb)
    with torch.no_grad():
      clean = model(xb).argmax(1) == yb
      correct.append((clean & (model(x_adv).argmax(1) == yb)).numpy())
  return float(np.concatenate(correct).mean())


def load(data, npz=None):
  """(x_train, y_train, x_test, y_test) as float32 NHWC in [0, 1] and int32 labels."""
  if npz is None:
    npz = (ROOT / "data/cifar10_subset.npz" if data == "cifar"
           else ROOT / "jaxdef/data/assets/mnist5k.npz")
  d = np.load(npz)
  to_x = lambda a: (a.astype(np.float32) / 255.0).reshape(a.shape[:3] + (-1,))
  return to_x(d["x_train"]), d["y_train"].astype(np.int32), to_x(d["x_test"]), d["y_test"].astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", choices=("cifar", "mnist"), default="cifar")
  parser.add_argument("--npz", default=None)
  parser.add_argument("--n", type=int, default=1000, help="test images attacked")
  parser.add_argument("--eps", type=float, default=1 / 255)
  parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
  parser.add_argument("--steps", type=int, default=100, help="PGD / APGD iterations")
  parser.add_argument("--pgd-steps", type=int, default=20)
  parser.add_argument("--queries", type=int, default=5000)
  parser.add_argument("--train-steps", type=int, default=1500)
  parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
  args = parser.parse_args()

  x_train, y_train, x_test, y_test = load(args.data, args.npz)
  t0 = time.time()
  params = train_cnn(x_train, y_train, key=jax.random.key(0), steps=args.train_steps)
  x, y = x_test[:args.n], y_test[:args.n]
  clean = float((np.argmax(np.asarray(cnn_apply(params, x)), -1) == y).mean())
  print(f"model: twin CNN trained {args.train_steps} steps in JAX ({time.time() - t0:.0f} s); "
        f"data: {args.data}, {len(x)} test images; clean accuracy {100 * clean:.1f}%")
  print(f"threat model: {args.norm} eps={args.eps:.5g}; PGD-{args.pgd_steps} (step eps/4), "
        f"APGD {args.steps} iterations, Square {args.queries} queries\n")
  print("| attack | jaxdef | reference | difference (points) | reference implementation |")
  print("|---|---|---|---|---|")
  refs = {"pgd": "torchattacks.PGD", "apgd-ce": "pyautoattack APGDAttack",
          "apgd-t": "pyautoattack APGDAttack_targeted",
          "autoattack": "pyautoattack AutoAttack standard"}
  for name in args.attacks.split(","):
    budget = dict(eps=args.eps, norm=args.norm,
                  steps=args.pgd_steps if name == "pgd" else args.steps, queries=args.queries)
    ours = jax_robust_accuracy(name, params, x, y, **budget)
    theirs = torch_robust_accuracy(name, params, x, y, **budget)
    print(f"| {name} | {100 * ours:.1f}% | {100 * theirs:.1f}% | {100 * (ours - theirs):+.1f} "
          f"| {refs[name]} |", flush=True)


if __name__ == "__main__":
  main()
