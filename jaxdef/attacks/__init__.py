"""Attacks: pure, jit-able functions of a logits function ``x -> logits``."""

from jaxdef.attacks.losses import (cross_entropy, cw_loss, dlr_loss, dlr_targeted_loss,
                                   kl_divergence, margin)
from jaxdef.attacks.pgd import check_budget, cw_linf, fgsm, perturb, pgd, project
from jaxdef.attacks.apgd import apgd, apgd_t
from jaxdef.attacks.autoattack import autoattack
from jaxdef.attacks.fab import fab, fab_t
from jaxdef.attacks.square import square
from jaxdef.attacks.least_likely import least_likely
from jaxdef.attacks.adaptive import bpda, defended_logits_fn
