"""Small helpers shared by the check modules (records, pooled moments, figures)."""

from __future__ import annotations

import math

import jax
import numpy as np


def f(x) -> float:
    """A Python float from a scalar array."""
    return float(np.asarray(x))


def mean_se(a, axis=0):
    """Mean and standard error (std/√n, ddof 1) along ``axis``."""
    a = np.asarray(a, np.float64)
    n = a.shape[axis]
    return a.mean(axis), a.std(axis, ddof=1) / math.sqrt(n)


def keys(seed: int, n: int, salt: int = 0):
    """``n`` PRNG keys for the initializations, from the run's seed and a per-check salt."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), salt), n)


def record(quantity, measured, se=math.nan, predicted=math.nan, **extra) -> dict:
    """One CSV record: every measured number carries its SE (and, via ``extra``, n_inits,
    num_probes and the setup)."""
    return {"quantity": quantity, "measured": float(measured), "se": float(se),
            "predicted": float(predicted), **extra}


def figure(ncols=1, nrows=1, size=(5.0, 3.6)):
    """A ``matplotlib.figure.Figure`` with a grid of axes (no global pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes
