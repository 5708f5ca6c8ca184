"""The GNE paper's orthogonal + gain recipe (derivations §8, §9), as a comparison point.

Orthogonal weights times the activation gain γ with γ²·φ_act = 1 make every
weight + activation block have φ ≈ 1 and ϕ ≈ 0 in the mean-field limit: no data, no
probes. ``orthogonal_gain_config`` turns a model config into that recipe;
``orthogonal_gain`` redraws the kernels of a plain parameter pytree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from gne_jax.calibration.lsuv import orthonormal_kernels

PyTree = Any


def orthogonal_gain_config(config: Mapping[str, Any], *, conv_init: str = "orthogonal") -> dict:
    """``config`` with orthogonal hidden weights and the activation's gain (``gain=None``).

    The MLP gets ``init="orthogonal"``; conv nets ``conv_init`` (``"orthogonal"``: the
    flattened kernel, as the reference code; ``"delta_orthogonal"``: an orthogonal centre
    tap, an exact isometry per position). The head keeps its own init (φ = 1).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if conv_init not in ("orthogonal", "delta_orthogonal"):
        raise ValueError(f"`conv_init` must be 'orthogonal' or 'delta_orthogonal'; "
                         f"got {conv_init!r}.")
    cfg = dict(config)
    cfg["init"] = "orthogonal" if cfg.get("name") == "mlp" else conv_init
    cfg["gain"] = None
    return cfg


def orthogonal_gain(params: PyTree, key: jax.Array, gain: float) -> PyTree:
    """Every ``kernel`` leaf of ``params`` redrawn as gain × Haar-orthogonal (flattened to
    (fan_in, fan_out)); use ``gne_jax.activation_gain(name)`` for the gain."""
    return orthonormal_kernels(params, key, gain)
