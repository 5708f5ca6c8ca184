"""Normalized Jacobian moments φ(JJᵀ), φ((JJᵀ)²) and ϕ of any pure function.

With J the m×n Jacobian of ``fn`` at ``x`` (derivations §1):

  φ  = Tr(JJᵀ)/m,      φ₂ = Tr((JJᵀ)²)/m,      ϕ = φ₂ − φ²,

m the output size ("output" normalization, the default: the dimension of the
gradient entering the block on the backward pass). With ``normalize="input"``
the same traces are divided by n, which gives φ(JᵀJ) and φ((JᵀJ)²).

One probe yields both moments: for v with E[vvᵀ] = I, u = Jᵀv (a VJP) and
Ju (a JVP) give E‖u‖² = Tr(JJᵀ) and E‖Ju‖² = Tr((JJᵀ)²) (derivations §15). A probe
therefore costs one VJP plus one JVP of the once-linearized function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gne_jax._tree import is_concrete, tree_size, tree_sq_norm
from gne_jax._validate import check_choice, check_key, check_positive_int
from gne_jax.probes.jacobian import jacobian_operators, output_shape
from gne_jax.probes.stochtrace import (
    DISTRIBUTIONS,
    _float_dtype,
    hutchpp_split,
    map_probes,
    mean_and_sem,
    orthonormal_sketch,
    sample_probe,
)

PyTree = Any

METHODS = ("hutchinson", "hutch++", "exact")
NORMALIZE_BY = ("output", "input")
DEFAULT_EXACT_MAX_ENTRIES = 2**24  # 16.7 M Jacobian entries: 64 MiB in float32


class JacobianMoments(NamedTuple):
    """Estimated normalized moments of JJᵀ, with standard errors.

    Attributes:
      phi: φ = Tr(JJᵀ)/size, the mean squared singular value (gradient-norm gain).
      phi2: φ₂ = Tr((JJᵀ)²)/size.
      varphi: ϕ = φ₂ − φ², the spectral spread (Block Dynamical Isometry wants ϕ ≈ 0).
        The square is bias-corrected: φ̂² − SE(φ̂)² is unbiased for φ².
      phi_sem, phi2_sem, varphi_sem: standard errors from the probe noise (delta method
        for ϕ); zero for ``method="exact"``. They do not include init-to-init variance.
      phi_samples, phi2_samples: per-probe values whose means are phi and phi2.
      num_matvecs: probes spent (each one VJP + one JVP); 0 for ``"exact"``.
      size: the normalizing dimension (m for "output", n for "input").
      out_size, in_size: m and n.
      finite: False when fn(x) or a probe was non-finite (only reachable under an
        outer jit/vmap; an eager call raises instead).
    """

    phi: jax.Array
    phi2: jax.Array
    varphi: jax.Array
    phi_sem: jax.Array
    phi2_sem: jax.Array
    varphi_sem: jax.Array
    phi_samples: jax.Array
    phi2_samples: jax.Array
    num_matvecs: int
    size: int
    out_size: int
    in_size: int
    finite: jax.Array


def moments_from_samples(a: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
    """(φ, φ₂, ϕ, SEs) from per-probe samples a ≈ φ and b ≈ φ₂ (arrays of length k).

    ϕ̂ = b̄ − ā² + s_a²/k is unbiased (E ā² = φ² + Var ā). Its SE by the delta method:
    Var(b̄ − ā²) ≈ Var b̄ + 4ā² Var ā − 4ā Cov(ā, b̄).
    """
    k = a.shape[0]
    phi, phi_sem = mean_and_sem(a)
    phi2, phi2_sem = mean_and_sem(b)
    cov_ab = jnp.sum((a - phi) * (b - phi2)) / (k - 1) / k
    varphi = phi2 - phi**2 + phi_sem**2
    var_varphi = phi2_sem**2 + 4 * phi**2 * phi_sem**2 - 4 * phi * cov_ab
    return phi, phi2, varphi, phi_sem, phi2_sem, jnp.sqrt(jnp.maximum(var_varphi, 0.0))


def _hutchinson_samples(ops, key, num_probes, dist, probe_chunk):
    def one(k):
        u = ops.vjp(sample_probe(k, ops.out, dist))
        return tree_sq_norm(u), tree_sq_norm(ops.jvp(u))

    return map_probes(one, jax.random.split(key, num_probes), probe_chunk)


def _hutchpp_samples(ops, key, num_probes, dist):
    flat_out, unravel = ravel_pytree(ops.out)
    m = flat_out.shape[0]
    s, r = hutchpp_split(num_probes)
    if s > m:
        raise ValueError(
            f"`num_probes`={num_probes} gives a Hutch++ sketch of {s} columns, more than the "
            f"output size {m}; use method='exact' for such small outputs."
        )

    def u_and_w(v):  # u = Jᵀv, w = JJᵀv, both flat
        u = ops.vjp(unravel(v))
        return ravel_pytree(u)[0], ravel_pytree(ops.jvp(u))[0]

    k_sketch, k_res = jax.random.split(key)
    Q = orthonormal_sketch(lambda v: u_and_w(v)[1], k_sketch, m, s, _float_dtype(flat_out),
                           dist)
    U, W = jax.vmap(u_and_w)(Q.T)
    exact_a, exact_b = jnp.sum(U**2), jnp.sum(W**2)  # Tr QᵀAQ, Tr QᵀA²Q

    def one(k):
        g = ravel_pytree(sample_probe(k, ops.out, dist))[0]
        u, w = u_and_w(g - Q @ (Q.T @ g))
        return jnp.sum(u**2), jnp.sum(w**2)

    a, b = jax.vmap(one)(jax.random.split(k_res, r))
    return exact_a + a, exact_b + b


def _exact_traces(ops, x):
    """(Tr JJᵀ, Tr (JJᵀ)²) from the materialized Jacobian (n or m basis products)."""
    flat_x, unravel_x = ravel_pytree(x)
    flat_out, unravel_out = ravel_pytree(ops.out)
    n, m = flat_x.shape[0], flat_out.shape[0]
    if n <= m:  # rows of Jᵀ from n JVPs
        M = jax.vmap(lambda e: ravel_pytree(ops.jvp(unravel_x(e)))[0])(
            jnp.eye(n, dtype=flat_x.dtype))
    else:  # rows of J from m VJPs
        M = jax.vmap(lambda e: ravel_pytree(ops.vjp(unravel_out(e)))[0])(
            jnp.eye(m, dtype=flat_out.dtype))
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return jnp.sum(M**2), jnp.sum(G**2)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


@functools.partial(
    jax.jit, static_argnames=("fn", "num_probes", "method", "dist", "normalize", "probe_chunk")
)
def _moments(fn, x, key, *, num_probes, method, dist, normalize, probe_chunk):
    ops = jacobian_operators(fn, x)
    size = ops.out_size if normalize == "output" else ops.in_size
    if method == "exact":
        tr1, tr2 = _exact_traces(ops, x)
        phi, phi2 = tr1 / size, tr2 / size
        zero = jnp.zeros_like(phi)
        stats = (phi, phi2, phi2 - phi**2, zero, zero, zero)
        a, b, spent = phi[None], phi2[None], 0
    else:
        if method == "hutchinson":
            a, b = _hutchinson_samples(ops, key, num_probes, dist, probe_chunk)
        else:
            a, b = _hutchpp_samples(ops, key, num_probes, dist)
        a, b = a / size, b / size
        stats = moments_from_samples(a, b)
        spent = num_probes
    finite = _all_finite(ops.out) & jnp.isfinite(stats[0]) & jnp.isfinite(stats[1])
    return JacobianMoments(*stats, a, b, spent, size, ops.out_size, ops.in_size, finite)


def jacobian_moments(
    fn: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    key: jax.Array | None = None,
    num_probes: int = 64,
    method: str = "hutchinson",
    dist: str = "rademacher",
    normalize: str = "output",
    probe_chunk: int | None = None,
    exact_max_entries: int = DEFAULT_EXACT_MAX_ENTRIES,
) -> JacobianMoments:
    """φ(JJᵀ), φ((JJᵀ)²) and ϕ of the Jacobian of ``fn`` at ``x``, with standard errors.

    Args:
      fn: pure function of a pytree of float arrays (a Flax ``apply`` with its variables
        closed over, a block, a function of a dict...). Sizes are total element counts.
      x: the input (for batch-coupled ``fn``, the whole batch).
      key: PRNG key for the probes (not needed for ``method="exact"``).
      num_probes: probes (each one VJP + one JVP); >= 2 (Hutch++: >= 4).
      method: ``"hutchinson"`` (default), ``"hutch++"`` (variance-reduced at the same
        number of probes; best when the spectrum decays) or ``"exact"`` (materializes J;
        refused above ``exact_max_entries`` entries, which you may raise).
      dist: probe distribution, ``"rademacher"`` (default) or ``"normal"``.
      normalize: ``"output"`` divides the traces by the output size m (φ(JJᵀ), the
        convention of the GNE framework); ``"input"`` by the input size n (φ(JᵀJ)).
      probe_chunk: evaluate probes this many at a time (``lax.map``) to bound memory;
        ``None`` vmaps over all. The result does not depend on it.
      exact_max_entries: size limit m·n for ``method="exact"``.

    Returns:
      ``JacobianMoments``. Pure: composes with jit, vmap (keys, parameters) and grad.
    """
    check_choice(method, "method", METHODS)
    check_choice(dist, "dist", DISTRIBUTIONS)
    check_choice(normalize, "normalize", NORMALIZE_BY)
    check_positive_int(num_probes, "num_probes", minimum=4 if method == "hutch++" else 2)
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable; got {type(fn).__name__}.")
    if method == "exact":
        entries = tree_size(output_shape(fn, x)) * tree_size(x)
        if entries > exact_max_entries:
            raise ValueError(
                f"method='exact' would materialize a Jacobian with {entries} entries, above "
                f"`exact_max_entries`={exact_max_entries}; use method='hutchinson' or raise "
                f"the limit."
            )
        key = jax.random.key(0) if key is None else check_key(key)  # unused
    else:
        key = check_key(key)
    result = _moments(fn, x, key, num_probes=num_probes, method=method, dist=dist,
                      normalize=normalize, probe_chunk=probe_chunk)
    if is_concrete((x, key, result.finite)) and not bool(result.finite):
        raise_non_finite(fn, x)
    return result


def raise_non_finite(fn, x) -> None:
    """Says which of x, fn(x) or the Jacobian products is non-finite."""
    if not bool(_all_finite(x)):
        raise FloatingPointError("`x` contains non-finite values (NaN or inf).")
    if not bool(_all_finite(fn(x))):
        raise FloatingPointError(
            "`fn(x)` is non-finite (NaN or inf) at the given input: the Jacobian moments are "
            "undefined there. Check the function's parameters and input scale."
        )
    raise FloatingPointError(
        "the Jacobian products of `fn` at `x` overflowed to non-finite values; the Jacobian "
        "is too large for this dtype (try float64 via jax_enable_x64 or rescale)."
    )
