"""Stochastic trace estimation over any matvec (Hutchinson, Hutch++).

Estimators are built by factories and are pure functions of
``(matvec, like, *, key)``, in the style of matfree, so they can be jitted,
vmapped (over keys, over the parameters a matvec closes over) and
differentiated. ``like`` is a pytree of arrays or ``jax.ShapeDtypeStruct``\\ s
giving the shape of the vectors ``matvec`` acts on; probes have that shape.

For a symmetric A of size n and probes v with E[vvᵀ] = I:

  Hutchinson:  Tr A ≈ (1/k) Σ_i v_iᵀ A v_i,  Var[vᵀAv] = 2‖A‖²_F (Gaussian),
               2(‖A‖²_F − Σ A_ii²) (Rademacher).
  Hutch++:     with S ∈ ℝ^{n×s}, Q = orth(AS), P = I − QQᵀ,
               Tr A ≈ Tr(QᵀAQ) + (1/r) Σ_i g_iᵀ PAP g_i,
               s sketch + s exact + r residual matvecs (Meyer et al., 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from gne_jax._tree import is_concrete, tree_vdot
from gne_jax._validate import (
    check_choice,
    check_key,
    check_positive_int,
    legacy_key,
    renamed_argument,
    square_matvec,
)
from gne_jax.linalg.qr import qr
from gne_jax.probes import compiled
from gne_jax.probes.compiled import AbstractTree

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

DISTRIBUTIONS = ("rademacher", "normal")


@struct.dataclass
class TraceEstimate:
    """An estimate of Tr A with its standard error (a pytree; ``num_matvecs`` is static).

    Attributes:
      value: the estimate of Tr A.
      sem: its standard error, sample std / √(number of random probes).
      samples: per-probe values whose mean is ``value`` (Hutch++: the exact
        low-rank part plus each residual probe's value).
      num_matvecs: matvecs spent.
    """

    value: jax.Array
    sem: jax.Array
    samples: jax.Array
    num_matvecs: int = struct.field(pytree_node=False)


def sample_probe(key: jax.Array, like: PyTree, dist: str = "rademacher") -> PyTree:
    """One probe shaped like ``like`` with E[vvᵀ] = I: Rademacher (±1) or N(0, 1).

    Rademacher leaves are drawn from the one key with the leaf index as a salt of the
    counter hash (no key split, which would cost a threefry per probe to compile and run);
    normal leaves from keys split per leaf.
    """
    leaves, treedef = jax.tree.flatten(like)
    if dist == "rademacher":
        out = [rademacher(key, jnp.shape(leaf), _float_dtype(leaf), salt=i)
               for i, leaf in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out)
    keys = jax.random.split(key, len(leaves))
    out = [
        jax.random.normal(k, jnp.shape(leaf), dtype=_float_dtype(leaf))
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def rademacher(key: jax.Array, shape, dtype, *, salt: int = 0) -> jax.Array:
    """±1 with probability ½ each: the top bit of a counter-based hash of (key, index).

    The hash is murmur3's 32-bit finalizer applied twice, keyed by the two words of
    ``key`` (itself a threefry output, e.g. from ``jax.random.split``). It is a pure
    elementwise function of the index, so vmapped and looped draws agree bit for bit,
    and it compiles in a fraction of the time of ``jax.random.rademacher`` (whose
    threefry rounds dominate the compile time of a small probe). ``salt`` (a Python int)
    gives independent draws from the same key, e.g. one per leaf of a pytree.
    """
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    k0 = data[0]
    k1 = data[-1] ^ jnp.uint32((0x9E3779B9 + 0x27D4EB2F * salt) % 2**32)
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"a probe of {size} entries is too large (at most 2**32 - 1).")
    i = jax.lax.iota(jnp.uint32, size)
    h = _fmix32(_fmix32(i ^ k0) + k1)
    return jnp.where(h >> 31 == 0, 1.0, -1.0).astype(dtype).reshape(shape)


def _fmix32(h: jax.Array) -> jax.Array:
    """murmur3's finalizer: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _float_dtype(leaf):
    dtype = leaf.dtype
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def map_probes(fn: Callable, keys: jax.Array, chunk_size: int | None):
    """``vmap(fn)(keys)``, or ``lax.map`` in chunks of ``chunk_size`` to bound memory."""
    if chunk_size is None or chunk_size >= keys.shape[0]:
        return jax.vmap(fn)(keys)
    return jax.lax.map(fn, keys, batch_size=chunk_size)


def mean_and_sem(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample mean and its standard error std(ddof=1)/√k along axis 0."""
    k = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    sem = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(k) if k > 1 else jnp.zeros_like(mean)
    return mean, sem


def hutchinson(
    num_probes: int, /, *, dist: str = "rademacher", probe_chunk: int | None = None,
    chunk_size: int | None = None,
) -> Callable[..., TraceEstimate]:
    """Hutchinson's estimator Tr A ≈ (1/k) Σ vᵢᵀ A vᵢ with k = ``num_probes`` probes.

    Args:
      num_probes: number of probes (one matvec each), >= 2 for a standard error.
      dist: ``"rademacher"`` (default; lower variance for diagonal-heavy A) or ``"normal"``.
      probe_chunk: evaluate the probes ``probe_chunk`` at a time with ``lax.map`` to bound
        memory; ``None`` vmaps over all of them. Same key, same result, whatever the chunk.
      chunk_size: deprecated name of ``probe_chunk``.

    Returns:
      ``estimate(matvec, like, *, key) -> TraceEstimate`` (``like``: a pytree of arrays or
      ShapeDtypeStructs shaped like the vectors).
    """
    k = check_positive_int(num_probes, "num_probes", minimum=2)
    check_choice(dist, "dist", DISTRIBUTIONS)
    probe_chunk = renamed_argument(probe_chunk, chunk_size, new="probe_chunk",
                                   old="chunk_size", default=None)
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")

    opts = dict(num_probes=k, dist=dist, probe_chunk=probe_chunk)

    def estimate(matvec: Matvec, like: PyTree, legacy_like: PyTree = None, /, *,
                 key: jax.Array | None = None) -> TraceEstimate:
        like, key = legacy_key(like, legacy_like, key)
        return _estimate(_hutchinson, opts, matvec, like, check_key(key))

    return estimate


def _estimate(impl, opts, matvec, like, key) -> TraceEstimate:
    """``impl(matvec, key, like=..., **opts)``: inline under a transformation, else one
    program per structure of ``matvec`` (its closed-over arrays are arguments)."""
    abstract = AbstractTree(like)
    if not is_concrete((like, key)):
        return impl(matvec, key, like=abstract, **opts)
    return compiled.call(impl, dict(like=abstract, **opts),
                         [(matvec, (abstract.tree(),), "matvec", "like")], (key,))


def _hutchinson(matvec, key, *, like, num_probes, dist, probe_chunk) -> TraceEstimate:
    like = like.tree()
    matvec = square_matvec(matvec, like)

    def one(k_):
        v = sample_probe(k_, like, dist)
        return tree_vdot(v, matvec(v))

    samples = map_probes(one, jax.random.split(key, num_probes), probe_chunk)
    value, sem = mean_and_sem(samples)
    return TraceEstimate(value, sem, samples, num_probes)


def hutchpp_split(num_matvecs: int) -> tuple[int, int]:
    """(sketch size s, residual probes r) with 2s + r = num_matvecs, s ≈ r ≈ budget/3."""
    s = max(1, num_matvecs // 3)
    return s, num_matvecs - 2 * s


def orthonormal_sketch(matvec_flat: Callable, key, n: int, s: int, dtype, dist: str):
    """Q = orth(A S) for a random n×s test matrix S; columns of Q are orthonormal."""
    draw = rademacher if dist == "rademacher" else jax.random.normal
    S = draw(key, (s, n), dtype=dtype)
    AS = jax.vmap(matvec_flat)(S)  # (s, n)
    Q, _ = qr(AS.T)  # (n, s); batched on GPUs too
    return Q


def hutchpp(
    num_probes: int, /, *, dist: str = "rademacher"
) -> Callable[..., TraceEstimate]:
    """Hutch++: Tr A ≈ Tr(QᵀAQ) + (1/r) Σ gᵢᵀ(I−QQᵀ)A(I−QQᵀ)gᵢ, Q = orth(AS).

    The budget is split as s = ⌊m/3⌋ sketch matvecs, s for QᵀAQ and r = m − 2s random
    residual probes. For a spectrum that decays, the residual's variance is far below
    Hutchinson's at the same budget. The standard error is that of the residual term
    conditional on Q (the low-rank part is exact given Q).

    ``num_probes`` is the total budget m of matvecs.

    Returns:
      ``estimate(matvec, like, *, key) -> TraceEstimate``.
    """
    m = check_positive_int(num_probes, "num_probes", minimum=4)
    check_choice(dist, "dist", DISTRIBUTIONS)
    s, _ = hutchpp_split(m)

    def estimate(matvec: Matvec, like: PyTree, legacy_like: PyTree = None, /, *,
                 key: jax.Array | None = None) -> TraceEstimate:
        like, key = legacy_key(like, legacy_like, key)
        key = check_key(key)
        n = sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(like))
        if s > n:
            raise ValueError(
                f"`num_probes`={m} gives a Hutch++ sketch of {s} columns, more than the "
                f"dimension {n}; use at most {3 * n} matvecs or method 'exact'."
            )
        return _estimate(_hutchpp, dict(num_probes=m, dist=dist), matvec, like, key)

    return estimate


def _hutchpp(matvec, key, *, like, num_probes, dist) -> TraceEstimate:
    s, r = hutchpp_split(num_probes)
    flat_like, unravel = ravel_pytree(jax.tree.map(jnp.zeros_like, like.tree()))
    n, dtype = flat_like.shape[0], _float_dtype(flat_like)
    matvec = square_matvec(matvec, like.tree())

    def mv(v):
        return ravel_pytree(matvec(unravel(v)))[0]

    k_sketch, k_res = jax.random.split(key)
    Q = orthonormal_sketch(mv, k_sketch, n, s, dtype, dist)
    exact = jnp.sum(Q * jax.vmap(mv)(Q.T).T)  # Tr(QᵀAQ)

    def one(k_):
        g = ravel_pytree(sample_probe(k_, unravel(flat_like), dist))[0]
        g = g - Q @ (Q.T @ g)
        return jnp.vdot(g, mv(g)).real

    residual = jax.vmap(one)(jax.random.split(k_res, r))
    value_res, sem = mean_and_sem(residual)
    return TraceEstimate(exact + value_res, sem, exact + residual, num_probes)
