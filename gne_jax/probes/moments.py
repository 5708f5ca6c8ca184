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
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from gne_jax._tree import leaf_dtype, tree_size
from gne_jax._validate import (
    check_choice,
    check_float_tree,
    check_input_tree,
    check_key,
    check_positive_int,
)
from gne_jax.probes import compiled
from gne_jax.probes.jacobian import jacobian_operators, output_shape
from gne_jax.probes.stochtrace import (
    DISTRIBUTIONS,
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


@struct.dataclass
class JacobianMoments:
    """Estimated normalized moments of JJᵀ, with standard errors (a pytree).

    Attributes:
      phi: φ = Tr(JJᵀ)/size, the mean squared singular value (gradient-norm gain).
      phi2: φ₂ = Tr((JJᵀ)²)/size.
      varphi: ϕ = φ₂ − φ², the spectral spread (Block Dynamical Isometry wants ϕ ≈ 0).
        The square is bias-corrected: φ̂² − SE(φ̂)² is unbiased for φ².
      phi_sem, phi2_sem, varphi_sem: standard errors from the probe noise (delta method
        for ϕ); zero for φ, φ₂ with ``method="exact"``. ``varphi_sem`` also carries the
        rounding floor of the difference φ₂ − φ², 4·eps·(|φ₂| + φ²) with eps that of the
        computation's dtype, so a ϕ lost to cancellation (large φ, small spread) is
        reported with an SE that covers it. They do not include init-to-init variance.
      phi_samples, phi2_samples: per-probe values whose means are phi and phi2.
      num_matvecs: probes spent (each one VJP + one JVP); 0 for ``"exact"`` (static).
      size: the normalizing dimension (m for "output", n for "input") (static).
      out_size, in_size: m and n (static).
      finite: False when x, fn(x) or a probe was non-finite (only reachable under an
        outer jit/vmap; an eager call raises instead).

    Static fields are not pytree leaves: results pass through ``jax.jit``, ``jax.vmap``
    and ``jax.tree.map`` with them unchanged (Python ints). In a ``BlockMoments`` whose
    blocks have different sizes they are tuples with one entry per block.
    """

    phi: jax.Array
    phi2: jax.Array
    varphi: jax.Array
    phi_sem: jax.Array
    phi2_sem: jax.Array
    varphi_sem: jax.Array
    phi_samples: jax.Array
    phi2_samples: jax.Array
    num_matvecs: int = struct.field(pytree_node=False)
    size: int = struct.field(pytree_node=False)
    out_size: int = struct.field(pytree_node=False)
    in_size: int = struct.field(pytree_node=False)
    finite: jax.Array = None

    @property
    def spread(self) -> jax.Array:
        """ϕ/φ² = φ₂/φ² − 1, the scale-free spectral spread (0 for an isometry up to scale)."""
        return self.varphi / self.phi**2

    @property
    def spread_sem(self) -> jax.Array:
        """Delta-method SE of ``spread`` ≈ φ̂₂/φ̂² − 1 over the probe samples (a, b):
        Var ≈ Var b̄/φ⁴ + 4φ₂² Var ā/φ⁶ − 4φ₂ Cov(ā, b̄)/φ⁵, with the covariance of the
        per-probe samples (strongly positive: a probe with a large ‖Jᵀv‖² has a large
        ‖JJᵀv‖² too), plus the rounding floor of ``varphi_sem`` over φ²."""
        a, b = self.phi_samples, self.phi2_samples
        phi, phi2 = self.phi, self.phi2
        k = a.shape[-1]
        cov = 0.0 if k < 2 else jnp.sum(
            (a - a.mean(-1, keepdims=True)) * (b - b.mean(-1, keepdims=True)), -1) / (k - 1) / k
        var_a, var_b = self.phi_sem**2, self.phi2_sem**2
        # the rounding floor is what varphi_sem carries beyond its delta-method variance
        var_varphi = jnp.maximum(var_b + 4 * phi**2 * var_a - 4 * phi * cov, 0.0)
        floor2 = jnp.maximum(self.varphi_sem**2 - var_varphi, 0.0)
        var = var_b / phi**4 + 4 * phi2**2 * var_a / phi**6 - 4 * phi2 * cov / phi**5
        return jnp.sqrt(jnp.maximum(var, 0.0) + floor2 / phi**4)


def precision_floor(phi, phi2, eps) -> jax.Array:
    """Rounding error of φ₂ − φ² computed in a dtype of machine epsilon ``eps``."""
    return 4.0 * eps * (jnp.abs(phi2) + phi**2)


def moments_from_samples(a: jax.Array, b: jax.Array, eps: float = 0.0) -> tuple[jax.Array, ...]:
    """(φ, φ₂, ϕ, SEs) from per-probe samples a ≈ φ and b ≈ φ₂ (arrays of length k).

    ϕ̂ = b̄ − ā² + s_a²/k is unbiased (E ā² = φ² + Var ā). Its SE by the delta method:
    Var(b̄ − ā²) ≈ Var b̄ + 4ā² Var ā − 4ā Cov(ā, b̄), plus the squared rounding floor
    ``precision_floor(ā, b̄, eps)`` of the difference.
    """
    k = a.shape[0]
    phi, phi_sem = mean_and_sem(a)
    phi2, phi2_sem = mean_and_sem(b)
    cov_ab = jnp.sum((a - phi) * (b - phi2)) / (k - 1) / k
    varphi = phi2 - phi**2 + phi_sem**2
    var_varphi = phi2_sem**2 + 4 * phi**2 * phi_sem**2 - 4 * phi * cov_ab
    var_varphi = jnp.maximum(var_varphi, 0.0) + precision_floor(phi, phi2, eps) ** 2
    return phi, phi2, varphi, phi_sem, phi2_sem, jnp.sqrt(var_varphi)


def _acc_dtype(tree):
    """float32 at least: squared norms of float16/bfloat16 vectors overflow at 65,504."""
    dtype = jnp.result_type(*jax.tree.leaves(tree))
    return jnp.promote_types(dtype, jnp.float32)


def _sq_norm(tree) -> jax.Array:
    acc = _acc_dtype(tree)
    return sum(jnp.sum(jnp.square(leaf.astype(acc))) for leaf in jax.tree.leaves(tree))


def _eps(*trees) -> float:
    """Machine epsilon of the lowest-precision floating dtype among the leaves."""
    return max(_finfo_eps(leaf_dtype(leaf)) for t in trees for leaf in jax.tree.leaves(t))


@functools.cache
def _finfo_eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def _hutchinson_samples(ops, key, num_probes, dist, probe_chunk):
    def one(k):
        u = ops.vjp(sample_probe(k, ops.out, dist))
        return _sq_norm(u), _sq_norm(ops.jvp(u))

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

    acc = _acc_dtype(ops.out)

    def u_and_w(v):  # u = Jᵀv, w = JJᵀv, both flat (accumulated in float32 at least)
        u = ops.vjp(unravel(v.astype(flat_out.dtype)))
        return ravel_pytree(u)[0].astype(acc), ravel_pytree(ops.jvp(u))[0].astype(acc)

    k_sketch, k_res = jax.random.split(key)
    Q = orthonormal_sketch(lambda v: u_and_w(v)[1], k_sketch, m, s, acc, dist)
    U, W = jax.vmap(u_and_w)(Q.T)
    exact_a, exact_b = jnp.sum(U**2), jnp.sum(W**2)  # Tr QᵀAQ, Tr QᵀA²Q

    def one(k):
        g = ravel_pytree(sample_probe(k, ops.out, dist))[0].astype(acc)
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
    M = M.astype(_acc_dtype(M))
    G = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return jnp.sum(M**2), jnp.sum(G**2)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _moment_samples(fn, x, key, *, num_probes, method, dist, normalize, probe_chunk):
    """Per-probe (a ≈ φ, b ≈ φ₂) and whether x and fn(x) are finite (traceable; no checks).

    For ``method="exact"`` a and b hold the exact φ and φ₂ (length 1).
    """
    ops = jacobian_operators(fn, x)
    size = ops.out_size if normalize == "output" else ops.in_size
    if method == "exact":
        tr1, tr2 = _exact_traces(ops, x)
        a, b = (tr1 / size)[None], (tr2 / size)[None]
    elif method == "hutchinson":
        a, b = _hutchinson_samples(ops, key, num_probes, dist, probe_chunk)
        a, b = a / size, b / size
    else:
        a, b = _hutchpp_samples(ops, key, num_probes, dist)
        a, b = a / size, b / size
    # x too: a saturating fn (tanh) maps an inf input to a finite output with J = 0 there
    return a, b, _all_finite((x, ops.out))


def _moment_stats(a, b, out_finite, *, exact, eps):
    """(φ, φ₂, ϕ, SEs, finite) from the samples of ``_moment_samples``."""
    if exact:
        phi, phi2 = a[0], b[0]
        zero = jnp.zeros_like(phi)
        stats = (phi, phi2, phi2 - phi**2, zero, zero, precision_floor(phi, phi2, eps))
    else:
        stats = moments_from_samples(a, b, eps)
    return (*stats, out_finite & jnp.isfinite(stats[0]) & jnp.isfinite(stats[1]))


# One small program per (number of samples, dtype, method), shared by every function
# probed eagerly: the statistics are not compiled again with each new structure (fused
# into the probe program they add 10-25% to its compile time, for every structure; apart,
# they cost one more dispatch, about 0.1 ms).
_moment_stats_jit = jax.jit(_moment_stats, static_argnames=("exact", "eps"))


def _moments_impl(fn, x, key, *, num_probes, method, dist, normalize, probe_chunk, stats=None,
                  out_struct=None):
    """The measurement itself (traceable; no checks, no compilation of its own).

    ``out_struct``: the output's ShapeDtypeStructs when the caller has them (saves a trace).
    """
    sizes = _sizes(fn, x, normalize, out_struct)
    a, b, out_finite = _moment_samples(fn, x, key, num_probes=num_probes, method=method,
                                       dist=dist, normalize=normalize, probe_chunk=probe_chunk)
    eps = _eps(x, sizes[3])
    *moments, finite = (stats or _moment_stats)(a, b, out_finite, exact=method == "exact",
                                                eps=eps)
    spent = 0 if method == "exact" else num_probes
    return JacobianMoments(*moments, a, b, spent, *sizes[:3], finite)


def _sizes(fn, x, normalize, out_struct=None):
    """(size, out_size, in_size, output ShapeDtypeStructs) of the Jacobian of fn at x."""
    out_struct = output_shape(fn, x) if out_struct is None else out_struct
    m, n = tree_size(out_struct), tree_size(x)
    return (m if normalize == "output" else n), m, n, out_struct


def check_moment_options(*, num_probes, method, dist, normalize="output", probe_chunk=None):
    """Validates the probe options shared by the moment estimators (before any tracing)."""
    check_choice(method, "method", METHODS)
    check_choice(dist, "dist", DISTRIBUTIONS)
    check_choice(normalize, "normalize", NORMALIZE_BY)
    check_positive_int(num_probes, "num_probes", minimum=4 if method == "hutch++" else 2)
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")


def jacobian_moments(
    fn: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    key: jax.Array | None = None,
    params: PyTree = None,
    num_probes: int = 64,
    method: str = "hutchinson",
    dist: str = "rademacher",
    normalize: str = "output",
    probe_chunk: int | None = None,
    exact_max_entries: int = DEFAULT_EXACT_MAX_ENTRIES,
) -> JacobianMoments:
    """φ(JJᵀ), φ((JJᵀ)²) and ϕ of the Jacobian J = ∂fn/∂x at ``x``, with standard errors.

    With J the m×n Jacobian, φ = Tr(JJᵀ)/m, φ₂ = Tr((JJᵀ)²)/m, ϕ = φ₂ − φ²: for probes v
    with E[vvᵀ] = I, u = Jᵀv gives E‖u‖² = Tr(JJᵀ) and E‖Ju‖² = Tr((JJᵀ)²).

    Weights are data: an eager call reads the structure of ``fn`` (its code and closures,
    or else its trace), turns the arrays it closes over into arguments, and runs a
    program compiled once per structure (``gne_jax.probes.compiled``). A new closure
    over new weights of the same architecture (``lambda x: model.apply(new_params, x)``,
    ``functools.partial(model.apply, variables)``) compiles nothing new, and no weight
    or closure is kept alive by the cache.

    Args:
      fn: pure function of a pytree of real float arrays (a Flax ``apply`` with its
        variables closed over, a block, a function of a dict...); with ``params``,
        ``fn(params, x)``. Sizes are total element counts.
      x: the input (for batch-coupled ``fn``, the whole batch). float16/bfloat16 inputs
        are probed in their dtype and accumulated in float32.
      key: PRNG key for the probes (keyword-only; not needed for ``method="exact"``).
      params: optional explicit parameters: the Jacobian of ``x ↦ fn(params, x)``.
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
    check_moment_options(num_probes=num_probes, method=method, dist=dist, normalize=normalize,
                         probe_chunk=probe_chunk)
    check_positive_int(exact_max_entries, "exact_max_entries")
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable; got {type(fn).__name__}.")
    check_input_tree(x, "x")
    key = jax.random.key(0) if (method == "exact" and key is None) else check_key(key)
    options = dict(num_probes=num_probes, method=method, dist=dist, normalize=normalize,
                   probe_chunk=probe_chunk)
    f = fn if params is None else functools.partial(fn, params)
    structure, consts, out_struct = compiled.hoist_at_input(f, x, key, params)
    check_float_tree(out_struct, "fn(x)")
    if method == "exact":
        entries = tree_size(out_struct) * tree_size(x)
        if entries > exact_max_entries:
            raise ValueError(
                f"method='exact' would materialize a Jacobian with {entries} entries, above "
                f"`exact_max_entries`={exact_max_entries}; use method='hutchinson' or raise "
                f"the limit."
            )
    if structure is None:  # under an outer jit/vmap/grad: inline
        return _moments_impl(f, x, key, **options, out_struct=out_struct)
    prog = compiled.program(_moment_samples, tuple(sorted(options.items())), (structure,))
    a, b, out_finite = prog([consts], x, key)
    *moments, finite = _moment_stats_jit(a, b, out_finite, exact=method == "exact",
                                         eps=_eps(x, out_struct))
    sizes = _sizes(f, x, normalize, out_struct)
    result = JacobianMoments(*moments, a, b, 0 if method == "exact" else num_probes,
                             *sizes[:3], finite)
    if not bool(result.finite):
        raise_non_finite(f, x)
    return result


def raise_non_finite(fn, x) -> None:
    """Says which of x, fn(x) or the Jacobian products is non-finite, and the likely cause."""
    if not bool(_all_finite(x)):
        raise FloatingPointError("`x` contains non-finite values (NaN or inf).")
    out = fn(x)
    dtypes = sorted({str(jnp.result_type(a)) for a in jax.tree.leaves((x, out))})
    low = [d for d in dtypes if d in ("float16", "bfloat16")]
    hint = (f" In {low[0]} the largest finite value is {float(jnp.finfo(low[0]).max):.6g}: "
            f"compute in float32." if low else "")
    if not bool(_all_finite(out)):
        raise FloatingPointError(
            "`fn(x)` is non-finite (NaN or inf) at the given input: the Jacobian moments are "
            "undefined there. Check the function's parameters (a NaN weight?) and the input "
            f"scale.{hint}"
        )
    raise FloatingPointError(
        "`x` and `fn(x)` are finite but the Jacobian products of `fn` at `x` are not: the "
        "Jacobian overflows this dtype or the derivative is undefined there (e.g. sqrt or "
        f"log at 0).{hint or ' Try float64 (jax_enable_x64) or rescale.'}"
    )
