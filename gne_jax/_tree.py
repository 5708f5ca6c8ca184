"""Pytree helpers shared across the library (one home each)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ over leaves of ⟨a, b⟩ (real inner product of two like-shaped pytrees)."""
    return sum(jnp.vdot(x, y).real for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True))


def tree_sq_norm(a: PyTree) -> jax.Array:
    """‖a‖² summed over all leaves."""
    return sum(jnp.sum(jnp.square(jnp.abs(x))) for x in jax.tree.leaves(a))


def leaf_dtype(leaf) -> np.dtype:
    """The dtype JAX computes ``leaf`` in: read off a ``jax.Array``, tracer or
    ``ShapeDtypeStruct`` (already canonical), else ``jnp.result_type`` (NumPy arrays,
    Python scalars: float64 becomes float32 unless ``jax_enable_x64`` is on)."""
    dtype = getattr(leaf, "dtype", None)
    if isinstance(dtype, np.dtype) and isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return dtype
    return jnp.result_type(leaf)


def tree_size(tree: PyTree) -> int:
    """Total number of elements over all leaves (a Python int)."""
    return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def is_concrete(*trees: PyTree) -> bool:
    """True when no leaf is a tracer, i.e. we run eagerly (not inside jit/vmap/grad)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def path_names(path) -> tuple[str, ...]:
    """The keys of a ``jax.tree_util`` key path as strings, e.g. ``('Conv_0', 'kernel')``."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        else:
            out.append(str(getattr(k, "idx", k)))
    return tuple(out)
