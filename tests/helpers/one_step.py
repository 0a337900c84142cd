"""Runs two training steps of the tiny config on all visible devices and saves the params.

Used by tests/test_train.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (the device count must
be fixed before JAX starts).
Usage: python tests/helpers/one_step.py OUT.npz
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from conftest import tiny_config  # noqa: E402
from jaxdef import data as data_lib  # noqa: E402
from jaxdef.build import DataMeta, build  # noqa: E402
from jaxdef.train.mesh import batch_sharded, data_mesh, replicated  # noqa: E402
from jaxdef.train.state import init_train_state, make_optimizer  # noqa: E402
from jaxdef.train.step import AttackBudget, make_train_step  # noqa: E402


def main(out: str) -> None:
  # A model with BatchNorm, so the global-batch statistics are part of the check.
  config = tiny_config(**{"model.name": "wide_resnet", "model.kwargs": {"depth": 10, "width": 1},
                          "train.batch_size": 16})
  dataset = data_lib.load_dataset(config.data)
  meta = DataMeta.from_dataset(dataset)
  model, objective, defense = build(config, meta)
  tx = make_optimizer(config.train.optimizer, 10, 4)
  mesh = data_mesh()
  rep, shard = replicated(mesh), batch_sharded(mesh)
  state = jax.jit(functools.partial(init_train_state, model, tx, jax.random.key(0),
                                    image_shape=meta.image_shape), out_shardings=rep)()
  att = config.attack
  step = jax.jit(make_train_step(
      model=model, tx=tx, objective=objective, defense=defense,
      budget=AttackBudget(eps=att.eps, step_size=att.step_size, steps=att.steps),
      augment="crop_flip", ema_decay=0.9, seed=1),
      in_shardings=(rep, shard, shard), out_shardings=(rep, rep), donate_argnums=0)
  for i in range(2):
    idx = data_lib.train_batch_indices(len(dataset.y_train), 16, 0, i)
    x, y = data_lib.shard_batch(dataset.x_train, dataset.y_train, idx, shard)
    state, metrics = step(state, x, y)
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(
      {"params": state.params, "ema": state.ema_params, "batch_stats": state.batch_stats}))
  np.savez(out, devices=jax.device_count(), loss=float(metrics["loss"]),
           **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})


if __name__ == "__main__":
  main(sys.argv[1])
