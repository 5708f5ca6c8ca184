"""Curvature of a loss with respect to parameter pytrees: Hessian and Gauss–Newton.

Operators (pure closures over the parameters, so they jit, vmap over
initializations and differentiate):

  H v  = d/dε ∇L(θ + εv)|₀            forward-over-reverse (``hessian_matvec``),
  G v  = Jᵀ H_out J v                 Gauss–Newton, J = ∂f/∂θ, H_out = ∂²ℓ/∂f²
                                      (``gauss_newton_matvec``, from
                                      ``gne_jax.probes.jacobian.jacobian_operators``).

Measurements built on them reuse the generic pieces of the library rather than
re-implementing them: traces by ``gne_jax.probes.stochtrace.hutchinson``/``hutchpp``,
top-k eigenpairs by ``gne_jax.linalg.lanczos.eigh_extreme``, densities by
``gne_jax.linalg.spectral.spectral_density``. Per-group traces (``group_traces``) use
one probe v per matvec for all groups at once: E[v_gᵀ (A v)_g] = tr A_gg for
Rademacher or Gaussian v, since E[v vᵀ] = I.

For a piecewise-linear network (ReLU/linear layers) with ℓ = ½‖f − y‖², every
∂²f/∂θ_i² vanishes almost everywhere, so tr H = tr G = ‖J‖²_F = Σ_l ‖∂f/∂W_l‖²_F
(derivations §14.3); the tests check ``hessian_trace`` against that identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gne_jax._tree import path_names
from gne_jax._validate import check_choice, check_key, check_positive_int
from gne_jax.linalg.lanczos import EigenResult, eigh_extreme, flatten_matvec, ravel_like
from gne_jax.linalg.spectral import SpectralDensity, spectral_density
from gne_jax.probes.stochtrace import (
    DISTRIBUTIONS,
    TraceEstimate,
    hutchinson,
    hutchpp,
    map_probes,
    mean_and_sem,
    sample_probe,
)

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

TRACE_METHODS = ("hutchinson", "hutch++")
GROUPINGS = ("layer", "leaf", "all")


def _check_scalar_loss(loss_fn: Callable, params: PyTree) -> None:
    out = jax.eval_shape(loss_fn, params)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            "`loss_fn(params)` must return a scalar float (the loss); got "
            f"{jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), out)}. Reduce over the "
            "batch (mean or sum) inside loss_fn."
        )


def hessian_matvec(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *,
                   linearize: bool = True) -> Matvec:
    """v ↦ H v with H = ∇²_θ loss_fn(θ) at ``params`` (forward-over-reverse).

    ``linearize=True`` runs the gradient's forward and backward pass once
    (``jax.linearize`` of ∇L) and reuses it for every product (memory: the
    linearization's residuals); ``False`` recomputes ``jvp(grad(L))`` per call.
    """
    _check_scalar_loss(loss_fn, params)
    grad_fn = jax.grad(loss_fn)
    if linearize:
        _, hvp = jax.linearize(grad_fn, params)
        return hvp
    return lambda v: jax.jvp(grad_fn, (params,), (v,))[1]


def gauss_newton_matvec(
    apply_fn: Callable[[PyTree], PyTree],
    params: PyTree,
    loss_of_output: Callable[[PyTree], jax.Array],
) -> Matvec:
    """v ↦ G v = Jᵀ H_out J v, with J = ∂apply_fn/∂θ and H_out = ∇² loss_of_output at f(θ).

    G is positive semi-definite when ``loss_of_output`` is convex (squared error,
    softmax cross-entropy). J v and Jᵀ u come from one linearization
    (``gne_jax.probes.jacobian.jacobian_operators``); H_out u is forward-over-reverse on the
    outputs (cheap: no pass through the network).
    """
    from gne_jax.probes.jacobian import jacobian_operators

    ops = jacobian_operators(apply_fn, params)
    _check_scalar_loss(loss_of_output, ops.out)
    grad_out = jax.grad(loss_of_output)

    def h_out(u):
        return jax.jvp(grad_out, (ops.out,), (u,))[1]

    return lambda v: ops.vjp(h_out(ops.jvp(v)))


def trace(matvec: Matvec, key: jax.Array, like: PyTree, *, num_matvecs: int = 100,
          method: str = "hutchinson", dist: str = "rademacher",
          chunk_size: int | None = None) -> TraceEstimate:
    """tr A by ``gne_jax.probes.stochtrace`` (Hutchinson or Hutch++) with ``num_matvecs`` matvecs.

    The estimator sees the operator on flat vectors (``ravel_pytree``): the same
    estimator, but one probe draw per matvec instead of one per leaf, which keeps
    the compiled program small for parameter pytrees with many leaves.
    """
    check_choice(method, "method", TRACE_METHODS)
    matvec_flat, _, n = flatten_matvec(matvec, like)
    flat_like = jax.ShapeDtypeStruct((n,), ravel_like(like)[0].dtype)
    if method == "hutchinson":
        est = hutchinson(num_matvecs, dist=dist, chunk_size=chunk_size)
    else:
        est = hutchpp(num_matvecs, dist=dist)
    return est(matvec_flat, key, flat_like)


def hessian_trace(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array, *,
                  num_matvecs: int = 100, method: str = "hutchinson", dist: str = "rademacher",
                  chunk_size: int | None = None) -> TraceEstimate:
    """tr ∇²_θ loss_fn(θ) at ``params``: Hutchinson (mean vᵀHv) or Hutch++ over HVPs.

    ``value ± sem`` is the estimate and its probe standard error; cost
    ``num_matvecs`` HVPs. vmap over (params, key) for an ensemble of initializations.
    """
    return trace(hessian_matvec(loss_fn, params), key, params, num_matvecs=num_matvecs,
                 method=method, dist=dist, chunk_size=chunk_size)


class GroupTraces(NamedTuple):
    """Per-group traces tr A_gg, one entry per group name (dicts keyed by name).

    Attributes:
      value: {name: estimate of tr A_gg}.
      sem: {name: its standard error}.
      samples: {name: per-probe values v_gᵀ (A v)_g}.
      total: ``TraceEstimate`` of tr A from the same probes (Σ_g samples).
      sizes: {name: number of parameters in the group} (Python ints).
    """

    value: dict
    sem: dict
    samples: dict
    total: TraceEstimate
    sizes: dict


def _path_name(path, grouping: str) -> str:
    keys = list(path_names(path))
    if grouping == "all":
        return "all"
    if grouping == "layer" and len(keys) > 1:
        keys = keys[:-1]  # drop "kernel"/"bias"/"scale": group by the owning module
    return "/".join(keys) if keys else "root"


def parameter_groups(like: PyTree, groups="layer") -> list[str]:
    """Group name of each leaf of ``like`` (in ``jax.tree.leaves`` order).

    ``groups``: "layer" (the leaf's path without its last key, e.g. "Dense_0" for
    params["Dense_0"]["kernel"]), "leaf" (the full path), "all" (one group), or a
    callable ``path_string -> name`` applied to the "/"-joined leaf path.
    """
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    if callable(groups):
        return [str(groups(_path_name(p, "leaf"))) for p in paths]
    check_choice(groups, "groups", GROUPINGS)
    return [_path_name(p, groups) for p in paths]


def group_traces(matvec: Matvec, key: jax.Array, like: PyTree, *, num_matvecs: int = 100,
                 groups="layer", dist: str = "rademacher",
                 chunk_size: int | None = None) -> GroupTraces:
    """tr A_gg for each parameter group g, all from the same ``num_matvecs`` probes.

    With a probe v (E[vvᵀ] = I, probes from ``gne_jax.probes.stochtrace.sample_probe``)
    and w = A v, the per-group sample v_gᵀ w_g has mean tr A_gg; its variance
    includes the off-diagonal blocks A_gh (Gaussian probes:
    Var = ‖A_g,:‖²_F + tr(A_gg²)). The group samples sum to the Hutchinson
    sample vᵀ A v, so ``total`` is the usual trace estimate.
    """
    k = check_positive_int(num_matvecs, "num_matvecs", minimum=2)
    check_choice(dist, "dist", DISTRIBUTIONS)
    key = check_key(key)
    names = parameter_groups(like, groups)
    order = list(dict.fromkeys(names))
    index = jnp.asarray([order.index(n) for n in names], jnp.int32)
    sizes = {g: 0 for g in order}
    for n, leaf in zip(names, jax.tree.leaves(like), strict=True):
        sizes[n] += int(jnp.size(leaf)) if hasattr(leaf, "shape") else 1

    flat_like, unravel = ravel_like(like)
    probe_like = jax.ShapeDtypeStruct(flat_like.shape, flat_like.dtype)

    def one(k_):
        # One flat draw (one PRNG call, not one per leaf), then back to the pytree.
        v = unravel(sample_probe(k_, probe_like, dist))
        w = matvec(v)
        per_leaf = jnp.stack([
            jnp.vdot(a, b).real for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(w),
                                                  strict=True)
        ])
        return jax.ops.segment_sum(per_leaf, index, num_segments=len(order))

    samples = map_probes(one, jax.random.split(key, k), chunk_size)  # (k, G)
    value, sem = mean_and_sem(samples)
    total_samples = jnp.sum(samples, axis=1)
    total = TraceEstimate(*mean_and_sem(total_samples), total_samples, k)
    return GroupTraces(
        value={g: value[i] for i, g in enumerate(order)},
        sem={g: sem[i] for i, g in enumerate(order)},
        samples={g: samples[:, i] for i, g in enumerate(order)},
        total=total,
        sizes=sizes,
    )


def hessian_group_traces(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                         key: jax.Array, **kwargs) -> GroupTraces:
    """Per-layer (per-group) Hessian traces tr H_gg; keywords as in ``group_traces``."""
    return group_traces(hessian_matvec(loss_fn, params), key, params, **kwargs)


def hessian_eigenpairs(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                       key: jax.Array, *, num_eigs: int = 5, num_steps: int = 30,
                       which: str = "largest", check_symmetry: bool = True) -> EigenResult:
    """Top-k (or bottom-k) Hessian eigenvalues and eigenvectors (pytrees like ``params``).

    Lanczos with full reorthogonalization (``gne_jax.linalg.lanczos.eigh_extreme``) from a
    random start; ``num_steps`` HVPs. Check ``residual_norms`` for convergence:
    an eigenvalue of H lies within it of each returned value.
    """
    est = eigh_extreme(num_steps, num_eigs, which=which, check_symmetry=check_symmetry)
    return est(hessian_matvec(loss_fn, params), key, params)


def hessian_density(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array,
                    **kwargs) -> SpectralDensity:
    """SLQ density of the Hessian spectrum; keywords as in `gne_jax.linalg.spectral_density`."""
    return spectral_density(hessian_matvec(loss_fn, params), key, params, **kwargs)
