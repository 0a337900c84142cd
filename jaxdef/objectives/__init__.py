"""Base adversarial-training objectives (METHODS.md section 0), by name."""

from jaxdef.objectives.base import Objective, create_objective, objective_names
