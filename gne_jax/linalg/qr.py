"""Reduced QR of tall matrices that stays batched on GPUs.

``jnp.linalg.qr`` factors with ``geqrf`` and then forms Q with ``orgqr``. Under ``vmap``
jaxlib's GPU ``orgqr`` is one solver call per matrix, so an ensemble of orthogonal
initializations (inits × layers matrices) or a vmapped Hutch++ sketch runs thousands of
small sequential calls. ``householder_qr`` forms the same Q from the reflectors with two
matrix products and one triangular solve, which batch; ``qr`` uses it on GPUs and
``jnp.linalg.qr`` elsewhere, so CPU and TPU results are those of LAPACK/XLA unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # the LAPACK-style factorization behind jnp.linalg.qr (jax.lax does not export it)
    from jax._src.lax.linalg import geqrf as _geqrf
except ImportError:  # pragma: no cover - such a jax forms Q with jnp.linalg.qr everywhere
    _geqrf = None

Array = jax.Array


def _lapack_qr(a: Array) -> tuple[Array, Array]:
    return tuple(jnp.linalg.qr(a))


def householder_qr(a: Array) -> tuple[Array, Array]:
    """Reduced QR (Q: m × n, R: n × n) of a tall ``a`` (m ≥ n) from its Householder reflectors.

    ``geqrf`` gives R and reflectors H_i = I − τ_i v_i v_iᵀ (v_i unit lower-trapezoidal,
    the columns of V). Then H_1⋯H_n = I − V T Vᵀ with T upper triangular and
    T⁻¹ = striu(VᵀV) + diag(1/τ) (the "UT transform", Joffrain et al. 2006), so
    Q = H_1⋯H_n I_{m×n} = I_{m×n} − V T V_{1:n}ᵀ. A reflector with τ = 0 is the identity
    and is dropped. Same Q and R as ``jnp.linalg.qr(a)`` up to rounding.
    """
    m, n = jnp.shape(a)[-2:]
    if m < n:
        raise ValueError(f"`a` must be tall (rows >= columns); got shape {jnp.shape(a)}.")
    if _geqrf is None:  # pragma: no cover
        return _lapack_qr(a)
    packed, tau = _geqrf(a)
    keep = tau != 0
    v = (jnp.tril(packed[..., :, :n], -1) + jnp.eye(m, n, dtype=a.dtype)) * keep[..., None, :]
    t_inv = (jnp.triu(jnp.swapaxes(v, -1, -2) @ v, 1)
             + jnp.eye(n, dtype=a.dtype) / jnp.where(keep, tau, 1)[..., None, :])
    x = jax.lax.linalg.triangular_solve(t_inv, jnp.swapaxes(v[..., :n, :], -1, -2),
                                        left_side=True, lower=False)
    return jnp.eye(m, n, dtype=a.dtype) - v @ x, jnp.triu(packed[..., :n, :])


def qr(a: Array) -> tuple[Array, Array]:
    """Reduced QR of a tall ``a``: ``householder_qr`` on GPUs, ``jnp.linalg.qr`` elsewhere."""
    return jax.lax.platform_dependent(a, cuda=householder_qr, rocm=householder_qr,
                                      default=_lapack_qr)
