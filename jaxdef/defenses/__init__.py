"""Plug-in defenses, by name (METHODS.md sections 1-5)."""

from jaxdef.defenses.base import (Defense, TestTimeTransform, create_defense, create_transform,
                                  defense_names, register_transform, transform_names)
