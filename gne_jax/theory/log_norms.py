"""Orvieto, Kohler et al. (arXiv:2106.03763): log-norm laws at random initialization.

Per-layer ratio Rₗ = ‖x_{ℓ+1}‖²/‖xₗ‖² (derivations §14.3): linear Xavier layers give
Rₗ ~ χ²_d/d, ReLU He layers Rₗ = (2/d)χ²_K with K ~ Bin(d, ½). The mean of Rₗ is 1
but E ln Rₗ < 0, so the typical (median) network shrinks signals like e^{−cL/d}.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma, gammaln, polygamma

Array = jax.Array

__all__ = [
    "linear_log_norm_rate",
    "linear_log_norm_variance",
    "relu_log_norm_rate",
    "LogNormLaw",
    "log_norm_law",
    "CHAIN_MEAN_LOG_ABS_W",
    "CHAIN_VAR_LOG_ABS_W",
    "linear_hessian_trace",
]


def _check_d(d) -> int:
    if isinstance(d, bool) or int(d) != d or int(d) < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return int(d)


def linear_log_norm_rate(d) -> Array:
    """E ln R = ψ(d/2) − ln(d/2) ≈ −1/d − 1/(3d²) for R ~ χ²_d/d."""
    d = _check_d(d)
    h = jnp.asarray(d / 2, dtype=jnp.result_type(float))
    return digamma(h) - jnp.log(h)


def linear_log_norm_variance(d) -> Array:
    """Var ln R = ψ'(d/2) ≈ 2/d."""
    d = _check_d(d)
    return polygamma(1, jnp.asarray(d / 2, dtype=jnp.result_type(float)))


def relu_log_norm_rate(d) -> Array:
    """E[ln R | K ≥ 1] = E_K[ψ(K/2) | K ≥ 1] + ln 2 + ln(2/d), K ~ Bin(d, ½) (≈ −5/(2d))."""
    d = _check_d(d)
    dt = jnp.result_type(float)
    k = jnp.arange(1, d + 1, dtype=dt)
    logp = gammaln(d + 1.0) - gammaln(k + 1) - gammaln(d - k + 1) - d * math.log(2.0)
    p = jnp.exp(logp)
    return jnp.sum(p * digamma(k / 2)) / jnp.sum(p) + math.log(2.0) + math.log(2.0 / d)


class LogNormLaw(NamedTuple):
    """Predictions for ‖x_L‖²/‖x₀‖² after L layers of width d."""

    mean: Array  # E ratio = 1 (the "expectation analysis")
    mean_log: Array  # L · E ln R
    var_log: Array  # L · Var ln R (linear: ψ'(d/2); ReLU: ≈ 5/d)
    median: Array  # ≈ exp(mean_log) (log-normal approximation)


def log_norm_law(d, depth, *, activation: str = "linear") -> LogNormLaw:
    """Mean vs median of ‖x_L‖²/‖x₀‖² for a linear (Xavier) or ReLU (He) MLP of width d."""
    d = _check_d(d)
    if activation == "linear":
        rate, var = linear_log_norm_rate(d), linear_log_norm_variance(d)
    elif activation == "relu":
        rate, var = relu_log_norm_rate(d), jnp.asarray(5.0 / d, dtype=jnp.result_type(float))
    else:
        raise ValueError(f"activation must be one of 'linear', 'relu'; got {activation!r}")
    L = jnp.asarray(depth, dtype=jnp.result_type(float))
    return LogNormLaw(jnp.ones_like(L), L * rate, L * var, jnp.exp(L * rate))


# d = 1 linear chain, w ~ N(0, 1): E ln|w| = −(γ_E + ln 2)/2, Var ln|w| = π²/8.
CHAIN_MEAN_LOG_ABS_W = -(float(np.euler_gamma) + math.log(2.0)) / 2
CHAIN_VAR_LOG_ABS_W = math.pi**2 / 8


def linear_hessian_trace(depth, x_sq_norm=1.0) -> Array:
    """E tr ∇²_θ L = (L+1)‖x‖² for a depth-L linear net with N(0, I/d) readout and
    ℓ = ½(f − y)² (tr H = ‖J_θ‖_F² for piecewise-linear nets)."""
    return (jnp.asarray(depth) + 1) * jnp.asarray(x_sq_norm)
