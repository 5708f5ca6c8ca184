"""Luther & Seung (arXiv:1902.04942): sample-variance decay in ReLU networks.

With ρₗ the mean cross-sample correlation of the pre-activations (ReLU, Kaiming,
infinite width), the arc-cosine kernel gives (derivations §14.4)

    ρ_{l+1} = (1/π)[√(1−ρₗ²) + (π − arccos ρₗ)ρₗ],    v²/σ² = 1 − ρ,

starting from ρ = 0 for white-noise input; 1 − ρ_k ≈ 9π²/(2k²) for large k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["arccos_map", "sample_variance_fractions", "sample_variance_asymptote"]


def arccos_map(rho) -> Array:
    """One ReLU + Kaiming layer: ρ ↦ (1/π)[√(1−ρ²) + (π − arccos ρ)ρ]."""
    rho = jnp.clip(jnp.asarray(rho, dtype=jnp.result_type(float)), -1.0, 1.0)
    return (jnp.sqrt(1 - rho**2) + (jnp.pi - jnp.arccos(rho)) * rho) / jnp.pi


def sample_variance_fractions(num_layers: int, rho0=0.0) -> Array:
    """v²/σ² = 1 − ρ_k after k = 1..num_layers ReLU layers (array of length num_layers)."""
    if isinstance(num_layers, bool) or int(num_layers) < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")

    def step(rho, _):
        nxt = arccos_map(rho)
        return nxt, 1 - nxt

    _, out = jax.lax.scan(step, jnp.asarray(rho0, dtype=jnp.result_type(float)), None,
                          length=int(num_layers))
    return out


def sample_variance_asymptote(k) -> Array:
    """1 − ρ_k ≈ 9π²/(2k²) (slow convergence: 0.00444 vs 0.00358 at k = 100)."""
    k = jnp.asarray(k, dtype=jnp.result_type(float))
    return 9 * jnp.pi**2 / (2 * k**2)
