"""The package's house: every module stands in a wing or at the door, no import runs from a lower
wing to a higher one, and there is no import cycle (STYLE.md: a driver may call many rooms; rooms
do not reach back into it). The library API names load their modules lazily."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "diffmic_jax")
# From the ground up: a module may import its own wing and the wings below it, never above.
WINGS = ("platform", "data", "nn", "diffusion", "run", "evaluation", "training")
# The commands at the door stand above every wing.
DOOR = ("main", "convert", "launch")


def modules(package: str = PACKAGE) -> set[str]:
  """The package's modules as dotted names under it ('nn.dcg', 'main'), __init__ files aside."""
  found = set()
  for folder, _, names in os.walk(package):
    prefix = os.path.relpath(folder, package).replace(os.sep, ".")
    for name in names:
      if name.endswith(".py") and name != "__init__.py":
        found.add(name[:-3] if prefix == "." else f"{prefix}.{name[:-3]}")
  return found


def _imports(path: str) -> set[str]:
  """diffmic_jax modules a file imports anywhere (function-level imports included), as dotted
  names under the package; a name taken from the package's face itself is 'diffmic_jax:NAME'."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.ImportFrom) and node.module == "diffmic_jax":
      found.update(f"diffmic_jax:{alias.name}" for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffmic_jax."):
      base = node.module[len("diffmic_jax."):]
      found.update({base, *(f"{base}.{alias.name}" for alias in node.names)})
    elif isinstance(node, ast.Import):
      found.update(a.name[len("diffmic_jax."):] for a in node.names
                   if a.name.startswith("diffmic_jax."))
  return found


def import_graph(package: str = PACKAGE) -> dict[str, set[str]]:
  """{module: the package's modules it imports} over every module of the package."""
  names = modules(package)
  return {m: _imports(os.path.join(package, *m.split(".")) + ".py") & names
          for m in sorted(names)}


def rank(module: str) -> int:
  """The floor of a module's wing: 0 for platform up to len(WINGS) for the door."""
  wing = module.split(".")[0]
  return WINGS.index(wing) if wing in WINGS else len(WINGS)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """Every (importer, imported) pair whose imported module stands in a higher wing."""
  return [(a, b) for a in sorted(graph) for b in sorted(graph[a]) if rank(b) > rank(a)]


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_the_wing_rule_finds_an_upward_import():
  graph = {"nn.dcg": {"platform.errors", "nn.layers", "diffusion.losses"},
           "training.train": {"evaluation.evaluate"}, "main": {"training.train"},
           "platform.files": {"main"}}
  assert upward_imports(graph) == [("nn.dcg", "diffusion.losses"), ("platform.files", "main")]


def test_no_import_cycles():
  assert find_cycle(import_graph()) is None


def test_every_module_stands_in_a_wing_or_at_the_door():
  strays = sorted(m for m in modules() if m.split(".")[0] not in WINGS and m not in DOOR)
  assert not strays, f"modules outside the wings {WINGS} and the door {DOOR}: {strays}"


def test_every_wing_says_what_lives_there():
  for wing in WINGS:
    doc = ast.get_docstring(ast.parse(open(os.path.join(PACKAGE, wing, "__init__.py")).read()))
    assert doc and len(doc.splitlines()) <= 4, wing


def test_no_import_runs_from_a_lower_wing_to_a_higher_one():
  assert not upward_imports(import_graph())


def test_modules_import_through_their_wings_not_the_package_face():
  """`from diffmic_jax import sampler` is for downstream code; inside, it would hide the wing."""
  graph = {m: _imports(os.path.join(PACKAGE, *m.split(".")) + ".py") for m in modules()}
  face = {m: sorted(i for i in imports if i.startswith("diffmic_jax:"))
          for m, imports in graph.items()}
  assert not {m: names for m, names in face.items() if names}


@pytest.mark.parametrize("name,module", [("sampler", "diffmic_jax.diffusion.sampler"),
                                         ("evaluate", "diffmic_jax.evaluation.evaluate"),
                                         ("load_run", "diffmic_jax.evaluation.evaluate:load_run")])
def test_the_library_api_keeps_its_path_and_imports_lazily(name, module):
  where = f"{name}.__name__" if ":" not in module else f"{name}.__module__ + ':' + {name}.__name__"
  code = (f"import sys, diffmic_jax; assert 'jax' not in sys.modules; "
          f"from diffmic_jax import {name}; assert {where} == {module!r}, {where}")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr
