"""Plug-in defenses, by name (docs/methods.md sections 1-5)."""

from jaxdef.defenses.base import (Defense, TestTimeTransform, check_sections,  # noqa: F401
                                  create_defense, create_transform, defense_names,
                                  register_section, register_transform, transform_names)
