"""Meterez et al. (arXiv:2310.02012): batch normalization without gradient explosion.

The isometry gap of a batch of representations, Theorem 1's decay bound,
Theorem 3's one-layer factor (Corollary 4 in log form), the near-isometry
decay rate d/(d+2) [derived], and the Gaussian-weight ReLU+BN explosion rate
π/(π−1) per layer (derivations §14.2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "isometry_gap",
    "isometry",
    "meterez_bn",
    "theorem1_bound",
    "theorem3_factor",
    "corollary4_bound",
    "near_isometry_rate",
    "BN_RELU_EXPLOSION_RATE",
    "bn_relu_explosion_rate",
]


def _check_matrix(name, X) -> Array:
    X = jnp.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples × features), got shape {X.shape}")
    return X


def isometry_gap(X) -> Array:
    """gap(X) = −mean log eig(G) + log mean eig(G), G = XXᵀ for X of shape (n, d).

    ≥ 0; 0 iff the Gram matrix of the n samples is a multiple of I; +∞ when it is
    singular (rank-deficient X).
    """
    X = _check_matrix("X", X)
    ev = jnp.linalg.eigvalsh(X @ X.T)
    safe = jnp.where(ev > 0, ev, 1.0)
    gap = -jnp.mean(jnp.log(safe)) + jnp.log(jnp.mean(ev))
    return jnp.where(jnp.all(ev > 0), gap, jnp.inf)


def isometry(X) -> Array:
    """𝓘(X) = e^{−gap} = geometric mean / arithmetic mean of the Gram eigenvalues."""
    return jnp.exp(-isometry_gap(X))


def meterez_bn(X, *, factor: float = 1.0) -> Array:
    """BN(X) = factor·diag(XXᵀ)^{−1/2}X for X of shape (d, n): each feature row is
    divided by its norm over the batch (no mean subtraction; factor √n gives unit
    second moment)."""
    X = _check_matrix("X", X)
    return factor * X / jnp.linalg.norm(X, axis=1, keepdims=True)


def theorem1_bound(gap0, d: int, depth, *, C: float = 1.0) -> Array:
    """E gap(X_{ℓ+1}) ≤ gap(X₀)·e^{−ℓ/k}, k = C·d²(1 + d·gap(X₀)) (C an absolute constant)."""
    if int(d) < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    gap0 = jnp.asarray(gap0, dtype=jnp.result_type(float))
    k = C * d**2 * (1 + d * gap0)
    return gap0 * jnp.exp(-jnp.asarray(depth) / k)


def theorem3_factor(X) -> Array:
    """(1 − Σₖ(λₖ−1)²/(2d²(d+2)))⁻¹ with λₖ the eigenvalues of XXᵀ, X (d × d) batch-normalized.

    Theorem 3: E_W 𝓘(BN(WX)) ≥ factor · 𝓘(X) for W ~ Haar(O_d).
    """
    X = _check_matrix("X", X)
    d = X.shape[0]
    ev = jnp.linalg.eigvalsh(X @ X.T)
    return 1.0 / (1.0 - jnp.sum((ev - 1) ** 2) / (2 * d**2 * (d + 2)))


def corollary4_bound(X) -> Array:
    """E_W[gap(BN(WX)) | X] ≤ gap(X) + log(1 − Σₖ(λₖ−1)²/(2d²(d+2)))."""
    return isometry_gap(X) - jnp.log(theorem3_factor(X))


def near_isometry_rate(d: int) -> float:
    """[derived] E gap_{ℓ+1} ≈ d/(d+2)·gap_ℓ near isometry (Haar W, BN removes diag(WΔWᵀ))."""
    if int(d) < 1:
        raise ValueError(f"d must be a positive integer, got {d!r}")
    return d / (d + 2)


BN_RELU_EXPLOSION_RATE = math.pi / (math.pi - 1)


def bn_relu_explosion_rate() -> float:
    """π/(π−1) ≈ 1.4669: growth of the mean squared input gradient per ReLU+BN layer
    (Gaussian Kaiming weights, wide layers, large batch; Yang et al. 2019 via derivations §14.2)."""
    return BN_RELU_EXPLOSION_RATE
