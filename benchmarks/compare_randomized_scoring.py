"""AutoAttack ``rand`` on a randomized model: jaxdef's robust count against pyautoattack's.

A small MLP (the digits of the embedded MNIST5k set average-pooled to 7x7,
one hidden layer of 32 ReLUs), trained in JAX with the trainer of
benchmarks/compare_torch_attacks.py and copied into PyTorch, with Gaussian
noise of standard deviation ``--sigma`` added to its input on every call: a
randomized model, the same in both frameworks. Each framework runs AutoAttack ``rand``
(APGD-CE then APGD-DLR, the gradient averaged over ``--eot`` draws of the
noise) on the same test images, once per seed, and counts the robust
examples its own way:

* jaxdef: ``jaxdef.evaluate.autoattack_report(..., version='rand',
  randomized=True)``, the protocol the evaluation suite uses for a
  randomized target;
* pyautoattack 0.2.0: ``AutoAttack(model, version='rand')
  .run_standard_evaluation``, whose robust flags need a correct prediction
  under the clean pass and under a fresh draw after each attack.

Prints both counts per seed and their means, and, for comparison, jaxdef's
adversarial images scored the way jaxdef scored randomized models before it
followed the reference (clean and attacked image under one shared draw).

  pip install torch==2.13.0 pyautoattack==0.2.0
  python benchmarks/compare_randomized_scoring.py --n 64 --seeds 3

The helpers (the noisy twin in both frameworks, one count in each) are
imported by tests/test_attacks_torch.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import compare_torch_attacks as twin  # noqa: E402
from jaxdef.evaluate import autoattack_report  # noqa: E402


POOL = 4  # 28x28 digits -> 7x7


def pooled(x: np.ndarray) -> np.ndarray:
  """NHWC digits average-pooled by :data:`POOL` in each direction."""
  n, h, w, c = x.shape
  return x.reshape(n, h // POOL, POOL, w // POOL, POOL, c).mean((2, 4))


def init_mlp(key, image_shape, num_classes=10, hidden=32):
  """He-initialised MLP parameters as numpy arrays ((in, out) layouts)."""
  d = int(np.prod(image_shape))
  k1, k2 = jax.random.split(key)
  he = lambda k, shape: np.asarray(jax.random.normal(k, shape) * np.sqrt(2.0 / shape[0]))
  return {"w1": he(k1, (d, hidden)), "b1": np.zeros(hidden, np.float32),
          "w2": he(k2, (hidden, num_classes)), "b2": np.zeros(num_classes, np.float32)}


def mlp_apply(params, x):
  """Logits of the MLP for NHWC ``x`` in [0, 1] (centred at 0.5 inside)."""
  h = jax.nn.relu((x.reshape(x.shape[0], -1) - 0.5) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def noisy_mlp(params, sigma: float):
  """The MLP behind Gaussian input noise, ``(x, key) -> logits`` (NHWC)."""
  def logits(x, key):
    return mlp_apply(params, x + sigma * jax.random.normal(key, x.shape, x.dtype))
  return logits


def torch_noisy_twin(params, sigma: float):
  """The same randomized model as a ``torch.nn.Module`` (NCHW input), drawing
  its noise from PyTorch's global generator on every call."""
  import torch

  class NoisyMLP(torch.nn.Module):
    def __init__(self):
      super().__init__()
      t = lambda a: torch.nn.Parameter(torch.tensor(np.asarray(a, np.float32)),
                                       requires_grad=False)
      self.w1, self.b1, self.w2, self.b2 = (t(params[k]) for k in ("w1", "b1", "w2", "b2"))

    def forward(self, x):
      z = x + sigma * torch.randn_like(x)
      flat = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1)  # flatten in NHWC order
      return torch.relu((flat - 0.5) @ self.w1 + self.b1) @ self.w2 + self.b2

  return NoisyMLP().eval()


def jax_robust_count(logits_fn, x, y, *, eps, steps, eot, seed) -> tuple[int, np.ndarray]:
  """Examples jaxdef's AutoAttack ``rand`` leaves robust on the randomized
  ``logits_fn`` (:func:`noisy_mlp`; keep it: a second call reuses its
  programs), and the adversarial images."""
  report = autoattack_report(logits_fn, x, y, eps=eps, norm="Linf", version="rand",
                             randomized=True, key=jax.random.key(seed), batch_size=len(x),
                             log=None, steps=steps, eot_iter=eot)
  return int(round(report["robust_accuracy"] * len(x))), report["x_adv"]


def shared_draw_count(logits_fn, x, y, x_adv, *, seed) -> int:
  """Examples correct on the clean AND the adversarial image under one shared
  draw of the noise: how jaxdef scored a randomized model before it followed
  the reference, for comparison."""
  key = jax.random.key(1000 + seed)
  correct = lambda z: np.argmax(np.asarray(logits_fn(jnp.asarray(z), key)), -1) == y
  return int((correct(x) & correct(x_adv)).sum())


def torch_robust_count(model, x, y, *, eps, steps, eot, seed) -> int:
  """Examples pyautoattack's AutoAttack ``rand`` leaves robust on ``model``
  (:func:`torch_noisy_twin`), as it counts them: ``run_standard_evaluation``
  returns the predictions it scored."""
  import logging
  import torch
  from pyautoattack import AutoAttack
  from pyautoattack.autopgd_base import APGDAttack

  logging.getLogger("auto-attack").setLevel(logging.ERROR)
  torch.manual_seed(seed)
  aa = AutoAttack(model, norm="Linf", eps=eps, version="rand", seed=seed)
  # The version's attacks and EOT, at the requested number of iterations.
  aa.apgd = APGDAttack(model, n_iter=steps, norm="Linf", eps=eps, n_restarts=1, eot_iter=eot,
                       seed=seed, device="cpu", logger=aa.logger)
  aa.verbose = False
  xb = torch.tensor(np.transpose(x, (0, 3, 1, 2))).contiguous()
  yb = torch.tensor(y).long()
  _, y_adv = aa.run_standard_evaluation(xb, yb, batch_size=len(x))
  return int((y_adv == yb).sum())


@functools.lru_cache(maxsize=None)
def trained(train_steps: int = 1500):
  """The MLP's weights and the pooled MNIST5k test digits (float NHWC, int labels)."""
  x_train, y_train, x_test, y_test = twin.load("mnist")
  params = twin.train_cnn(pooled(x_train), y_train, key=jax.random.key(0), steps=train_steps,
                          init=init_mlp, apply=mlp_apply)
  return params, pooled(x_test), y_test


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=64, help="test digits attacked")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--sigma", type=float, default=0.15, help="input noise std")
  parser.add_argument("--eps", type=float, default=0.05, help="L-inf budget")
  parser.add_argument("--steps", type=int, default=100, help="APGD iterations")
  parser.add_argument("--eot", type=int, default=20, help="noise draws per gradient")
  parser.add_argument("--train-steps", type=int, default=1500)
  args = parser.parse_args()

  params, x, y = trained(args.train_steps)
  x, y = x[:args.n], y[:args.n]
  ours_model, their_model = noisy_mlp(params, args.sigma), torch_noisy_twin(params, args.sigma)
  budget = dict(eps=args.eps, steps=args.steps, eot=args.eot)
  print(f"model: MLP on 7x7 digits ({args.train_steps} training steps) + input noise sigma "
        f"{args.sigma}; {args.n} MNIST5k test digits; AutoAttack rand, L-inf eps "
        f"{args.eps:g}, APGD {args.steps} iterations, EOT {args.eot}\n")
  print("| seed | jaxdef robust | pyautoattack robust | jaxdef images, one shared draw | "
        "jaxdef s | pyautoattack s |")
  print("|---|---|---|---|---|---|")
  ours, theirs, shared = [], [], []
  for seed in range(args.seeds):
    t0 = time.perf_counter()
    count, x_adv = jax_robust_count(ours_model, x, y, seed=seed, **budget)
    t1 = time.perf_counter()
    theirs.append(torch_robust_count(their_model, x, y, seed=seed, **budget))
    t2 = time.perf_counter()
    ours.append(count)
    shared.append(shared_draw_count(ours_model, x, y, x_adv, seed=seed))
    print(f"| {seed} | {ours[-1]} | {theirs[-1]} | {shared[-1]} | {t1 - t0:.1f} | "
          f"{t2 - t1:.1f} |", flush=True)
  print(f"| mean | {np.mean(ours):.1f} of {args.n} | {np.mean(theirs):.1f} of {args.n} | "
        f"{np.mean(shared):.1f} of {args.n} | | |")


if __name__ == "__main__":
  main()
