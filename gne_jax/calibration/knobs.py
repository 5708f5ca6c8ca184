"""Knobs: the one scalar per block that calibration turns.

A knob is a pure function ``knob(params, g) -> params`` that rescales part of one
block's parameters by the scalar ``g`` (``g = 1`` leaves them unchanged). Built-in:

* ``"kernel"``: every leaf named ``kernel`` (Flax ``Dense``/``Conv`` weights) times g.
  For a plain block h ↦ f(N(g·Wh)) with a homogeneous f (linear, ReLU, leaky ReLU) and
  no bias, φ(g) = g²·φ(1) exactly; for tanh φ grows more slowly than g² (saturation).
  In a residual block s(h) + b(h) whose shortcut has no kernel (identity, or the
  zero-padded down-sampling shortcut), this is the **branch scale**.
* ``"scale"``: every leaf named ``scale`` (the γ of BN/SMN, the weight-norm scale), the
  knob for blocks whose kernel scale a normalization layer cancels.
* ``"all"``: every floating-point leaf except batch statistics, for plain functions whose
  parameters are only weights (e.g. ``{"w": W}``).
* any callable ``(params, g) -> params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gne_jax._tree import path_names

PyTree = Any
KNOBS = ("kernel", "scale", "all")
_STAT_COLLECTIONS = ("batch_stats",)


def _selector(name: str) -> Callable[[tuple[str, ...], Any], bool]:
    if name == "kernel":
        return lambda path, leaf: bool(path) and path[-1] == "kernel"
    if name == "scale":
        return lambda path, leaf: (bool(path) and path[-1] == "scale"
                                   and not any(p in _STAT_COLLECTIONS for p in path))
    if name == "all":
        return lambda path, leaf: (jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
                                   and not any(p in _STAT_COLLECTIONS for p in path)
                                   and not (path and path[0] == "xs"))
    raise ValueError(f"`knob` must be one of {list(KNOBS)} or a callable; got {name!r}.")


def scale_leaves(params: PyTree, g, select) -> PyTree:
    """``params`` with the leaves picked by ``select(path, leaf)`` multiplied by ``g``."""

    def f(path, leaf):
        if select(path_names(path), leaf):
            return (leaf * g).astype(jnp.result_type(leaf))
        return leaf

    return jax.tree_util.tree_map_with_path(f, params)


def make_knob(knob) -> tuple[Callable[[PyTree, Any], PyTree], str, Callable | None]:
    """``(fn(params, g) -> params, name, selector or None)`` for a knob name or callable."""
    if callable(knob):
        return knob, getattr(knob, "__name__", "custom"), None
    select = _selector(knob)
    return (lambda p, g: scale_leaves(p, g, select)), knob, select


def count_selected(params: PyTree, select) -> int:
    """How many leaves of ``params`` the knob's selector picks (0: the knob is absent)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(bool(select(path_names(p), leaf)) for p, leaf in leaves)
