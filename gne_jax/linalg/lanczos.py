"""Lanczos tridiagonalization of a symmetric matvec, with breakdown restarts.

For a symmetric linear map ``A`` on R^n (given only as ``v ↦ A v``, on arrays or
pytrees) and a start vector ``v0``, k Lanczos steps build an orthonormal basis
``Q = [q_0 … q_{k-1}]`` of the Krylov space span{v0, A v0, …, A^{k-1} v0} and the
tridiagonal ``T = Qᵀ A Q``:

    A q_j = β_{j-1} q_{j-1} + α_j q_j + β_j q_{j+1},   T = tridiag(β, α, β).

The Ritz values (eigenvalues of T) approximate the extreme eigenvalues of A, and
the squared first components of T's eigenvectors are the Gauss-quadrature weights
used by stochastic Lanczos quadrature (``gne_jax.linalg.spectral``).

Why our own loop and not ``matfree.decomp.tridiag_sym`` (matfree 0.6.3):
matfree's full-reorthogonalization path (an Arnoldi loop inside ``fori_loop``,
classical Gram–Schmidt applied twice as matrix products) is the same algorithm as
here and we use it as the cross-check in tests and the benchmark. It falls short
in three places this library needs:

* **breakdown**: ``_hessenberg_forward_step`` divides by the residual norm with no
  guard, so an exactly invariant Krylov space (A = I, a projector, a low-rank A
  on a structured start vector) turns every later entry of T into NaN. Here a
  breakdown (β_j ≤ ``breakdown_rtol``·‖T‖ so far) sets β_j = 0 and restarts with a
  fresh pseudo-random vector orthogonalized against the basis, so T decouples into
  blocks: quadrature weights of the new blocks are exactly 0 (SLQ unchanged) and
  their Ritz values are genuine eigenvalues of A on the orthogonal complement
  (so multiplicities can be found by ``eigh_extreme``).
* **non-finite matvecs**: matfree propagates NaN/inf silently. Here the first
  non-finite α_j or β_j freezes the iteration (all later entries 0, decoupled)
  and is recorded in ``num_finite_steps``; the public wrappers raise a
  ``ValueError`` naming the step when called eagerly, and return the count as a
  flag under ``jit``/``vmap``.
* **bad input**: no symmetry check. ``check_symmetric`` tests
  |uᵀAv − vᵀAu| on random vectors.

The loop is one ``lax.fori_loop`` whose body does one matvec and three
``w -= Qᵀ(Q w)`` passes over the preallocated ``(k+1, n)`` basis (rows not yet
filled are zero; the third pass also serves a restart vector, so there is no
``lax.cond``), so the traced program and the compile time do not grow with
``num_steps``. Everything follows the dtype of ``v0`` (float32 by default,
float64 under ``jax_enable_x64``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gne_jax._tree import is_concrete, tree_size
from gne_jax._validate import check_key, check_positive_int, legacy_key, square_matvec
from gne_jax.probes import compiled
from gne_jax.probes.compiled import AbstractTree, probe_compiler_options
from gne_jax.probes.stochtrace import rademacher

Array = jax.Array
PyTree = Any

_REORTHO = ("full", "none")
_WHICH = ("largest", "smallest", "both")


class LanczosResult(NamedTuple):
    """Output of ``lanczos_tridiag``.

    Attributes:
      diag: ``(k,)`` α_j, the diagonal of T.
      offdiag: ``(k-1,)`` β_j, the off-diagonal of T; exactly 0 where the
        iteration broke down and restarted (T is then block diagonal).
      basis: ``(k, n)`` Lanczos vectors q_j as rows (flattened pytrees, in the
        order of ``jax.flatten_util.ravel_pytree``); orthonormal up to rounding
        with ``reortho="full"``.
      residual_norm: β_k, the norm of the part of A q_{k-1} outside the basis;
        |β_k · y_{k-1,i}| bounds the residual of Ritz pair i.
      num_restarts: how many breakdowns were handled by a restart.
      num_finite_steps: steps completed before the first non-finite α or β
        (equal to k when every matvec was finite).
    """

    diag: Array
    offdiag: Array
    basis: Array
    residual_norm: Array
    num_restarts: Array
    num_finite_steps: Array


class Ritz(NamedTuple):
    """Eigen-decomposition of the Lanczos tridiagonal T = Y diag(values) Yᵀ.

    Attributes:
      values: ``(k,)`` Ritz values θ_j, ascending.
      weights: ``(k,)`` Gauss-quadrature weights τ_j = Y_{0j}² (sum to 1).
      vectors: ``(k, k)`` eigenvectors Y of T as columns.
      residual_bounds: ``(k,)`` |β_k Y_{k-1,j}| = ‖A x_j − θ_j x_j‖ for the Ritz
        vector x_j = Qᵀ y_j (exact arithmetic, orthonormal Q).
      valid: ``(k,)`` False for the padding of a run stopped by a non-finite value.
    """

    values: Array
    weights: Array
    vectors: Array
    residual_bounds: Array
    valid: Array


class EigenResult(NamedTuple):
    """Extreme eigenpairs from ``eigh_extreme``.

    Attributes:
      values: ``(num_eigs,)`` (or ``(2*num_eigs,)`` for ``which="both"``) Ritz
        values; largest first for "largest", smallest first for "smallest",
        ascending for "both" (the num_eigs smallest, then the num_eigs largest).
      vectors: pytree shaped like ``like`` with a leading axis of the same length,
        unit-norm Ritz vectors.
      residual_norms: Lanczos bound on ‖A x − θ x‖ per pair (a tolerance check:
        an eigenvalue of A lies within this distance of θ).
      num_restarts: breakdowns handled during the run.
      num_finite_steps: see ``LanczosResult``.
    """

    values: Array
    vectors: PyTree
    residual_norms: Array
    num_restarts: Array
    num_finite_steps: Array


def ravel_like(like: PyTree):
    """``ravel_pytree`` of zeros shaped like ``like`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return ravel_pytree(jax.tree.map(jnp.zeros_like, like))


def flatten_matvec(matvec: Callable[[PyTree], PyTree], like: PyTree):
    """Return ``(matvec_flat, unravel, n)`` acting on ``ravel_pytree(like)`` vectors."""
    flat, unravel = ravel_like(like)

    matvec = square_matvec(matvec, like)

    def matvec_flat(v):
        return ravel_pytree(matvec(unravel(v)))[0]

    return matvec_flat, unravel, flat.shape[0]


def check_num_steps(num_steps: int, dim: int, name: str = "num_steps") -> None:
    """Raise a ``ValueError`` unless 1 ≤ num_steps ≤ dim (a Krylov space has dim ≤ n)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise TypeError(f"{name} must be a Python int, got {type(num_steps).__name__}")
    if num_steps < 1 or num_steps > dim:
        raise ValueError(
            f"{name}={num_steps} is out of range: Lanczos needs 1 <= {name} <= dim, "
            f"and the operator's dimension is dim={dim}"
        )


def check_symmetric(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    legacy_like: PyTree = None,
    /,
    *,
    key: Array | None = None,
    rtol: float | None = None,
    skip_if_traced: bool = False,
) -> None:
    """Raise ``ValueError`` if the matvec is visibly non-symmetric on random vectors.

    Computes s = uᵀ(Av) and t = vᵀ(Au) for two random ±1 vectors and requires
    |s − t| ≤ rtol·(‖u‖‖Av‖ + ‖v‖‖Au‖)/2, with rtol = 10·sqrt(eps) by default
    (3e-3 in float32, 1.5e-7 in float64): autodiff HVPs are symmetric to rounding,
    a non-symmetric matrix fails by O(1). Costs two matvecs. It needs concrete
    values to raise: under ``jit``/``vmap`` (or when the matvec closes over
    traced values) it raises a ``ValueError`` saying so, or returns silently
    with ``skip_if_traced=True`` (what the Lanczos wrappers do).
    """
    like, key = legacy_key(like, legacy_like, key)
    key = check_key(key)
    matvec_flat, _, n = flatten_matvec(matvec, like)
    dtype = ravel_like(like)[0].dtype
    stats = symmetry_stats(matvec_flat, key, n, dtype)
    if not is_concrete(stats):
        if skip_if_traced:
            return
        raise ValueError(
            "check_symmetric needs concrete values; call it outside jit/vmap "
            "(inside jit, the symmetry check is skipped by the Lanczos wrappers)"
        )
    raise_if_asymmetric(stats, rtol)


def symmetry_stats(matvec_flat: Callable, key: Array, n: int, dtype) -> tuple[Array, ...]:
    """(uᵀAv, vᵀAu, (‖u‖‖Av‖ + ‖v‖‖Au‖)/2) for random ±1 vectors u, v (traceable).

    The vectors come from the counter-hash sampler (``stochtrace.rademacher``), which
    compiles in a fraction of the time of ``jax.random``'s threefry.
    """
    u = rademacher(key, (n,), dtype, salt=1)
    v = rademacher(key, (n,), dtype, salt=2)
    au, av = jax.vmap(matvec_flat)(jnp.stack([u, v]))  # one copy of the matvec in the program
    s, t = jnp.vdot(u, av), jnp.vdot(v, au)
    scale = 0.5 * (
        jnp.linalg.norm(u) * jnp.linalg.norm(av) + jnp.linalg.norm(v) * jnp.linalg.norm(au)
    )
    return s, t, scale


def raise_if_asymmetric(stats, rtol: float | None = None) -> None:
    """The eager verdict of ``check_symmetric`` on ``symmetry_stats`` (no-op when traced)."""
    if stats is None or not is_concrete(stats):
        return
    s, t, scale = stats
    if rtol is None:
        rtol = 10.0 * math.sqrt(float(jnp.finfo(jnp.result_type(s)).eps))
    if not (math.isfinite(float(s)) and math.isfinite(float(t))):
        raise ValueError("matvec returned non-finite values on the symmetry check vectors")
    gap = abs(float(s) - float(t))
    if gap > rtol * float(scale):
        raise ValueError(
            "matvec is not symmetric: u·(Av) = "
            f"{float(s):.6g} but v·(Au) = {float(t):.6g} for two unit test vectors u, v "
            f"(relative gap {gap / max(float(scale), 1e-300):.3g} > "
            f"rtol={rtol:.3g}). Lanczos needs a symmetric operator (A = Aᵀ)."
        )


def _orthogonalize(w: Array, basis: Array) -> Array:
    # Classical Gram–Schmidt twice ("twice is enough"), as matrix products: the
    # unfilled rows of `basis` are zero and drop out.
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _unit(r: Array) -> Array:
    return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(r.dtype).tiny)


def lanczos_tridiag(
    num_steps: int,
    *,
    reortho: str = "full",
    breakdown_rtol: float | None = None,
) -> Callable[..., LanczosResult]:
    """Build ``decompose(matvec, v0) -> LanczosResult`` (k = num_steps).

    ``matvec`` maps a pytree shaped like ``v0`` to the same structure and must be
    symmetric; ``v0`` need not be normalized (a zero ``v0`` is replaced by a
    coordinate vector). ``reortho="full"`` orthogonalizes every new vector against
    the whole basis (no ghost eigenvalues); ``"none"`` runs the plain three-term
    recurrence (cheaper, loses orthogonality once a Ritz value converges, which
    produces duplicated "ghost" Ritz values). A step with
    β_j ≤ ``breakdown_rtol``·max(|α|, β so far) is a breakdown (invariant Krylov
    space): β_j is set to 0 and the next vector is a fresh deterministic
    pseudo-random vector orthogonalized against the basis. Default
    ``breakdown_rtol = eps^(3/4)`` (1.8e-12 in float64, 6.5e-6 in float32). A
    breakdown missed by the test is harmless with ``reortho="full"``: the
    normalized rounding noise is orthogonalized twice and acts as a restart.

    Pure and traceable: jit it, vmap it over start vectors (probes) and over
    operators (initializations); raises only on static problems (``num_steps``).
    Use ``check_lanczos_result`` for the eager non-finite check.
    """
    if reortho not in _REORTHO:
        raise ValueError(f"reortho={reortho!r} is not one of {_REORTHO}")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")

    opts = dict(num_steps=num_steps, reortho=reortho, breakdown_rtol=breakdown_rtol)

    def decompose(matvec, v0) -> LanczosResult:
        v = ravel_pytree(v0)[0]
        check_num_steps(num_steps, v.shape[0])
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"v0 must have a floating dtype, got {v.dtype}")
        if not is_concrete(v0):
            return _decompose(matvec, v0, **opts)
        # eagerly: one program per structure of the matvec (its arrays are data)
        return compiled.call(_decompose, opts,
                             [(matvec, (AbstractTree(v0).tree(),), "matvec", "v0")],
                             (v0,), compiler_options=probe_compiler_options())

    return decompose


def _decompose(matvec, v0, *, num_steps, reortho, breakdown_rtol) -> LanczosResult:
    matvec_flat, _, _ = flatten_matvec(matvec, v0)
    return _lanczos_flat(matvec_flat, ravel_pytree(v0)[0], num_steps, reortho, breakdown_rtol)


def _lanczos_flat(matvec, v, k, reortho, breakdown_rtol, symmetry=False):
    """The Lanczos loop on flat vectors: a ``LanczosResult``, or ``(result, symmetry stats)``.

    With ``symmetry=True`` (and k ≥ 2) the loop also returns the symmetry check of
    ``symmetry_stats`` at no extra matvec: at step j ≥ 1, s = q_{j-1}ᵀ(A q_j) is compared
    with t = q_jᵀ(A q_{j-1}), which is β_{j-1} by construction of q_j (A q_{j-1} minus
    its projection on the earlier basis, normalized; zero after a restart), so
    s − t = q_{j-1}ᵀ(A − Aᵀ)q_j. The pair with the largest |s − t|/scale, scale =
    max_{i ≤ j} ‖A q_i‖ (an estimate of ‖A‖, as ‖Au‖ is for ``symmetry_stats``), is
    returned as ``(s, t, scale)``. A local scale such as ‖A q_j‖ would not do: after a
    breakdown of a low-rank A the restart vectors lie in its null space, where s and t
    are rounding noise of size eps·‖A‖ and ‖A q_j‖ is noise too.
    """
    n, dtype = v.shape[0], v.dtype
    rtol = float(jnp.finfo(dtype).eps) ** 0.75 if breakdown_rtol is None else breakdown_rtol
    index = jnp.arange(n, dtype=dtype)

    def candidate(j):
        # Restart candidate for a breakdown at step j: a deterministic
        # pseudo-random vector (a sine hash of (index, j); no PRNG, cheap to compile),
        # orthogonalized against the basis in `body`. It lies in the k-dimensional
        # span of the basis with probability zero.
        h = jnp.sin(index * 12.9898 + (j + 1).astype(dtype) * 78.233) * 43758.5453
        return h - jnp.floor(h) - 0.5

    basis = jnp.zeros((k + 1, n), dtype)
    norm0 = jnp.linalg.norm(v)
    # A zero start vector is replaced by e_0 (built from v so XLA does not
    # constant-fold a length-n reduction at compile time).
    e0 = (jnp.arange(n) == 0).astype(dtype) + 0.0 * v
    q0 = jnp.where(norm0 > 0, v / jnp.where(norm0 > 0, norm0, 1.0), e0)
    basis = basis.at[0].set(q0)
    zero = jnp.zeros((), dtype)

    def body(j, carry):
        basis, diag, beta, scale, restarts, nfinite, stopped, sym = carry
        q = basis[j]
        q_prev = basis[jnp.maximum(j - 1, 0)]
        beta_prev = jnp.where(j > 0, beta[jnp.maximum(j - 1, 0)], 0.0)
        w = matvec(q)
        a = jnp.vdot(q, w)
        if symmetry:  # q_{j-1}ᵀ A q_j against q_jᵀ A q_{j-1} = β_{j-1} (see docstring)
            s, t = jnp.vdot(q_prev, w), beta_prev
            norm_w = jnp.linalg.norm(w)
            pair_scale = jnp.maximum(norm_w, sym[3])  # max ‖A q_i‖ so far, i ≤ j
            gap = jnp.abs(s - t) / jnp.maximum(pair_scale, jnp.finfo(dtype).tiny)
            worse = (j > 0) & ~stopped & jnp.isfinite(gap) & (gap > sym[4])
            sym = tuple(jnp.where(worse, new, old) for new, old in
                        zip((s, t, pair_scale), sym[:3], strict=True)) + (
                jnp.where(stopped, sym[3], pair_scale), jnp.where(worse, gap, sym[4]))
        w = w - a * q - beta_prev * q_prev
        if reortho == "full":
            w = _orthogonalize(w, basis)
        b = jnp.linalg.norm(w)
        ok = jnp.isfinite(a) & jnp.isfinite(b) & ~stopped
        stopped = ~ok
        scale = jnp.where(ok, jnp.maximum(scale, jnp.maximum(jnp.abs(a), b)), scale)
        broke = ok & (b <= rtol * scale)
        # On breakdown the next vector is the restart candidate instead of w. One more
        # Gram–Schmidt pass serves both (w is already orthogonal; a pseudo-random vector
        # needs one pass): a select, not a ``lax.cond``, which compiles faster and costs one
        # pass per step (under vmap over probes a cond runs both branches anyway).
        if reortho == "full":
            z = jnp.where(broke, candidate(j), w)
            q_next = _unit(z - basis.T @ (basis @ z))
        else:  # the plain recurrence: only a restart vector is orthogonalized
            c = candidate(j)
            q_next = jnp.where(broke, _unit(_orthogonalize(c, basis)), w / jnp.where(ok, b, 1.0))
        # After a non-finite value everything is frozen at zero: decoupled, zero weight.
        q_next = jnp.where(ok, q_next, 0.0)
        a = jnp.where(ok, a, 0.0)
        b = jnp.where(ok & ~broke, b, 0.0)
        basis = jax.lax.dynamic_update_index_in_dim(basis, q_next, j + 1, axis=0)
        diag = diag.at[j].set(a)
        beta = beta.at[j].set(b)
        restarts = restarts + broke.astype(restarts.dtype)
        nfinite = nfinite + ok.astype(nfinite.dtype)
        return basis, diag, beta, scale, restarts, nfinite, stopped, sym

    init = (
        basis,
        jnp.zeros((k,), dtype),
        jnp.zeros((k,), dtype),
        zero,
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), bool),
        # worst pair (s, t, scale), max ‖A q_i‖ so far, worst relative gap
        (zero, zero, zero, zero, jnp.full((), -1.0, dtype)),
    )
    basis, diag, beta, _, restarts, nfinite, _, sym = jax.lax.fori_loop(0, k, body, init)
    result = LanczosResult(
        diag=diag,
        offdiag=beta[:-1],
        basis=basis[:k],
        residual_norm=beta[-1],
        num_restarts=restarts,
        num_finite_steps=nfinite,
    )
    return (result, sym[:3]) if symmetry else result


def lanczos_with_symmetry(matvec_flat: Callable, v: Array, k: int, reortho: str, key: Array):
    """``(LanczosResult, symmetry stats)``: the stats from the loop itself when k ≥ 2
    (no extra matvec, nothing more to compile), else ``symmetry_stats`` (two matvecs)."""
    if k >= 2:
        return _lanczos_flat(matvec_flat, v, k, reortho, None, symmetry=True)
    result = _lanczos_flat(matvec_flat, v, k, reortho, None)
    return result, symmetry_stats(matvec_flat, key, v.shape[0], v.dtype)


def worst_symmetry_pair(stats) -> tuple[Array, ...]:
    """The ``(s, t, scale)`` with the largest |s − t|/scale among stats with a leading axis."""
    s, t, scale = stats
    gap = jnp.abs(s - t) / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    i = jnp.argmax(jnp.where(jnp.isfinite(gap), gap, -1.0))
    return s[i], t[i], scale[i]


def raise_if_nonfinite(num_finite_steps, num_steps: int, what: str = "matvec") -> None:
    """Raise ``ValueError`` if a run stopped early on a non-finite value (eager only).

    Under ``jit``/``vmap`` the counts are tracers and nothing can be raised: read
    ``num_finite_steps`` (equal to ``num_steps`` when all went well).
    """
    if not is_concrete(num_finite_steps):
        return
    nfin = np.asarray(num_finite_steps)  # host values: no eager program to compile
    if bool(np.any(nfin < num_steps)):
        first = int(np.min(nfin))
        raise ValueError(
            f"{what} produced a non-finite value (NaN or inf) at Lanczos step {first} "
            f"of {num_steps}; the iteration was stopped there. Check the operator (overflow, "
            "log of a negative number, a NaN in the parameters or data)."
        )


def check_lanczos_result(result: LanczosResult, what: str = "matvec") -> None:
    """``raise_if_nonfinite`` for a ``LanczosResult`` (eager only; no-op under jit)."""
    raise_if_nonfinite(result.num_finite_steps, result.diag.shape[-1], what)


def tridiag_matrix(result: LanczosResult) -> Array:
    """The dense ``(k, k)`` symmetric tridiagonal T from a ``LanczosResult``."""
    return (
        jnp.diag(result.diag)
        + jnp.diag(result.offdiag, 1)
        + jnp.diag(result.offdiag, -1)
    )


def ritz(result: LanczosResult) -> Ritz:
    """Eigen-decompose T (k×k, dense ``eigh``): Ritz values, weights τ_j = Y_{0j}², bounds.

    Padding after a non-finite stop has zero weight and ``valid=False``.
    """
    t = tridiag_matrix(result)
    values, vectors = jnp.linalg.eigh(t)
    weights = vectors[0] ** 2
    bounds = jnp.abs(result.residual_norm * vectors[-1])
    k = result.diag.shape[0]
    # A Ritz vector is valid when it lives on the steps completed before a stop.
    mask = (jnp.arange(k) < result.num_finite_steps).astype(vectors.dtype)
    valid = jnp.sum((vectors**2) * mask[:, None], axis=0) > 0.5
    return Ritz(values, weights, vectors, bounds, valid)


def eigh_extreme(
    num_steps: int,
    num_eigs: int,
    *,
    which: str = "largest",
    reortho: str = "full",
    check_symmetry: bool = True,
) -> Callable[..., EigenResult]:
    """Build ``estimate(matvec, like, *, key) -> EigenResult``: extreme eigenpairs by Lanczos.

    Runs ``num_steps`` Lanczos steps from a random ±1 start vector drawn
    from ``key`` and returns the ``num_eigs`` largest (or smallest, or both) Ritz
    values θ with unit Ritz vectors x = Qᵀ y as pytrees shaped like ``like``.
    Extreme Ritz values converge first; ``residual_norms`` says how far:
    some eigenvalue of A lies in [θ − r, θ + r].

    Eagerly (concrete ``like``), the matvec is checked for symmetry
    (q_{j-1}ᵀAq_j against q_jᵀAq_{j-1} = β_{j-1} along the run itself, no extra matvec;
    two extra matvecs when ``num_steps`` is 1; ``check_symmetry=False`` to skip) and a
    non-finite value raises
    ``ValueError``; under ``jit``/``vmap`` neither check can raise: read
    ``num_finite_steps`` (== num_steps when all went well). Eagerly, the matvec's
    arrays are data: a new matvec of the same structure compiles nothing new.
    """
    if which not in _WHICH:
        raise ValueError(f"which={which!r} is not one of {_WHICH}")
    if reortho not in _REORTHO:
        raise ValueError(f"reortho={reortho!r} is not one of {_REORTHO}")
    check_positive_int(num_steps, "num_steps")
    check_positive_int(num_eigs, "num_eigs")
    if num_eigs > num_steps:
        raise ValueError(f"num_eigs must be an int in [1, num_steps={num_steps}], got {num_eigs!r}")
    if which == "both" and 2 * num_eigs > num_steps:
        raise ValueError(
            f"which='both' returns 2*num_eigs={2 * num_eigs} values, more than "
            f"num_steps={num_steps} Ritz values; lower num_eigs or raise num_steps"
        )
    opts = dict(num_steps=num_steps, num_eigs=num_eigs, which=which, reortho=reortho,
                check_symmetry=check_symmetry)

    def estimate(matvec, like, legacy_like=None, /, *, key=None) -> EigenResult:
        like, key = legacy_key(like, legacy_like, key)
        key = check_key(key)
        check_num_steps(num_steps, tree_size(like))
        abstract = AbstractTree(like)
        if not is_concrete((like, key)):
            result, _ = _eigh_extreme(matvec, key, like=abstract, **opts)
            return result
        result, sym = compiled.call(_eigh_extreme, dict(like=abstract, **opts),
                                    [(matvec, (abstract.tree(),), "matvec", "like")], (key,),
                                    compiler_options=probe_compiler_options())
        raise_if_asymmetric(sym)
        raise_if_nonfinite(result.num_finite_steps, num_steps)
        return result

    return estimate


def _eigh_extreme(matvec, key, *, like, num_steps, num_eigs, which, reortho, check_symmetry):
    """(EigenResult, symmetry stats or None) of a matvec on vectors shaped like ``like``."""
    like = like.tree()
    matvec_flat, unravel, n = flatten_matvec(matvec, like)
    dtype = ravel_like(like)[0].dtype
    k_start, k_sym = jax.random.split(key)
    v0 = rademacher(k_start, (n,), dtype)  # any start with no zero overlap
    if check_symmetry:
        res, sym = lanczos_with_symmetry(matvec_flat, v0, num_steps, reortho, k_sym)
    else:
        res, sym = _lanczos_flat(matvec_flat, v0, num_steps, reortho, None), None
    rz = ritz(res)
    # Invalid (padding) values go to the far end so they are never selected.
    big = jnp.finfo(rz.values.dtype).max
    lo = jnp.where(rz.valid, rz.values, big)
    hi = jnp.where(rz.valid, rz.values, -big)
    if which == "largest":  # (one eigenpair: argmax, the first index of the max, as argsort)
        idx = jnp.argmax(hi)[None] if num_eigs == 1 else jnp.argsort(-hi)[:num_eigs]
    elif which == "smallest":
        idx = jnp.argmin(lo)[None] if num_eigs == 1 else jnp.argsort(lo)[:num_eigs]
    else:
        idx = jnp.concatenate([jnp.argsort(lo)[:num_eigs], jnp.argsort(-hi)[:num_eigs][::-1]])
    y = rz.vectors[:, idx]  # (k, m)
    x = res.basis.T @ y  # (n, m)
    x = x / jnp.linalg.norm(x, axis=0, keepdims=True)
    vectors = jax.vmap(unravel)(x.T)
    result = EigenResult(
        values=rz.values[idx],
        vectors=vectors,
        residual_norms=rz.residual_bounds[idx],
        num_restarts=res.num_restarts,
        num_finite_steps=res.num_finite_steps,
    )
    return result, sym
