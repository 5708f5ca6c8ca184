"""Tarnowski et al. (arXiv:1809.08848): the universal spectrum of residual networks.

For J = ∏ₗ (I + Xₗ) with free branch Jacobians Xₗ the spectrum of JJᵀ depends
on one parameter c = Σₗ (1/N)‖Xₗ‖_F² (derivations §14.1). Its resolvent
G(z) = tr(z − JJᵀ)⁻¹ solves G = (zG − 1)·e^{c(1 − 2zG)}; the moments, edges and
invariants follow in closed form.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "TarnowskiMoments",
    "resnet_c",
    "resnet_c_for_activation",
    "tarnowski_moments",
    "spectrum_edges",
    "resolvent",
    "density",
    "cdf",
]


def _check_c(c) -> None:
    if isinstance(c, jax.core.Tracer):
        return
    if not np.all(np.isfinite(np.asarray(c))) or np.any(np.asarray(c) <= 0):
        raise ValueError(f"c must be finite and > 0, got {c!r}")


class TarnowskiMoments(NamedTuple):
    """Predicted invariants of JJᵀ for a ResNet with parameter c."""

    phi: Array  # e^c
    phi2: Array  # (1+2c)e^{2c}
    varphi: Array  # 2c e^{2c}
    normalized_variance: Array  # 2c
    mean_log_eigenvalue: Array  # 0
    median_eigenvalue: Array  # 1
    isometry_gap: Array  # log(AM/GM) = c
    lower_edge: Array
    upper_edge: Array


def resnet_c(branch_phis) -> Array:
    """c = Σₗ φ(XₗXₗᵀ) = Σₗ (1/N)‖Xₗ‖_F² from the per-branch first moments.

    With branch weights of variance σ²/(N·L) and activation derivative f', this is
    σ²·avgₗ E[f'(hₗ)²] (e.g. σ² linear, σ²/2 ReLU).
    """
    return jnp.sum(jnp.asarray(branch_phis, dtype=jnp.result_type(float)))


def resnet_c_for_activation(sigma2, activation, q=1.0) -> Array:
    """c = σ²·E[f'(h)²], h ~ N(0, q), for depth-scaled branch weights N(0, σ²/(N·L)).

    ``activation`` is a `gne_jax.theory.components.Component` (its φ) or ``"hard_tanh"``
    (E f'² = P(|h| < 1) = 2Φ(1/√q) − 1). Linear: σ²; ReLU: σ²/2; leaky: σ²(1+a²)/2.
    For bounded activations q drifts with depth: average c over the layers' q.
    """
    sigma2 = jnp.asarray(sigma2, dtype=jnp.result_type(float))
    if isinstance(activation, str):
        if activation != "hard_tanh":
            raise ValueError(f"activation must be a Component or 'hard_tanh', got {activation!r}")
        q = jnp.asarray(q, dtype=jnp.result_type(float))
        return sigma2 * (2 * jax.scipy.stats.norm.cdf(1 / jnp.sqrt(q)) - 1)
    return sigma2 * activation.moments(q).phi


def spectrum_edges(c) -> tuple[Array, Array]:
    """Support edges λ± = (s±1)/(s∓1)·e^{±cs}, s = √(1+2/c); λ₊λ₋ = 1."""
    _check_c(c)
    c = jnp.asarray(c, dtype=jnp.result_type(float))
    s = jnp.sqrt(1 + 2 / c)
    return (s - 1) / (s + 1) * jnp.exp(-c * s), (s + 1) / (s - 1) * jnp.exp(c * s)


def tarnowski_moments(c) -> TarnowskiMoments:
    """φ = e^c, φ₂ = (1+2c)e^{2c}, ϕ = 2c·e^{2c}, ϕ/φ² = 2c, E log λ = 0, gap = c."""
    _check_c(c)
    c = jnp.asarray(c, dtype=jnp.result_type(float))
    lo, hi = spectrum_edges(c)
    return TarnowskiMoments(
        phi=jnp.exp(c),
        phi2=(1 + 2 * c) * jnp.exp(2 * c),
        varphi=2 * c * jnp.exp(2 * c),
        normalized_variance=2 * c,
        mean_log_eigenvalue=jnp.zeros_like(c),
        median_eigenvalue=jnp.ones_like(c),
        isometry_gap=c,
        lower_edge=lo,
        upper_edge=hi,
    )


def _solve_u(z, c, num_steps, newton_per_step):
    """u = zG solving u = z(u−1)e^{c(1−2u)}, continued from z + i·∞ down to z + i0⁺.

    The imaginary part of z shrinks geometrically over ``num_steps`` stages; each
    stage runs a few Newton iterations from the previous root. Starting where
    G ≈ 1/z (u ≈ 1 + e^c/z) and staying in the upper half-plane selects the
    physical branch (Im G < 0) without any ordering of the grid.
    """
    cdt = jnp.result_type(1j * jnp.ones((), jnp.result_type(float)))
    lam = jnp.real(z)
    eta_hi = 10.0 * (1.0 + jnp.abs(lam)) * jnp.exp(2 * c)
    eta_lo = jnp.imag(z)
    ratio = (eta_lo / eta_hi) ** (1.0 / (num_steps - 1))

    def newton(u, zz):
        e = jnp.exp(c * (1 - 2 * u))
        F = u - zz * (u - 1) * e
        dF = 1 - zz * e * (1 - 2 * c * (u - 1))
        return u - F / dF

    def stage(k, u):
        zz = (lam + 1j * eta_hi * ratio**k).astype(cdt)
        return jax.lax.fori_loop(0, newton_per_step, lambda _, v: newton(v, zz), u)

    z0 = (lam + 1j * eta_hi).astype(cdt)
    u0 = 1 + jnp.exp(c) / z0
    return jax.lax.fori_loop(0, num_steps, stage, u0)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _resolvent(z, c, num_steps, newton_per_step):
    flat = z.reshape(-1)
    u = jax.vmap(lambda zz: _solve_u(zz, c, num_steps, newton_per_step))(flat)
    return (u / flat).reshape(z.shape)


def resolvent(z, c, *, num_steps: int = 200, newton_per_step: int = 4) -> Array:
    """G(z) = tr(z − JJᵀ)⁻¹ for complex z (Im z > 0), vectorized over z, jit-compatible."""
    _check_c(c)
    cdt = jnp.result_type(1j * jnp.ones((), jnp.result_type(float)))
    z = jnp.asarray(z).astype(cdt)
    c = jnp.asarray(c, dtype=jnp.result_type(float))
    return _resolvent(z, c, int(num_steps), int(newton_per_step))


def density(lam, c, *, eta: float = 1e-9, num_steps: int = 200, newton_per_step: int = 4):
    """ρ(λ) = −Im G(λ + iη)/π, η → 0⁺, on any array of λ > 0 (vectorized, jit-compatible).

    Outside the support [λ₋, λ₊] the result is ~0. In float32 the default η is
    raised to 1e-6 (relative accuracy of the continuation).
    """
    lam = jnp.asarray(lam, dtype=jnp.result_type(float))
    if jnp.result_type(float) == jnp.float32:
        eta = max(eta, 1e-6)
    g = resolvent(lam + 1j * eta * jnp.maximum(lam, 1.0), c, num_steps=num_steps,
                  newton_per_step=newton_per_step)
    return jnp.maximum(-jnp.imag(g) / jnp.pi, 0.0)


def cdf(lam, c, *, num_points: int = 2001) -> Array:
    """Predicted fraction of eigenvalues ≤ λ, by integrating `density` over a grid
    uniform in log λ between the edges (trapezoid rule), then interpolating."""
    lo, hi = spectrum_edges(c)
    t = jnp.linspace(jnp.log(lo), jnp.log(hi), num_points)
    grid = jnp.exp(t)
    rho = density(grid, c) * grid  # density in log λ
    mass = jnp.concatenate([jnp.zeros(1, rho.dtype),
                            jnp.cumsum(0.5 * (rho[1:] + rho[:-1]) * jnp.diff(t))])
    mass = mass / mass[-1]
    lam = jnp.asarray(lam, dtype=grid.dtype)
    return jnp.interp(jnp.log(jnp.clip(lam, lo, hi)), t, mass)
