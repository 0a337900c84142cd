"""PGD adversarial training (Madry et al. 2018): minimise CE(f(x_adv), y)."""

from jaxdef.attacks.losses import cross_entropy
from jaxdef.objectives.base import Objective, register


@register("at")
def make_at() -> Objective:
  """Inner: PGD on CE from a uniform start. Outer: CE on the adversarial logits.
  Both take labels or target distributions (CutMix's mixed labels)."""
  return Objective(
      name="at",
      inner_loss=lambda logits_adv, logits_clean, y: cross_entropy(logits_adv, y),
      outer_loss=lambda out_clean, out_adv, y, smoothing=None: cross_entropy(
          out_adv["logits"], y, smoothing),
      attack_init="uniform",
      needs_clean_pass=False,
      soft_labels=True,
  )
