# The offline default: PGD adversarial training of the small CNN on the embedded
# MNIST5k digits (4000 train / 1000 test), L-inf eps 0.3, then its evaluation on
# the first 200 test digits (the full suite with AutoAttack: about 14 minutes on
# 2 CPU cores; jaxdef eval prints its estimate first).
#   jaxdef train --config default --workdir runs/default
#   jaxdef eval --workdir runs/default
# Reaches (measured, 2-core CPU): see README "What the default run reaches".
"""Default config: small CNN, MNIST5k, PGD-AT eps 0.3, within 10 minutes on 2 CPU cores.

Budget choices for CPU: PGD-10 with step 0.04 (instead of the usual 40 x
0.01) and eps ramped linearly from 0 over the first 2 epochs, which keeps
eps-0.3 MNIST training from stalling at chance.
"""

from jaxdef.config import base_config


def get_config():
  c = base_config()
  c.data.update(name="mnist5k", augment="none")
  c.model.update(name="small_cnn", kwargs={"width": 1.0})
  c.attack.update(eps=0.3, step_size=0.04, steps=10, warmup_epochs=2.0)
  c.train.update(batch_size=50, epochs=8, eval_examples=500, eval_every_epochs=2,
                 eval_pgd_step_size=0.025, eval_batch_size=250, log_every_steps=10,
                 checkpoint_every_steps=200)
  c.train.optimizer.update(lr=0.05, weight_decay=5e-4, milestones=(6, 7))
  # AutoAttack spends its whole budget on nearly every digit of a robust model:
  # 200 digits take about 14 minutes on 2 CPU cores, all 1000 over an hour.
  c.eval.num_examples = 200
  return c
