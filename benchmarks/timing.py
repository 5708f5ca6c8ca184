"""Wall-clock timing shared by the benchmark scripts (JAX dispatch is asynchronous)."""

from __future__ import annotations

import time

import jax
import numpy as np


def elapsed(fn, *args) -> float:
    """Seconds for one call of ``fn(*args)``, waiting for its results."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def median_time(fn, *args, repeats: int = 5) -> float:
    """Median of ``repeats`` timed calls after one untimed call (compile and warm-up)."""
    jax.block_until_ready(fn(*args))
    return float(np.median([elapsed(fn, *args) for _ in range(repeats)]))
