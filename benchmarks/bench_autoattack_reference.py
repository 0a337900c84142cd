"""The public ``jaxdef.attacks.autoattack`` called as the README calls it, against pyautoattack.

A PGD-trained twin CNN (benchmarks/compare_torch_attacks.py: the same network
in JAX and PyTorch, weights copied) on the CIFAR-10 subset; the first
``--n`` test images; AutoAttack standard, L-inf 8/255, full budget. Times:

* jaxdef, first call: ``attacks.autoattack(logits_fn, x, y, key=..., eps=...)``
  with no ``jax.jit`` around it, compilation included (the eager path
  compiles one program per stage and batch size);
* jaxdef, second call: the same call again (its programs are compiled);
* pyautoattack 0.2.0: ``AutoAttack(model, norm='Linf', eps=...,
  version='standard').run_standard_evaluation(x, y, batch_size=n)`` on the twin;
* with ``--one-program``, also the traced path as one ``jax.jit`` (compile
  time and run time apart), to compare the compile time of the stages.

Robust accuracy is the re-scored accuracy on the returned images. The
trained weights are cached in ``--weights`` (under /tmp, not in git).

  pip install torch==2.13.0 pyautoattack==0.2.0
  python benchmarks/bench_autoattack_reference.py --n 250
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
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import compare_torch_attacks as twin  # noqa: E402
from jaxdef import attacks  # noqa: E402

EPS = 8 / 255


def pgd_train(x, y, *, key, epochs, batch_size=128, lr=1e-3, steps=5, ramp_epochs=3,
              apply=twin.cnn_apply, params=None):
  """PGD-AT (Madry et al. 2018) of the twin CNN (or of ``apply(params, x)``
  from the initial ``params``): PGD-``steps`` at eps 8/255 (ramped up
  linearly over the first ``ramp_epochs``: at full eps from the start the
  small CNN collapses to a constant), step eps/4, then an Adam step on the
  adversarial batch; numpy parameters."""
  if params is None:
    params = twin.init_cnn(key, x.shape[1:])
  params = jax.tree.map(jnp.asarray, params)
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb, k, eps):
    x_adv = attacks.pgd(functools.partial(apply, params), xb, yb, key=k, eps=eps,
                        step_size=eps / 4, steps=steps)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, x_adv), yb).mean()
    updates, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  per_epoch = len(x) // batch_size
  for epoch in range(epochs):
    order = rng.permutation(len(x))
    for i in range(per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      eps = EPS * min(1.0, (epoch + (i + 1) / per_epoch) / ramp_epochs)
      params, state = step(params, state, x[idx], y[idx],
                           jax.random.fold_in(key, epoch * per_epoch + i), jnp.float32(eps))
  return jax.tree.map(np.asarray, params)


def trained(path, x, y, epochs):
  if os.path.exists(path):
    return dict(np.load(path))
  t0 = time.time()
  params = pgd_train(x, y, key=jax.random.key(0), epochs=epochs)
  np.savez(path, **params)
  print(f"trained the twin CNN with PGD-5 AT for {epochs} epochs in {time.time() - t0:.0f} s "
        f"(cached in {path})")
  return params


def jaxdef_call(logits_fn, x, y, log):
  t0 = time.perf_counter()
  x_adv = attacks.autoattack(logits_fn, x, y, key=jax.random.key(0), eps=EPS, log=log)
  x_adv.block_until_ready()
  seconds = time.perf_counter() - t0
  return seconds, float(np.mean(np.argmax(np.asarray(logits_fn(x_adv)), -1) == y))


def one_program(logits_fn, x, y):
  """(compile s, run s, robust accuracy) of the traced path as one jax.jit."""
  run = jax.jit(lambda x, y, k: attacks.autoattack(logits_fn, x, y, key=k, eps=EPS))
  t0 = time.perf_counter()
  compiled = run.lower(x, y, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  x_adv = compiled(x, y, jax.random.key(0)).block_until_ready()
  run_s = time.perf_counter() - t0
  return compile_s, run_s, float(np.mean(np.argmax(np.asarray(logits_fn(x_adv)), -1) == y))


def batched(fn, x, step):
  """``fn`` on ``x`` in slices of ``step`` rows, the results as one numpy array."""
  return np.concatenate([np.asarray(fn(x[i:i + step])) for i in range(0, len(x), step)])


def pyautoattack_call(model, x, y, log=None, device="cpu", batch_size=None, attacks=None):
  """(seconds, robust mask): pyautoattack's AutoAttack standard on the PyTorch
  ``model`` (NCHW, on ``device``), ``x`` NHWC in [0, 1], in batches of
  ``batch_size`` (None: all at once). ``attacks``: the reference's attacks
  to run, e.g. ``('apgd-ce', 'apgd-t')`` (None: all four). Its own progress
  lines (per stage, with the total time) go to ``log`` if given."""
  import logging
  import torch
  from pyautoattack import AutoAttack
  logger = logging.getLogger("auto-attack")
  logger.setLevel(logging.ERROR if log is None else logging.DEBUG)
  if log is not None and not any(getattr(h, "jaxdef_log", None) is log for h in logger.handlers):
    handler = logging.Handler()
    handler.emit = lambda record: log(record.getMessage())
    handler.jaxdef_log = log
    logger.addHandler(handler)
  aa = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device=device)
  if attacks is not None:
    aa.attacks_to_run = list(attacks)
  xt = torch.tensor(np.transpose(x, (0, 3, 1, 2))).contiguous().to(device)
  yt = torch.tensor(y).long().to(device)
  step = batch_size or len(x)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
  sync()
  t0 = time.perf_counter()
  x_adv = aa.run_standard_evaluation(xt, yt, batch_size=step)[0]
  sync()
  seconds = time.perf_counter() - t0
  with torch.no_grad():
    predicted = batched(lambda a: model(a).argmax(1).cpu(), x_adv, step)
  return seconds, predicted == np.asarray(y)


def reference_call(params, x, y):
  seconds, robust = pyautoattack_call(twin.torch_twin(params), x, y)
  return seconds, float(robust.mean())


def timing_table(rows):
  """The Markdown table of ``(call, seconds, robust accuracy)`` rows."""
  lines = ["| call | seconds | robust accuracy |", "|---|---|---|"]
  lines += [f"| {name} | {seconds:.1f} | {100 * acc:.1f}% |" for name, seconds, acc in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=250, help="test images attacked")
  parser.add_argument("--epochs", type=int, default=10, help="PGD-AT epochs of the twin CNN")
  parser.add_argument("--weights", default="/tmp/jaxdef_bench_aa_twin_cnn.npz")
  parser.add_argument("--skip-reference", action="store_true")
  parser.add_argument("--one-program", action="store_true")
  parser.add_argument("--quiet", action="store_true", help="no per-stage lines")
  args = parser.parse_args()

  import torch
  x_train, y_train, x_test, y_test = twin.load("cifar")
  params = trained(args.weights, x_train, y_train, args.epochs)
  x, y = x_test[:args.n], y_test[:args.n]
  logits_fn = functools.partial(twin.cnn_apply, jax.tree.map(jnp.asarray, params))
  clean = float(np.mean(np.argmax(np.asarray(logits_fn(x)), -1) == y))
  print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"model: twin CNN, PGD-AT; {len(x)} CIFAR-subset test images; clean accuracy "
        f"{100 * clean:.1f}%; AutoAttack standard, L-inf eps 8/255\n")
  log = None if args.quiet else (lambda line: print("  " + line, flush=True))
  rows = []
  first, acc_first = jaxdef_call(logits_fn, x, y, log)
  rows.append(("jaxdef `attacks.autoattack`, first call (compiles)", first, acc_first))
  second, acc_second = jaxdef_call(logits_fn, x, y, log)
  rows.append(("jaxdef `attacks.autoattack`, second call", second, acc_second))
  if args.one_program:
    compile_s, run_s, acc = one_program(logits_fn, x, y)
    rows.append((f"jaxdef one `jax.jit` program (compile {compile_s:.1f} s + run)",
                 compile_s + run_s, acc))
  if not args.skip_reference:
    ref, acc_ref = reference_call(params, x, y)
    rows.append(("pyautoattack 0.2.0 `run_standard_evaluation`", ref, acc_ref))
  print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
  print(timing_table(rows))
  if not args.skip_reference:
    print(f"\nfirst call {ref / first:.2f}x pyautoattack's speed, second call "
          f"{ref / second:.2f}x; robust accuracy difference {100 * (acc_first - acc_ref):+.1f} "
          f"points")


if __name__ == "__main__":
  main()
