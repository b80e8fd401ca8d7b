"""Typed access to Zarr v3 groups: `group[name]` may be an array or a sub-group (ours are arrays), and attributes
are JSON values."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `group`; a sub-group of that name is an error, not something to index."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{group.store_path}/{name}: a Zarr group where an array was expected")
    return node


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """All of the array `name` of `group` in memory, as numpy."""
    return np.asarray(zarr_array(group, name)[...])


def attrs_dict(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A group's or array's attributes as a plain dict (a copy; values are whatever JSON the writer stored)."""
    return dict(node.attrs)
