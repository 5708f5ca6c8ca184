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

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import FrozenDict

from gne_jax._tree import is_concrete, path_names, tree_size
from gne_jax._validate import (
    check_choice,
    check_float_tree,
    check_key,
    check_positive_int,
    legacy_key,
    renamed_argument,
)
from gne_jax.linalg.lanczos import (
    EigenResult,
    _eigh_extreme,
    check_num_steps,
    eigh_extreme,
    flatten_matvec,
    raise_if_asymmetric,
    raise_if_nonfinite,
    ravel_like,
)
from gne_jax.linalg.spectral import (
    SpectralDensity,
    _check_density_options,
    _density,
    _density_arrays,
    _finish,
)
from gne_jax.probes import compiled
from gne_jax.probes.compiled import AbstractTree, probe_compiler_options
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


def _check_scalar_loss(loss_fn: Callable, params: PyTree, out=None) -> None:
    """Raise unless ``loss_fn(params)`` (of shapes ``out`` when given) is a float scalar."""
    if out is None:
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


def _probe_options(num_probes, num_matvecs, chunk_size, probe_chunk, *, default=100):
    num_probes = renamed_argument(num_probes, num_matvecs, new="num_probes", old="num_matvecs",
                                  default=default)
    probe_chunk = renamed_argument(probe_chunk, chunk_size, new="probe_chunk",
                                   old="chunk_size", default=None)
    return num_probes, probe_chunk


def _check_trace_options(num_probes, method, dist, probe_chunk):
    check_choice(method, "method", TRACE_METHODS)
    check_choice(dist, "dist", DISTRIBUTIONS)
    check_positive_int(num_probes, "num_probes", minimum=4 if method == "hutch++" else 2)
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")


def _trace(matvec, key, like, *, num_probes, method, dist, probe_chunk) -> TraceEstimate:
    matvec_flat, _, n = flatten_matvec(matvec, like)
    flat_like = jax.ShapeDtypeStruct((n,), ravel_like(like)[0].dtype)
    if method == "hutchinson":
        est = hutchinson(num_probes, dist=dist, probe_chunk=probe_chunk)
    else:
        est = hutchpp(num_probes, dist=dist)
    return est(matvec_flat, flat_like, key=key)


def _raise_if_nonfinite_estimate(value, what: str) -> None:
    """Eager only: a NaN or inf trace estimate raises (a NaN weight, an overflowing loss);
    under ``jit``/``vmap`` the value is returned as it is."""
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(
            f"{what} produced a non-finite value (NaN or inf): the trace estimate is "
            "undefined. Check the operator (overflow, a NaN in the parameters or data)."
        )


def _trace_program(matvec, key, *, like, **opts):
    return _trace(matvec, key, like.tree(), **opts)


def trace(matvec: Matvec, like: PyTree, legacy_like: PyTree = None, /, *,
          key: jax.Array | None = None, num_probes: int | None = None,
          method: str = "hutchinson", dist: str = "rademacher", probe_chunk: int | None = None,
          num_matvecs: int | None = None, chunk_size: int | None = None) -> TraceEstimate:
    """tr A ≈ (1/k) Σ vᵢᵀAvᵢ (Hutchinson) or Hutch++ with k = ``num_probes`` matvecs (100).

    The estimator sees the operator on flat vectors (``ravel_pytree``): the same
    estimator, but one probe draw per matvec instead of one per leaf, which keeps
    the compiled program small for parameter pytrees with many leaves. Eagerly it runs
    one program per structure of ``matvec``. ``num_matvecs``/``chunk_size``: deprecated
    names of ``num_probes``/``probe_chunk``.
    """
    like, key = legacy_key(like, legacy_like, key)
    key = check_key(key)
    num_probes, probe_chunk = _probe_options(num_probes, num_matvecs, chunk_size, probe_chunk)
    _check_trace_options(num_probes, method, dist, probe_chunk)
    opts = dict(num_probes=num_probes, method=method, dist=dist, probe_chunk=probe_chunk)
    abstract = AbstractTree(like)
    if not is_concrete((like, key)):
        return _trace(matvec, key, like, **opts)
    result = compiled.call(_trace_program, dict(like=abstract, **opts),
                           [(matvec, (abstract.tree(),), "matvec", "like")], (key,))
    _raise_if_nonfinite_estimate(result.value, "matvec")
    return result


def _hoisted_loss(loss_fn, params):
    """Validates ``loss_fn`` and ``params`` and returns ``(loss_fn, example params)``."""
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable; got {type(loss_fn).__name__}.")
    check_float_tree(params, "params")
    example = AbstractTree(params).tree()
    # eagerly, the output shapes of the trace the program reuses (none when the fast path
    # reads the function's structure without tracing it)
    out = compiled.hoist_fast(loss_fn, example, argname="loss_fn", inputs="params")[
        0].out_shape if is_concrete(params) else None
    _check_scalar_loss(loss_fn, params, out)
    return (loss_fn, (example,), "loss_fn", "params")


def _hessian_trace_program(loss_fn, params, key, **opts):
    return _trace(hessian_matvec(loss_fn, params), key, params, **opts)


def hessian_trace(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                  legacy_key_: jax.Array | None = None, /, *, key: jax.Array | None = None,
                  num_probes: int | None = None, method: str = "hutchinson",
                  dist: str = "rademacher", probe_chunk: int | None = None,
                  num_matvecs: int | None = None,
                  chunk_size: int | None = None) -> TraceEstimate:
    """tr ∇²_θ loss_fn(θ) at ``params``: Hutchinson (mean vᵀHv) or Hutch++ over HVPs.

    ``value ± sem`` is the estimate and its probe standard error; cost ``num_probes``
    HVPs (default 100). vmap over (params, key) for an ensemble of initializations.
    Eagerly it runs jitted, one program per structure of ``loss_fn`` (its data batch
    and ``params`` are arguments). ``num_matvecs``/``chunk_size``: deprecated names.
    """
    if legacy_key_ is not None:
        _, key = legacy_key(legacy_key_, params, key, like_name="params")
    key = check_key(key)
    num_probes, probe_chunk = _probe_options(num_probes, num_matvecs, chunk_size, probe_chunk)
    _check_trace_options(num_probes, method, dist, probe_chunk)
    opts = dict(num_probes=num_probes, method=method, dist=dist, probe_chunk=probe_chunk)
    spec = _hoisted_loss(loss_fn, params)
    if not is_concrete((params, key)):
        return _hessian_trace_program(loss_fn, params, key, **opts)
    result = compiled.call(_hessian_trace_program, opts, [spec], (params, key))
    _raise_if_nonfinite_estimate(result.value, "Hessian-vector product")
    return result


@struct.dataclass
class GroupTraces:
    """Per-group traces tr A_gg, one entry per group name (dicts keyed by name; a pytree).

    Attributes:
      value: {name: estimate of tr A_gg}.
      sem: {name: its standard error}.
      samples: {name: per-probe values v_gᵀ (A v)_g}.
      total: ``TraceEstimate`` of tr A from the same probes (Σ_g samples).
      sizes: {name: number of parameters in the group} (Python ints; static).
    """

    value: dict
    sem: dict
    samples: dict
    total: TraceEstimate
    sizes: Mapping = struct.field(pytree_node=False)


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


def _group_traces(matvec, key, like, *, names, num_probes, dist, probe_chunk) -> GroupTraces:
    order = list(dict.fromkeys(names))
    index = jnp.asarray([order.index(n) for n in names], jnp.int32)
    sizes = {g: 0 for g in order}
    for n, leaf in zip(names, jax.tree.leaves(like), strict=True):
        sizes[n] += int(math.prod(jnp.shape(leaf)))

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

    samples = map_probes(one, jax.random.split(key, num_probes), probe_chunk)  # (k, G)
    value, sem = mean_and_sem(samples)
    total_samples = jnp.sum(samples, axis=1)
    total = TraceEstimate(*mean_and_sem(total_samples), total_samples, num_probes)
    return GroupTraces(
        value={g: value[i] for i, g in enumerate(order)},
        sem={g: sem[i] for i, g in enumerate(order)},
        samples={g: samples[:, i] for i, g in enumerate(order)},
        total=total,
        sizes=FrozenDict(sizes),
    )


def _group_traces_program(matvec, key, *, like, **opts):
    return _group_traces(matvec, key, like.tree(), **opts)


def _group_options(like, num_probes, num_matvecs, chunk_size, probe_chunk, groups, dist):
    num_probes, probe_chunk = _probe_options(num_probes, num_matvecs, chunk_size, probe_chunk)
    check_positive_int(num_probes, "num_probes", minimum=2)
    check_choice(dist, "dist", DISTRIBUTIONS)
    if probe_chunk is not None:
        check_positive_int(probe_chunk, "probe_chunk")
    names = tuple(parameter_groups(like, groups))
    return dict(names=names, num_probes=num_probes, dist=dist, probe_chunk=probe_chunk)


def group_traces(matvec: Matvec, like: PyTree, legacy_like: PyTree = None, /, *,
                 key: jax.Array | None = None, num_probes: int | None = None, groups="layer",
                 dist: str = "rademacher", probe_chunk: int | None = None,
                 num_matvecs: int | None = None, chunk_size: int | None = None) -> GroupTraces:
    """tr A_gg for each parameter group g, all from the same ``num_probes`` probes (100).

    With a probe v (E[vvᵀ] = I, probes from ``gne_jax.probes.stochtrace.sample_probe``)
    and w = A v, the per-group sample v_gᵀ w_g has mean tr A_gg; its variance
    includes the off-diagonal blocks A_gh (Gaussian probes:
    Var = ‖A_g,:‖²_F + tr(A_gg²)). The group samples sum to the Hutchinson
    sample vᵀ A v, so ``total`` is the usual trace estimate. ``groups`` as in
    ``parameter_groups``. Eagerly, one program per structure of ``matvec``.
    """
    like, key = legacy_key(like, legacy_like, key)
    key = check_key(key)
    opts = _group_options(like, num_probes, num_matvecs, chunk_size, probe_chunk, groups, dist)
    abstract = AbstractTree(like)
    if not is_concrete((like, key)):
        return _group_traces(matvec, key, like, **opts)
    result = compiled.call(_group_traces_program, dict(like=abstract, **opts),
                           [(matvec, (abstract.tree(),), "matvec", "like")], (key,))
    _raise_if_nonfinite_estimate(result.total.value, "matvec")
    return result


def _hessian_group_traces_program(loss_fn, params, key, **opts):
    return _group_traces(hessian_matvec(loss_fn, params), key, params, **opts)


def hessian_group_traces(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                         legacy_key_: jax.Array | None = None, /, *,
                         key: jax.Array | None = None, num_probes: int | None = None,
                         groups="layer", dist: str = "rademacher",
                         probe_chunk: int | None = None, num_matvecs: int | None = None,
                         chunk_size: int | None = None) -> GroupTraces:
    """Per-layer (per-group) Hessian traces tr H_gg; options as in ``group_traces``."""
    if legacy_key_ is not None:
        _, key = legacy_key(legacy_key_, params, key, like_name="params")
    key = check_key(key)
    opts = _group_options(params, num_probes, num_matvecs, chunk_size, probe_chunk, groups, dist)
    spec = _hoisted_loss(loss_fn, params)
    if not is_concrete((params, key)):
        return _hessian_group_traces_program(loss_fn, params, key, **opts)
    result = compiled.call(_hessian_group_traces_program, opts, [spec], (params, key))
    _raise_if_nonfinite_estimate(result.total.value, "Hessian-vector product")
    return result


def _hessian_eig_program(loss_fn, params, key, **opts):
    return _eigh_extreme(hessian_matvec(loss_fn, params), key, like=AbstractTree(params), **opts)


def hessian_eigenpairs(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                       legacy_key_: jax.Array | None = None, /, *,
                       key: jax.Array | None = None, num_eigs: int = 5, num_steps: int = 30,
                       which: str = "largest", check_symmetry: bool = True) -> EigenResult:
    """Top-k (or bottom-k) Hessian eigenvalues and eigenvectors (pytrees like ``params``).

    Lanczos with full reorthogonalization (``gne_jax.linalg.lanczos.eigh_extreme``) from a
    random start; ``num_steps`` HVPs. Check ``residual_norms`` for convergence:
    an eigenvalue of H lies within it of each returned value. Eagerly one program per
    structure of ``loss_fn``.
    """
    if legacy_key_ is not None:
        _, key = legacy_key(legacy_key_, params, key, like_name="params")
    key = check_key(key)
    eigh_extreme(num_steps, num_eigs, which=which)  # validates the options
    spec = _hoisted_loss(loss_fn, params)
    check_num_steps(num_steps, tree_size(params))
    opts = dict(num_steps=num_steps, num_eigs=num_eigs, which=which, reortho="full",
                check_symmetry=bool(check_symmetry))
    if not is_concrete((params, key)):
        return _hessian_eig_program(loss_fn, params, key, **opts)[0]
    result, sym = compiled.call(_hessian_eig_program, opts, [spec], (params, key),
                                compiler_options=probe_compiler_options())
    raise_if_asymmetric(sym)
    raise_if_nonfinite(result.num_finite_steps, num_steps, "Hessian-vector product")
    return result


def _hessian_density_program(loss_fn, params, key, arrays, **opts):
    return _density(hessian_matvec(loss_fn, params), key, arrays, params, **opts)


def hessian_density(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                    legacy_key_: jax.Array | None = None, /, *, key: jax.Array | None = None,
                    num_steps: int = 30, num_probes: int = 8, num_grid: int = 512, sigma=None,
                    rel_sigma=None, grid: jax.Array | None = None, log_scale: bool = False,
                    log_floor=None, dist: str = "rademacher", reortho: str = "full",
                    probe_chunk: int | None = None,
                    check_symmetry: bool = True) -> SpectralDensity:
    """SLQ density of the Hessian spectrum; options as in ``gne_jax.linalg.spectral_density``.

    Eagerly one program per structure of ``loss_fn`` (data and ``params`` are arguments).
    """
    if legacy_key_ is not None:
        _, key = legacy_key(legacy_key_, params, key, like_name="params")
    key = check_key(key)
    spec = _hoisted_loss(loss_fn, params)
    opts = dict(num_steps=num_steps, num_probes=num_probes, num_grid=num_grid,
                log_scale=bool(log_scale), dist=dist, reortho=reortho, probe_chunk=probe_chunk,
                check_symmetry=bool(check_symmetry))
    _check_density_options(sigma=sigma, rel_sigma=rel_sigma, n=tree_size(params),
                           **{k: opts[k] for k in ("num_steps", "num_probes", "num_grid", "dist",
                                                   "reortho", "probe_chunk")})
    arrays = _density_arrays(sigma, rel_sigma, grid, log_floor)
    if not is_concrete((params, key, arrays)):
        return _hessian_density_program(loss_fn, params, key, arrays, **opts)[0]
    result, sym = compiled.call(_hessian_density_program, opts, [spec], (params, key, arrays),
                                compiler_options=probe_compiler_options())
    return _finish(result, sym, "Hessian-vector product (hessian_density)")
