"""Tree paths and ``where=`` rules: which leaves of a params pytree a transform touches.

A leaf's path is its key path joined with ``/`` (``model/layers/3/mlp/up_proj/weight``; list
indices and attribute names included, flax.nnx ``.value`` wrappers skipped). A rule is a regex
searched in that path, a predicate ``(path, leaf) -> bool``, or :data:`DEFAULT`, which selects
matrices (>= 2-D float leaves) that are not embeddings, norms or biases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp

from jaxq.core.leaf import is_leaf

Predicate = Callable[[str, Any], bool]
Where = Union[str, Predicate, None]  # noqa: UP007 (a runtime alias on Python 3.10)

#: Path components that the default rule never selects: embeddings of every common naming
#: (``embed_tokens``, ``tok_embeddings``, ``word_embeddings``, ``position_embeddings``,
#: ``token_type_embeddings``, GPT-2's ``wte``/``wpe``, and ``emb`` as a word: ``word_emb``,
#: ``pos_emb``, ``type_emb``, ``Emb_0``), norms and biases. A lookup table is not a matmul: its
#: rows are read one at a time, and quantizing them costs more quality per bit than a linear.
DEFAULT_EXCLUDE = re.compile(
    r"(^|/)([^/]*(embed|wte|wpe|norm|ln_|bias)[^/]*"
    r"|([^/]*[_.\-])?emb([_.\-\d][^/]*)?)(/|$)",
    re.IGNORECASE)


def key_to_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: tuple) -> str:
    parts = [key_to_str(k) for k in path]
    if parts and parts[-1] in ("value", "raw_value"):  # flax.nnx Variable wrappers
        parts = parts[:-1]
    return "/".join(parts)


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p), leaf) for p, leaf in leaves], treedef


def default_rule(path: str, leaf: Any) -> bool:
    """Float matrices that are not embeddings, norms or biases."""
    if is_leaf(leaf):
        return False
    if jnp.ndim(leaf) < 2 or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        return False
    return DEFAULT_EXCLUDE.search(path) is None


def compile_where(where: Where) -> Predicate:
    """Turn a ``where=`` rule into a predicate. ``None`` means :func:`default_rule`."""
    if where is None:
        return default_rule
    if isinstance(where, str):
        pattern = re.compile(where)

        def by_regex(path: str, leaf: Any) -> bool:
            # A regex narrows the default kind of leaf (float matrices) to paths; a predicate
            # is taken literally and may select anything.
            return (pattern.search(path) is not None and not is_leaf(leaf)
                    and jnp.ndim(leaf) >= 2
                    and jnp.issubdtype(jnp.result_type(leaf), jnp.floating))

        return by_regex
    if callable(where):
        return where
    raise TypeError(f"where= must be a regex string, a predicate or None, got {type(where)}")


def select(tree: Any, where: Where = None) -> list[str]:
    """Paths of the leaves a rule selects (handy for checking a rule before running it)."""
    rule = compile_where(where)
    leaves, _ = flatten_with_paths(tree)
    return [p for p, leaf in leaves if rule(p, leaf)]


def paths_for_rules(tree: Any) -> list[tuple[str, Any]]:
    """Every ``(path, leaf)`` a ``where=`` or ``overrides`` pattern can meet in ``tree``: the
    leaves, and the children of compressed leaves that later transforms reach into
    (``.../weight/a`` for a low-rank leaf's factor)."""
    out = []

    def visit(path: str, leaf: Any) -> None:
        out.append((path, leaf))
        if is_leaf(leaf):
            for name in leaf.reachable:
                child = getattr(leaf, name)
                if child is not None:
                    visit(f"{path}/{name}", child)

    for path, leaf in flatten_with_paths(tree)[0]:
        visit(path, leaf)
    return out


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Map ``fn(path, leaf)`` over leaves (compressed leaves included as leaves)."""
    leaves, treedef = flatten_with_paths(tree)
    return jax.tree_util.tree_unflatten(treedef, [fn(p, leaf) for p, leaf in leaves])
