"""Spectral densities and spectral functions tr f(A) by stochastic Lanczos quadrature.

For a symmetric operator A of size n with eigenpairs (λ_i, u_i) and a unit start
vector q (a normalized Rademacher or Gaussian probe), k Lanczos steps give the
Gauss quadrature of the spectral measure μ_q = Σ_i (u_iᵀq)² δ_{λ_i}: nodes θ_j
(Ritz values) and weights τ_j (squared first components of the eigenvectors of T),
exact for polynomials of degree ≤ 2k−1 (derivations §15). Averaging over n_v probes:

    tr f(A) ≈ (n / n_v) Σ_r Σ_j τ_rj f(θ_rj),
    ρ̂(λ)   = (1 / n_v) Σ_r Σ_j τ_rj g_σ(λ − θ_rj),  g_σ = N(0, σ²) density,

with σ an explicit standard deviation in eigenvalue units (not PyHessian's
range-scaled variance "sigma_squared"; their width corresponds to
σ = sqrt(sigma_squared · max(1, λ_max − λ_min))).

The raw nodes and weights are kept in ``SpectralDensity`` so that
``smooth_density`` can re-smooth (another σ, another grid, log scale) and
``trace_function`` can compute tr f(A) (log-determinant: f = log) without new
matvecs.

Accuracy (used in the tests): for every probe, μ_q and its k-node quadrature
match moments up to degree 2k−1 on [λ_min, λ_max], so by Jackson's theorem their
Wasserstein-1 distance is at most π(λ_max − λ_min)/(4k). The probe-to-probe
error of the averaged measure has E W1 ≤ (λ_max − λ_min)/sqrt(2 n_v (n + 2))
(CDF values of μ_q are Beta-distributed with variance ≤ 1/(2(n+2)) for Gaussian
probes). Smoothing both measures with g_σ turns a W1 distance d into an L1
distance of at most d·sqrt(2/π)/σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gne_jax._tree import is_concrete, tree_size
from gne_jax._validate import (
    check_choice,
    check_float_tree,
    check_input_tree,
    check_key,
    check_positive_int,
    legacy_key,
    renamed_argument,
)
from gne_jax.linalg.lanczos import (
    _lanczos_flat,
    check_num_steps,
    flatten_matvec,
    raise_if_asymmetric,
    raise_if_nonfinite,
    ravel_like,
    ritz,
    symmetry_stats,
    worst_symmetry_pair,
)
from gne_jax.probes import compiled
from gne_jax.probes.compiled import AbstractTree, hoist_fast, probe_compiler_options
from gne_jax.probes.stochtrace import (
    DISTRIBUTIONS,
    TraceEstimate,
    map_probes,
    mean_and_sem,
    rademacher,
)

Array = jax.Array
PyTree = Any


@struct.dataclass
class SpectralDensity:
    """SLQ spectral density of a symmetric operator (a pytree; ``dim`` is static).

    Attributes:
      nodes: ``(num_probes, num_steps)`` Ritz values θ_rj per probe (eigenvalue units,
        whatever ``log_scale``).
      weights: ``(num_probes, num_steps)`` quadrature weights τ_rj; each row sums to 1.
      grid: ``(num_grid,)`` points where ``density`` is evaluated: λ, or log λ when the
        density was computed with ``log_scale=True``.
      density: ``(num_grid,)`` smoothed density ρ̂ on ``grid`` (integrates to the mass
        inside the grid, ≈ 1 minus ``clipped_mass``).
      sigma: Gaussian standard deviation used, in units of ``grid``.
      clipped_mass: mean total weight of nodes left out (log scale: nodes ≤ the floor;
        0 on a linear scale).
      dim: operator dimension n (for ``trace_function``).
      num_restarts: ``(num_probes,)`` Lanczos breakdowns handled per probe.
      num_finite_steps: ``(num_probes,)`` steps before a non-finite value (== num_steps
        when all was well; check this under jit).
    """

    nodes: Array
    weights: Array
    grid: Array
    density: Array
    sigma: Array
    clipped_mass: Array
    dim: int = struct.field(pytree_node=False)
    num_restarts: Array = None
    num_finite_steps: Array = None


def gaussian_kernel(x: Array, sigma: Array) -> Array:
    """g_σ(x) = exp(−x²/(2σ²)) / (σ√(2π)), the N(0, σ²) density."""
    return jnp.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))


def _check_sigma(sigma, name: str) -> None:
    if sigma is None or not is_concrete(sigma):
        return  # a traced σ cannot be checked; documented in spectral_density
    value = np.asarray(sigma)
    if value.shape != () or not np.isfinite(value) or float(value) <= 0.0:
        raise ValueError(
            f"`{name}` must be a finite positive scalar (a standard deviation); got {sigma!r}"
        )


def default_rel_sigma(num_steps: int) -> float:
    """Kernel width relative to the spectrum's range matched to the Lanczos node spacing.

    Papyan's choice (as in curvlinops): on the range rescaled to [−1, 1], a Gaussian
    of standard deviation 2/((k−1)·sqrt(8 ln κ)) with κ = 3; relative to the range
    that is 1/((k−1)·sqrt(8 ln 3)) (0.0117 for k = 30).
    """
    return 1.0 / (max(num_steps - 1, 1) * math.sqrt(8.0 * math.log(3.0)))


def resolve_sigma(
    nodes: Array, sigma=None, rel_sigma=None, *, weights: Array | None = None
) -> Array:
    """σ in the units of ``nodes``: the absolute ``sigma``, or ``rel_sigma`` × node range.

    Exactly one of ``sigma`` / ``rel_sigma`` may be given; with neither,
    ``default_rel_sigma(num_steps)`` is used. The range is max − min over nodes with
    positive weight (or all nodes); a zero range (one distinct eigenvalue) uses
    max(|node|, 1) instead so σ stays positive.
    """
    if sigma is not None and rel_sigma is not None:
        raise ValueError("give either `sigma` (absolute) or `rel_sigma` (relative), not both")
    _check_sigma(sigma, "sigma")
    _check_sigma(rel_sigma, "rel_sigma")
    if sigma is not None:
        return jnp.asarray(sigma, nodes.dtype)
    if rel_sigma is None:
        rel_sigma = default_rel_sigma(nodes.shape[-1])
    lo, hi = _node_range(nodes, weights)
    span = hi - lo
    span = jnp.where(span > 0, span, jnp.maximum(jnp.abs(hi), 1.0))
    return jnp.asarray(rel_sigma, nodes.dtype) * span


def _node_range(nodes, weights=None):
    if weights is None:
        return jnp.min(nodes), jnp.max(nodes)
    keep = weights > 0
    big = jnp.finfo(nodes.dtype).max
    lo = jnp.min(jnp.where(keep, nodes, big))
    hi = jnp.max(jnp.where(keep, nodes, -big))
    return lo, hi


def density_grid(nodes: Array, sigma: Array, num_grid: int, *, weights=None, pad: float = 4.0):
    """``num_grid`` equispaced points over [min θ − pad·σ, max θ + pad·σ]."""
    check_positive_int(num_grid, "num_grid", minimum=2)
    lo, hi = _node_range(nodes, weights)
    return jnp.linspace(lo - pad * sigma, hi + pad * sigma, num_grid)


def smooth_density(nodes: Array, weights: Array, grid: Array, sigma) -> Array:
    """ρ̂(x) = mean over probes of Σ_j τ_j g_σ(x − θ_j), on ``grid`` (pure; no matvecs).

    ``nodes``/``weights`` are ``(num_probes, k)`` (or ``(k,)`` for one probe). Use it to
    re-smooth a ``SpectralDensity`` with another σ or grid; for a log-scale density
    pass ``log_nodes(nodes, weights, floor)``.
    """
    _check_sigma(sigma, "sigma")
    nodes = jnp.atleast_2d(nodes)
    weights = jnp.atleast_2d(weights)
    sigma = jnp.asarray(sigma, nodes.dtype)
    k = gaussian_kernel(grid[:, None, None] - nodes[None], sigma)  # (G, P, k)
    return jnp.mean(jnp.sum(weights[None] * k, axis=-1), axis=-1)


def log_nodes(nodes: Array, weights: Array, floor) -> tuple[Array, Array, Array]:
    """Nodes in log scale: (log θ, weights with θ ≤ floor dropped, dropped mass per probe).

    A density in t = log λ relates to one in λ by ρ_log(t) = λ ρ(λ); for positive
    semi-definite operators whose spectra span decades (JJᵀ of deep networks)
    it is the readable view. Nodes at or below ``floor`` (rounding-level
    eigenvalues, exact zeros of a rank-deficient JJᵀ) have no logarithm and are
    reported as clipped mass instead.
    """
    keep = nodes > floor
    safe = jnp.where(keep, nodes, 1.0)
    w = jnp.where(keep, weights, 0.0)
    return jnp.log(safe), w, jnp.sum(weights - w, axis=-1)


def default_log_floor(nodes: Array) -> Array:
    """100·eps·max θ: below this, Lanczos cannot tell an eigenvalue from rounding."""
    return 100.0 * jnp.finfo(nodes.dtype).eps * jnp.max(jnp.abs(nodes))


def slq_nodes(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    legacy_like: PyTree = None,
    /,
    *,
    key: Array | None = None,
    num_steps: int,
    num_probes: int,
    dist: str = "rademacher",
    reortho: str = "full",
    probe_chunk: int | None = None,
):
    """Lanczos quadrature nodes and weights for ``num_probes`` random unit start vectors.

    Returns ``(nodes, weights, num_restarts, num_finite_steps)`` with leading axis
    ``num_probes``. Probes are drawn like the trace estimators' (Rademacher or
    normal, then normalized), vmapped (or ``lax.map``-ped in chunks of
    ``probe_chunk``). Pure: no eager checks here.
    """
    like, key = legacy_key(like, legacy_like, key)
    check_positive_int(num_probes, "num_probes")
    check_choice(dist, "dist", DISTRIBUTIONS)
    key = check_key(key)
    check_num_steps(num_steps, tree_size(like))
    return _slq(matvec, like, key, num_steps=num_steps, num_probes=num_probes, dist=dist,
                reortho=reortho, probe_chunk=probe_chunk)[:4]


def _slq(matvec, like, key, *, num_steps, num_probes, dist, reortho, probe_chunk,
         symmetry=False):
    """``slq_nodes`` and, with ``symmetry`` and ≥ 2 steps, the per-probe symmetry stats of
    the Lanczos loop (``lanczos._lanczos_flat``); else None."""
    flat = ravel_like(like)[0]
    matvec_flat, _, n = flatten_matvec(matvec, like)
    draw = rademacher if dist == "rademacher" else jax.random.normal
    symmetry = symmetry and num_steps >= 2

    def one(k_):
        v = draw(k_, (n,), dtype=flat.dtype)
        out = _lanczos_flat(matvec_flat, v, num_steps, reortho, None, symmetry=symmetry)
        res, sym = out if symmetry else (out, None)
        rz = ritz(res)
        return rz.values, rz.weights, res.num_restarts, res.num_finite_steps, sym

    return map_probes(one, jax.random.split(key, num_probes), probe_chunk)


def _check_density_options(*, num_steps, num_probes, num_grid, sigma, rel_sigma, dist, reortho,
                           probe_chunk, n):
    _check_sigma(sigma, "sigma")
    _check_sigma(rel_sigma, "rel_sigma")
    if sigma is not None and rel_sigma is not None:
        raise ValueError("give either `sigma` (absolute) or `rel_sigma` (relative), not both")
    check_num_steps(num_steps, n)
    check_positive_int(num_probes, "num_probes")
    check_positive_int(num_grid, "num_grid", minimum=2)
    check_choice(dist, "dist", DISTRIBUTIONS)
    check_choice(reortho, "reortho", ("full", "none"))
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")


def _density(matvec, key, arrays, like, *, num_steps, num_probes, num_grid, log_scale, dist,
             reortho, probe_chunk, check_symmetry):
    """(SpectralDensity, symmetry stats or None): the traceable core of the densities."""
    k_nodes, k_sym = jax.random.split(key)
    n = ravel_like(like)[0].shape[0]
    nodes, weights, restarts, nfinite, sym = _slq(
        matvec, like, k_nodes, num_steps=num_steps, num_probes=num_probes, dist=dist,
        reortho=reortho, probe_chunk=probe_chunk, symmetry=check_symmetry)
    if check_symmetry:
        if sym is None:  # one step per probe: no pair of Lanczos vectors to compare
            matvec_flat, _, _ = flatten_matvec(matvec, like)
            sym = symmetry_stats(matvec_flat, k_sym, n, ravel_like(like)[0].dtype)
        else:
            sym = worst_symmetry_pair(sym)
    if log_scale:
        floor = arrays.get("log_floor")
        floor = default_log_floor(nodes) if floor is None else floor
        x, w, clipped = log_nodes(nodes, weights, floor)
        clipped_mass = jnp.mean(clipped)
    else:
        x, w, clipped_mass = nodes, weights, jnp.zeros((), nodes.dtype)
    sig = resolve_sigma(x, arrays.get("sigma"), arrays.get("rel_sigma"), weights=w)
    grid = arrays.get("grid")
    if grid is None:
        grid = density_grid(x, sig, num_grid, weights=w)
    density = smooth_density(x, w, grid, sig)
    result = SpectralDensity(nodes, weights, grid, density, sig, clipped_mass, n, restarts,
                             nfinite)
    return result, sym


def _density_program(matvec, key, arrays, *, like, **opts):
    return _density(matvec, key, arrays, like.tree(), **opts)


def _jacobian_density_program(fn, x, key, arrays, **opts):
    from gne_jax.probes.jacobian import jacobian_operators

    ops = jacobian_operators(fn, x)
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), ops.out)
    return _density(ops.jjt, key, arrays, like, **opts)


def _density_arrays(sigma, rel_sigma, grid, log_floor) -> dict:
    values = dict(sigma=sigma, rel_sigma=rel_sigma, grid=grid, log_floor=log_floor)
    arrays = {k: jnp.asarray(v) for k, v in values.items() if v is not None}
    if "grid" in arrays and (arrays["grid"].ndim != 1 or arrays["grid"].shape[0] < 1):
        raise ValueError(f"`grid` must be a 1-D array of evaluation points; got shape "
                         f"{arrays['grid'].shape}.")
    return arrays


def _finish(result, sym, what):
    raise_if_asymmetric(sym)
    raise_if_nonfinite(result.num_finite_steps, result.nodes.shape[-1], what)
    return result


def spectral_density(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    legacy_like: PyTree = None,
    /,
    *,
    key: Array | None = None,
    num_steps: int = 30,
    num_probes: int = 8,
    num_grid: int = 512,
    sigma=None,
    rel_sigma=None,
    grid: Array | None = None,
    log_scale: bool = False,
    log_floor=None,
    dist: str = "rademacher",
    reortho: str = "full",
    probe_chunk: int | None = None,
    check_symmetry: bool = True,
    chunk_size: int | None = None,
) -> SpectralDensity:
    """SLQ spectral density ρ̂(λ) = (1/n_v) Σ_r Σ_j τ_rj g_σ(λ − θ_rj) of a symmetric ``matvec``.

    Args:
      matvec, like: the operator (pytree → like-shaped pytree) and a pytree (or
        ShapeDtypeStructs) giving the vector shape; n = total size.
      key: PRNG key (keyword-only; the old positional ``(matvec, key, like)`` order
        still works for one release, with a ``DeprecationWarning``).
      num_steps: Lanczos steps per probe (k ≤ n); cost is num_steps·num_probes matvecs.
      num_probes: random start vectors n_v.
      num_grid: grid points when ``grid`` is None.
      sigma: absolute Gaussian standard deviation, in eigenvalue units (in log λ units
        when ``log_scale``). Must be > 0 (checked when it is a Python number or a
        concrete array; a traced σ is used as given).
      rel_sigma: alternatively, σ as a fraction of the node range (max θ − min θ).
        Neither: ``default_rel_sigma(num_steps)``.
      grid: explicit evaluation points (λ, or log λ when ``log_scale``).
      log_scale: density of t = log λ (PSD operators: JJᵀ, Gauss–Newton); nodes below
        ``log_floor`` (default ``default_log_floor``) are dropped and counted in
        ``clipped_mass``.
      dist, reortho, probe_chunk: probe distribution, Lanczos reorthogonalization
        ("full" or "none"), probes per ``lax.map`` chunk (None: vmap all).
      check_symmetry: test the matvec for symmetry (from the Lanczos runs themselves,
        q_{j-1}ᵀAq_j against β_{j-1}, with no extra matvec; two matvecs when
        ``num_steps`` is 1; raises eagerly only).
      chunk_size: deprecated name of ``probe_chunk``.

    Returns:
      ``SpectralDensity``. Eagerly, a non-finite matvec value raises ``ValueError``;
      under jit/vmap read ``num_finite_steps``. Eagerly, the matvec's closed-over arrays
      are data: a new matvec of the same structure compiles nothing new.
    """
    like, key = legacy_key(like, legacy_like, key)
    key = check_key(key)
    probe_chunk = renamed_argument(probe_chunk, chunk_size, new="probe_chunk",
                                   old="chunk_size", default=None)
    n = tree_size(like)
    opts = dict(num_steps=num_steps, num_probes=num_probes, num_grid=num_grid,
                log_scale=bool(log_scale), dist=dist, reortho=reortho, probe_chunk=probe_chunk,
                check_symmetry=bool(check_symmetry))
    _check_density_options(sigma=sigma, rel_sigma=rel_sigma, n=n,
                           **{k: opts[k] for k in ("num_steps", "num_probes", "num_grid", "dist",
                                                   "reortho", "probe_chunk")})
    arrays = _density_arrays(sigma, rel_sigma, grid, log_floor)
    abstract = AbstractTree(like)
    if not is_concrete((like, key, arrays)):
        return _density(matvec, key, arrays, abstract.tree(), **opts)[0]
    result, sym = compiled.call(_density_program, dict(like=abstract, **opts),
                                [(matvec, (abstract.tree(),), "matvec", "like")], (key, arrays),
                                compiler_options=probe_compiler_options())
    return _finish(result, sym, "matvec (spectral_density)")


def jacobian_spectral_density(
    fn: Callable[[PyTree], PyTree],
    x: PyTree,
    legacy_key_: Array | None = None,
    /,
    *,
    key: Array | None = None,
    log_scale: bool = True,
    num_steps: int = 30,
    num_probes: int = 8,
    num_grid: int = 512,
    sigma=None,
    rel_sigma=None,
    grid: Array | None = None,
    log_floor=None,
    dist: str = "rademacher",
    reortho: str = "full",
    probe_chunk: int | None = None,
    check_symmetry: bool = True,
) -> SpectralDensity:
    """Density of the squared singular values of J = ∂fn/∂x: eigenvalues of JJᵀ (m × m).

    JJᵀ comes from ``gne_jax.probes.jacobian.jacobian_operators(fn, x).jjt`` (one
    linearization, VJP then JVP: two Jacobian products per Lanczos step). Defaults
    to a log scale since these spectra span orders of magnitude; the other options are
    those of ``spectral_density``. ``fn``'s closed-over arrays and ``x`` are data: one
    compilation per structure.
    """
    if legacy_key_ is not None:
        _, key = legacy_key(legacy_key_, x, key, like_name="x")
    key = check_key(key)
    check_input_tree(x, "x")
    opts = dict(num_steps=num_steps, num_probes=num_probes, num_grid=num_grid,
                log_scale=bool(log_scale), dist=dist, reortho=reortho, probe_chunk=probe_chunk,
                check_symmetry=bool(check_symmetry))
    structure, _ = hoist_fast(fn, x, argname="fn")
    check_float_tree(structure.out_shape, "fn(x)")
    _check_density_options(sigma=sigma, rel_sigma=rel_sigma,
                           n=sum(math.prod(a.shape) for a in jax.tree.leaves(structure.out_shape)),
                           **{k: opts[k] for k in ("num_steps", "num_probes", "num_grid", "dist",
                                                   "reortho", "probe_chunk")})
    arrays = _density_arrays(sigma, rel_sigma, grid, log_floor)
    if not is_concrete((x, key, arrays)):
        return _jacobian_density_program(fn, x, key, arrays, **opts)[0]
    result, sym = compiled.call(_jacobian_density_program, opts, [(fn, (x,), "fn")],
                                (x, key, arrays), compiler_options=probe_compiler_options())
    return _finish(result, sym, "JJᵀ (jacobian_spectral_density)")


def trace_function(nodes: Array, weights: Array, f: Callable[[Array], Array], dim: int):
    """tr f(A) ≈ (n / n_v) Σ_r Σ_j τ_rj f(θ_rj) from SLQ nodes and weights (no matvecs).

    Per-probe values n·Σ_j τ_rj f(θ_rj) are unbiased for tr f(A) up to the
    quadrature error (exact for polynomial f of degree ≤ 2k−1), so their mean and
    standard error form a ``TraceEstimate`` (``num_matvecs`` = probes × steps).
    Log-determinant: ``trace_function(nodes, weights, jnp.log, n)`` (positive
    definite A only; a node ≤ 0 gives nan/−inf, as log does).
    """
    nodes = jnp.atleast_2d(nodes)
    weights = jnp.atleast_2d(weights)
    # Zero-weight nodes (restart blocks, padding) must not turn 0·log(0) into NaN.
    values = jnp.where(weights > 0, weights * f(jnp.where(weights > 0, nodes, 1.0)), 0.0)
    samples = dim * jnp.sum(values, axis=-1)
    value, sem = mean_and_sem(samples)
    return TraceEstimate(value, sem, samples, int(nodes.shape[0] * nodes.shape[1]))
