"""Base adversarial-training objectives (docs/methods.md section 0), by name."""

from jaxdef.objectives.base import Objective, create_objective, objective_names
