"""Parameter trees by name: leaf shapes, and how a checkpoint's tree differs from the one a
config expects.

`first_difference` is the one check of a checkpoint's names and shapes against the expected
ones; classifier loading, train-state restore, `--mode=import` and `pretrained` call it and
wrap its phrase in their own error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

Path = tuple[str, ...]


def key_names(key_path) -> Path:
    """A jax key path as strings: dict keys, attribute names and sequence indices."""
    names = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def leaf_shapes(tree) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of the leaves of `tree` (arrays, ShapeDtypeStructs, Orbax metadata)."""
    return {key_names(path): _shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape(value) -> tuple[int, ...]:
    if isinstance(value, tuple):  # already a shape
        return value
    return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def first_difference(have: Mapping[Path, Any], want: Mapping[Path, Any], *, sep: str = "/",
                     where: str = "the config", first: Iterable[str] = ()) -> str | None:
    """How the first differing parameter differs, or None if the names and shapes agree.

    have: {path: array or shape} of the checkpoint; want: {path: array or shape} expected by
    `where` (the phrase naming the config side). A top-level module present on one side only
    (e.g. Fourier features: continuous vs discrete) says more than the shape differences it
    causes downstream, so it comes first; then paths under the top-level names in `first`
    (e.g. 'params' before the optimizer's moments); then the rest, sorted. Paths are shown
    joined by `sep`.
    """
    have = {path: _shape(v) for path, v in have.items()}
    want = {path: _shape(v) for path, v in want.items()}
    have_tops, want_tops, first = {p[0] for p in have}, {p[0] for p in want}, set(first)

    def order(p):
        return p[0] in have_tops and p[0] in want_tops, p[0] not in first, p

    for path in sorted(set(have) | set(want), key=order):
        a, b = have.get(path), want.get(path)
        if a == b:
            continue
        name = repr(sep.join(path))
        if a is None:
            return f"parameter {name} is absent from the checkpoint (shape {b} in {where})"
        if b is None:
            return f"parameter {name} (shape {a} in the checkpoint) is absent from {where}"
        return f"parameter {name} has shape {a} in the checkpoint but {b} in {where}"
    return None
