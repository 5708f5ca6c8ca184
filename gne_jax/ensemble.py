"""Block moments over many random initializations at once.

``ensemble_block_moments`` draws ``num_inits`` initializations with ``model.init``
vmapped over PRNG keys and probes each (``block_moments``) inside the same
vmapped function, so variables are never materialized for the whole ensemble at
once when ``init_chunk`` bounds memory (``lax.map`` over chunks of inits). With
more than one device the inits are sharded over a 1-D mesh axis ``"inits"``
(``jax.shard_map``): every device runs its share; per-init results do not
depend on the device count.

Batch statistics are threaded explicitly: each init's ``batch_stats`` are part of
its variables and the model is measured through pure functions of them (anchors
§5.4); the example axis of a batch-coupled model is never vmapped.

The summaries follow theory §1.1: the pooled ϕ = E[φ₂] − E[φ]² (the theory's
definition; it includes init-to-init fluctuation of the trace) beside the mean
per-init spectral spread E[φ₂ − φ²], and the median and quantiles of φ, which
matter where its law across inits is heavy-tailed.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gne_jax._validate import check_key, check_positive_int, is_concrete
from gne_jax.block_moments import BlockMoments, block_moments, raise_if_non_finite

PyTree = Any
QUANTILES = (0.05, 0.25, 0.75, 0.95)


def _per_init(model, x, key, train, probe_kw):
    k_init, k_probe = jax.random.split(key)
    variables = model.init(k_init, x, train=False)
    return block_moments(model, variables, x, key=k_probe, train=train, **probe_kw)


def inits_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with axis name ``"inits"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("inits",))


class EnsemblePlan(NamedTuple):
    """A prepared ensemble measurement: ``run(x, keys)`` (jitted) and its arguments."""

    run: Any
    x: PyTree
    keys: jax.Array
    num_inits: int

    def compile(self):
        """Ahead-of-time compilation (thread-safe: sweeps compile variants in parallel)."""
        return self.run.lower(self.x, self.keys).compile()


def ensemble_block_moments(
    model,
    x: PyTree,
    *,
    key: jax.Array,
    num_inits: int,
    train: bool = False,
    init_chunk: int | None = None,
    mesh: Mesh | None | str = "auto",
    **probe_kw,
) -> BlockMoments:
    """``BlockMoments`` of ``num_inits`` random initializations (leading axis: init).

    Args:
      model: a model with ``init(key, x, train=False)`` and ``blocks(variables, x, train)``.
      x: the probe input (the whole batch).
      key: init i uses ``jax.random.split(key, num_inits)[i]`` (split again into an init
        key and a probe key), so results for an init do not depend on ``num_inits``'s
        chunking or sharding.
      num_inits: ensemble size.
      train: measurement mode for batch-coupled layers (see ``block_moments``).
      init_chunk: inits processed at once per device (``lax.map``); bounds memory. For
        conv nets on CPU, 1 compiles several times faster than vmapping kernels.
      mesh: ``"auto"`` shards over all devices when there is more than one; a ``Mesh``
        with an ``"inits"`` axis to choose; ``None`` for no sharding.
      **probe_kw: ``num_probes``, ``method``, ``dist``, ``probe_chunk``, ``block_chunk``,
        ``end_to_end`` (see ``groups_moments``).
    """
    plan = plan_ensemble(model, x, key=key, num_inits=num_inits, train=train,
                         init_chunk=init_chunk, mesh=mesh, **probe_kw)
    return run_plan(plan)


def plan_ensemble(model, x, *, key, num_inits, train=False, init_chunk=None, mesh="auto",
                  **probe_kw) -> EnsemblePlan:
    """Checks the arguments and prepares (without running) ``ensemble_block_moments``."""
    key = check_key(key)
    num_inits = check_positive_int(num_inits, "num_inits")
    if init_chunk is not None:
        check_positive_int(init_chunk, "init_chunk")
    keys = jax.random.split(key, num_inits)
    if mesh == "auto":
        mesh = inits_mesh() if jax.device_count() > 1 else None
    run = _ensemble_fn(model, train, init_chunk, tuple(sorted(probe_kw.items())), mesh)
    if mesh is not None:
        d = mesh.shape["inits"]
        padded = math.ceil(num_inits / d) * d
        if padded != num_inits:  # extra inits are computed and dropped
            keys = jnp.concatenate([keys, jax.random.split(jax.random.key(0),
                                                           padded - num_inits)])
        keys = jax.device_put(keys, NamedSharding(mesh, P("inits")))
    return EnsemblePlan(run, x, keys, num_inits)


def run_plan(plan: EnsemblePlan, compiled=None) -> BlockMoments:
    """Runs a plan (with its ahead-of-time ``compiled`` executable if given)."""
    result = (compiled or plan.run)(plan.x, plan.keys)
    result = jax.tree.map(lambda a: a[: plan.num_inits], result)
    if is_concrete(result.blocks.finite):  # under an outer jit, `finite` says it instead
        raise_if_non_finite(result.names, jnp.all(result.blocks.finite, axis=0))
    return result


@functools.lru_cache(maxsize=32)
def _ensemble_fn(model, train, init_chunk, probe_kw, mesh):
    """The jitted ensemble for one (model, options, mesh), cached across calls."""

    def run(x, ks):
        f = lambda k: _per_init(model, x, k, train, dict(probe_kw))
        if init_chunk is None or init_chunk >= ks.shape[0]:
            return jax.vmap(f)(ks)
        return jax.lax.map(f, ks, batch_size=init_chunk)

    if mesh is None:
        return jax.jit(run)
    if "inits" not in mesh.axis_names:
        raise ValueError(f"`mesh` must have an axis named 'inits'; got {mesh.axis_names}.")
    # check_vma=False: the inits are independent and there is no collective. With
    # varying-axis checks on, transposing the linearization w.r.t. the replicated input x
    # inserts a psum over devices (the transpose of pvary), which would sum the per-init
    # VJPs of different devices.
    return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("inits")),
                                 out_specs=P("inits"), check_vma=False))


def summarize(values: jax.Array, axis: int = 0) -> dict[str, np.ndarray]:
    """mean, std, sem, median and the ``QUANTILES`` of ``values`` along ``axis``."""
    v = np.asarray(values, np.float64)
    n = v.shape[axis]
    out = {
        "mean": v.mean(axis),
        "std": v.std(axis, ddof=1) if n > 1 else np.zeros_like(v.mean(axis)),
        "median": np.median(v, axis),
    }
    out["sem"] = out["std"] / math.sqrt(n)
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(v, q, axis=axis)
    return out


class PooledMoments(NamedTuple):
    """Moments pooled over K initializations (theory §1.1: the expectation sits inside φ).

    ``varphi`` = mean φ₂ − (mean φ)², which adds the init-to-init variance of the
    trace to the mean per-init spectral variance; ``varphi_within`` is the latter alone.
    SEs are across initializations (delta method for ϕ).
    """

    phi: jax.Array
    phi2: jax.Array
    varphi: jax.Array
    phi_sem: jax.Array
    phi2_sem: jax.Array
    varphi_sem: jax.Array
    varphi_within: jax.Array
    num_inits: int


def pool_inits(phi, phi2) -> PooledMoments:
    """Pools per-init estimates ``phi[k]``, ``phi2[k]`` (arrays over K ≥ 2 inits).

    Accepts a stacked `JacobianMoments` (e.g. from ``jax.vmap`` over keys) as
    ``pool_inits(m.phi, m.phi2)``. Leading axis = initializations; trailing axes
    (e.g. blocks) are pooled independently.
    """
    phi, phi2 = jnp.asarray(phi), jnp.asarray(phi2)
    if phi.shape != phi2.shape or phi.ndim < 1 or phi.shape[0] < 2:
        raise ValueError(
            "phi and phi2 must have the same shape with a leading axis of >= 2 inits; "
            f"got {phi.shape} and {phi2.shape}"
        )
    k = phi.shape[0]
    m1, m2 = phi.mean(0), phi2.mean(0)
    sem = lambda a: a.std(0, ddof=1) / math.sqrt(k)
    # ϕ = m2 − m1²: linearize around the means (delta method across inits).
    lin = phi2 - 2 * m1 * phi
    varphi = m2 - m1**2
    return PooledMoments(
        phi=m1,
        phi2=m2,
        varphi=varphi,
        phi_sem=sem(phi),
        phi2_sem=sem(phi2),
        varphi_sem=sem(lin),
        varphi_within=(phi2 - phi**2).mean(0),
        num_inits=int(k),
    )


def ensemble_summary(moments) -> dict[str, dict[str, np.ndarray]]:
    """Summaries across inits (axis 0) of a ``JacobianMoments`` with a leading init axis.

    Keys: ``phi``, ``phi2``, ``varphi`` (per-init spread φ₂ − φ²) each with
    ``summarize`` statistics, and ``varphi_pooled`` = E[φ₂] − E[φ]² with its SE across
    inits (``pool_inits``; SE 0 for a single init).
    """
    out = {"phi": summarize(moments.phi), "phi2": summarize(moments.phi2),
           "varphi": summarize(moments.varphi)}
    phi, phi2 = np.asarray(moments.phi, np.float64), np.asarray(moments.phi2, np.float64)
    if phi.shape[0] > 1:
        pooled = pool_inits(phi, phi2)
        out["varphi_pooled"] = {"mean": np.asarray(pooled.varphi),
                                "sem": np.asarray(pooled.varphi_sem)}
    else:
        out["varphi_pooled"] = {"mean": phi2[0] - phi[0] ** 2, "sem": np.zeros_like(phi[0])}
    return out
