"""Pytrees as flat {path: leaf} dicts: the one flatten helper for checkpoints, weights and
configs."""

from typing import Mapping

import jax


def flatten(tree, sep: str = "/", is_leaf=None) -> dict:
  """{'a': {'b': x}} -> {'a/b': x}: every leaf of a pytree under its path.

  Args:
    tree: any pytree (dicts, FrozenDicts, flax struct dataclasses, lists, ...).
    sep: the separator between path components.
    is_leaf: as in `jax.tree_util`; e.g. `lambda x: not isinstance(x, dict)` keeps lists and
      None as leaves of a JSON config.

  Returns:
    {path: leaf} in jax's flattening order (dict keys sorted); empty subtrees vanish.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {jax.tree_util.keystr(path, simple=True, separator=sep): leaf for path, leaf in flat}


def flatten_dicts(tree: Mapping, sep: str = "/") -> dict:
  """`flatten` where only (nested) mappings are containers: every other value is a leaf."""
  return flatten(tree, sep, is_leaf=lambda x: not isinstance(x, Mapping))


def unflatten(flat: Mapping, sep: str = "/") -> dict:
  """Inverse of `flatten_dicts`: {'a/b': x} -> {'a': {'b': x}}."""
  tree = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split(sep)
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree
