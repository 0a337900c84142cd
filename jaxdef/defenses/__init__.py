"""Plug-in defenses, by name (METHODS.md sections 1-5)."""

from jaxdef.defenses.base import Defense, create_defense, defense_names
