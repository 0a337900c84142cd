"""``jaxdef show-config --summary``: the run's size from XLA on this host."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdef import cli
from jaxdef.build import DataMeta, build
from jaxdef.configs.default import get_config
from jaxdef.data import load_dataset


def test_summary_prints_the_exact_parameter_count_flops_and_a_memory_estimate(capsys):
  assert cli.run(["show-config", "--config", "default", "--summary"]) == 0
  out = capsys.readouterr().out
  config = get_config()
  meta = DataMeta.from_dataset(load_dataset(config.data))
  model, _, _ = build(config, meta)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                jnp.zeros((1, *meta.image_shape)), train=False))
  expected = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  assert re.search(rf"^parameters: {expected}$", out, re.M), out
  forward = re.search(r"^forward FLOPs per example: ([0-9.]+) MFLOP", out, re.M)
  step = re.search(r"^train step FLOPs per example: ([0-9.]+) MFLOP", out, re.M)
  assert forward and step, out
  # PGD-10 training: ten input gradients and one weight update cost far more
  # than one forward pass.
  assert float(step.group(1)) > 10 * float(forward.group(1)) > 0
  assert re.search(r"^train step memory at batch 50: [0-9.]+ MiB \(estimate", out, re.M), out
