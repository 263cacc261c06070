"""The package's import graph: no cycles, and the model and math modules never reach up into
the drivers (STYLE.md: a driver may call many rooms; rooms do not reach back into it)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffmic_jax")
LOWER = ("layers", "resnet", "dcg", "denoiser", "diffusion", "losses", "metrics", "sampler",
         "models")
DRIVERS = ("train", "main", "evaluate", "predict")


def _imports(path: str) -> set[str]:
  """diffmic_jax modules imported anywhere in a file (function-level imports included)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.ImportFrom) and node.module == "diffmic_jax":
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffmic_jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("diffmic_jax."))
  return found


def import_graph(package: str = PACKAGE) -> dict[str, set[str]]:
  """{module: the package's modules it imports} over diffmic_jax/*.py."""
  modules = {f[:-3] for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
  return {m: _imports(os.path.join(package, m + ".py")) & modules for m in sorted(modules)}


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


def _reachable(graph, start):
  seen, todo = set(), [start]
  while todo:
    for nxt in graph.get(todo.pop(), ()):
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_no_import_cycles():
  assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("module", LOWER)
def test_lower_modules_never_import_the_drivers(module):
  graph = import_graph()
  assert module in graph
  assert not _reachable(graph, module) & set(DRIVERS), (
      f"{module} reaches {sorted(_reachable(graph, module) & set(DRIVERS))}")


def test_evaluation_never_imports_training():
  graph = import_graph()
  for module in ("evaluate", "run", "train_state", "predict"):
    assert "train" not in _reachable(graph, module), module
