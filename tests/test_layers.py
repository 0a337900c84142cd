"""The package's import structure: data flows one way (issue 13).

config -> data + model (+ defense) -> objective -> step -> checkpoint ->
restore -> evaluate -> the command line. Every import of a jaxdef module by another, at module
level or inside a function, is read from the source; each top-level unit of
the package has a layer and may import only units of lower layers.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxdef"
# Lowest first; a unit may import units of strictly lower layers (or itself).
LAYERS = (
    ("errors", "version", "signals", "progress"),
    ("registry",),
    ("attacks",),
    ("data", "models"),
    ("saliency", "objectives"),
    ("defenses",),
    ("config",),
    ("build",),
    ("checkpoint",),
    ("restored",),
    ("train", "interop"),
    ("evaluate",),
    ("shipped",),
    ("cli",),
    ("__init__", "__main__"),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def imports(path: pathlib.Path) -> set[str]:
  """The jaxdef modules ``path`` imports (``from jaxdef import x`` counts as jaxdef.x)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      if node.module == "jaxdef":
        found |= {f"jaxdef.{a.name}" for a in node.names}
  return {m for m in found if m.startswith("jaxdef.")}


def graph() -> dict[str, set[str]]:
  return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_of_the_package_has_a_layer():
  units = {unit(m) for m in graph()}
  assert units <= set(RANK), f"give these a layer: {sorted(units - set(RANK))}"


def test_no_import_points_up_the_layers():
  upward = sorted(f"{m} imports {d}" for m, deps in graph().items() for d in deps
                  if unit(d) != unit(m) and RANK[unit(d)] >= RANK[unit(m)])
  assert not upward, "\n".join(upward)


def test_no_import_cycle_between_units():
  """Follows from the layering; checked directly so a wrong layer table cannot hide one."""
  edges = {}
  for m, deps in graph().items():
    edges.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))

  def reaches(start, goal, seen=()):
    return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
               for n in edges.get(start, ()))
  cyclic = sorted(u for u in edges if reaches(u, u))
  assert not cyclic, cyclic


@pytest.mark.parametrize("forbidden", ["jaxdef.checkpoint", "jaxdef.restored", "jaxdef.train",
                                       "jaxdef.data.dataset", "jaxdef.evaluate"])
def test_defenses_neither_restore_checkpoints_nor_load_data(forbidden):
  offenders = sorted(m for m, deps in graph().items() if unit(m) == "defenses"
                     for d in deps if d == forbidden or d.startswith(forbidden + "."))
  assert not offenders, offenders


def test_the_trainer_imports_no_specific_defense():
  """Only the interface (jaxdef.defenses.base); defenses plug in through build."""
  specific = sorted(f"{m} imports {d}" for m, deps in graph().items() if unit(m) == "train"
                    for d in deps if d.startswith("jaxdef.defenses.") and d != "jaxdef.defenses.base")
  assert not specific, specific


def test_the_runtime_package_never_imports_torch():
  """PyTorch (the benchmarks' twin) stays in benchmarks/."""
  def torch_imports(path):
    return [n for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            and any(name.split(".")[0] == "torch" for name in (
                [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))]
  assert not [p.name for p in PACKAGE.rglob("*.py") if torch_imports(p)]
