"""Block moments over many random initializations at once.

``ensemble_block_moments`` draws ``num_inits`` initializations with ``model.init``
vmapped over PRNG keys and probes each (``block_moments``) vmapped over the
resulting variables. Init and measurement are two jitted programs run per chunk
of ``init_chunk`` inits, so only one chunk's variables are held at a time, and
the measurement program does not depend on how the variables were drawn: a
sweep over initializers traces and compiles it once (``_applied_model``).
With more than one device the inits are sharded over a 1-D mesh axis
``"inits"`` (``jax.shard_map``): every device runs its share; per-init results
do not depend on the device count or the chunking.

Batch statistics are threaded explicitly: each init's ``batch_stats`` are part of
its variables and the model is measured through pure functions of them (no
``nn.vmap`` over BatchNorm); the example axis of a batch-coupled model is never vmapped.

The summaries follow derivations §1.1: the pooled ϕ = E[φ₂] − E[φ]² (the theory's
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

from gne_jax._tree import is_concrete
from gne_jax._validate import check_input_tree, check_key, check_positive_int
from gne_jax.probes.block_moments import (
    BlockMoments,
    block_moments,
    check_block_model,
    check_group_options,
    probe_compiler_options,
    raise_if_non_finite,
)

PyTree = Any
QUANTILES = (0.05, 0.25, 0.75, 0.95)


def inits_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with axis name ``"inits"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("inits",))


class EnsemblePlan(NamedTuple):
    """A prepared ensemble measurement: two jitted programs and their chunked arguments.

    ``init(x, keys[c]) -> variables[c]`` and ``measure(variables[c], x, keys[c]) ->
    BlockMoments[c]`` run once per chunk of ``c`` inits. The measurement does not depend
    on how the variables were drawn, so variants of a sweep that differ only in their
    initializer lower to the same ``measure`` program and compile it once.
    """

    init: Any
    measure: Any
    x: PyTree
    init_keys: tuple[jax.Array, ...]
    probe_keys: tuple[jax.Array, ...]
    num_inits: int
    variables_sharding: Any = None

    def lower(self):
        """``(init, measure)`` lowered for ahead-of-time compilation (one chunk's shapes)."""
        lowered_init = self.init.lower(self.x, self.init_keys[0])
        shapes = jax.eval_shape(self.init, self.x, self.init_keys[0])
        if self.variables_sharding is not None:
            shapes = jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.variables_sharding),
                shapes)
        return lowered_init, self.measure.lower(shapes, self.x, self.probe_keys[0])


def ensemble_block_moments(
    model,
    x: PyTree,
    *,
    key: jax.Array,
    num_inits: int,
    train: bool,
    init_chunk: int | None | str = "auto",
    mesh: Mesh | None | str = "auto",
    compiler_options: dict | None | str = "auto",
    num_probes: int = 32,
    method: str = "hutchinson",
    dist: str = "rademacher",
    probe_chunk: int | None = None,
    block_chunk: int | None = None,
    end_to_end: bool = True,
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
      init_chunk: inits drawn and probed at once per device (vmapped); the chunks run one
        after the other, so only one chunk's variables are held at a time. ``None``: all
        at once. ``"auto"`` (default, ``default_init_chunk``): on CPU chunks of 8 for small
        models (≤ 2¹⁸ parameters, no conv) and 1 otherwise, as measured against a loop of
        single-init calls; all at once on accelerators.
      mesh: ``"auto"`` shards over all devices when there is more than one; a ``Mesh``
        with an ``"inits"`` axis to choose; ``None`` for no sharding.
      compiler_options: XLA options of the two programs. ``"auto"``: LLVM ``-O1`` on CPU
        (``probe_compiler_options``), which compiles 1.5–2.5× faster and runs between 14%
        faster and 12% slower (``benchmarks/RESULTS.md``): right for compile-bound sweeps;
        ``None`` for XLA's defaults, e.g. for a long run-bound ensemble.
      num_probes, method, dist, probe_chunk, block_chunk, end_to_end: the per-block probe
        options (see ``groups_moments``).
    """
    plan = plan_ensemble(model, x, key=key, num_inits=num_inits, train=train,
                         init_chunk=init_chunk, mesh=mesh, compiler_options=compiler_options,
                         num_probes=num_probes, method=method, dist=dist,
                         probe_chunk=probe_chunk, block_chunk=block_chunk,
                         end_to_end=end_to_end)
    return run_plan(plan)


SMALL_INIT_PARAMS = 2**18  # below: per-call overhead dominates on CPU, chunks of 8 pay off


def default_init_chunk(platform: str | None = None, num_params: int | None = None,
                       conv: bool = False) -> int | None:
    """The default ensemble strategy per backend, chosen from ``benchmarks/ensemble_cost.py``.

    * GPU/TPU: all inits at once (``None``): the batch fills the accelerator.
    * CPU, small models (at most ``SMALL_INIT_PARAMS`` parameters per init, no conv
      kernels): chunks of 8 vmapped inits. On a 2-core CPU, MLP width 64 depth 32 (135k
      parameters, 32 inits), chunks of 8 took 0.55–0.90× the time of a Python loop of
      jitted single-init calls: per-call overhead dominates and the batch amortizes it.
    * CPU, larger models or conv nets: one init per call (``1``), i.e. the loop's own
      computation as an init and a measurement program (0.94–1.11× the loop at widths
      256–1024, within the VM's noise). All inits vmapped took 1.04–1.49× the loop there
      (the batched working set spills the caches, and two cores leave little for a vmap
      to fill); vmapped conv kernels also become grouped convolutions that XLA:CPU
      compiles several times slower.
    """
    platform = platform or jax.default_backend()
    if platform != "cpu":
        return None
    if num_params is not None and num_params <= SMALL_INIT_PARAMS and not conv:
        return 8
    return 1


def _applied_model(model):
    """``model`` with the fields only its initializers read (``init_only_fields``, e.g. the
    init scheme's name) at their class defaults: what ``apply`` computes is unchanged, so
    every variant that differs only in its initializer maps to one measured model."""
    fields = getattr(type(model), "init_only_fields", ())
    if not fields:
        return model
    return model.clone(**{f: getattr(type(model), f) for f in fields})


def _init_size(model, x, key) -> tuple[int, bool]:
    """(parameters per init, whether any kernel is a conv kernel) from an abstract init.

    Parameter shapes do not depend on the initializer, so this is computed once per
    ``_applied_model`` and input structure."""
    avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                         (x, key))
    leaves, treedef = jax.tree.flatten(avals)
    return _abstract_init_size(_applied_model(model), treedef,
                               tuple((a.shape, a.dtype) for a in leaves))


@functools.lru_cache(maxsize=64)
def _abstract_init_size(model, treedef, leaves) -> tuple[int, bool]:
    x, key = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), key, x)
    params = shapes.get("params", shapes) if hasattr(shapes, "get") else shapes
    leaves = jax.tree.leaves(params)
    return sum(math.prod(a.shape) for a in leaves), any(a.ndim >= 4 for a in leaves)


def plan_ensemble(model, x, *, key, num_inits, train, init_chunk="auto", mesh="auto",
                  compiler_options="auto", num_probes=32, method="hutchinson",
                  dist="rademacher", probe_chunk=None, block_chunk=None,
                  end_to_end=True) -> EnsemblePlan:
    """Checks the arguments and prepares (without running) ``ensemble_block_moments``."""
    key = check_key(key)
    probe_kw = check_group_options(num_probes=num_probes, method=method, dist=dist,
                                   probe_chunk=probe_chunk, block_chunk=block_chunk,
                                   end_to_end=end_to_end)
    if not isinstance(train, bool):
        raise TypeError(f"`train` must be a bool; got {train!r}.")
    check_block_model(model, init=True)
    check_input_tree(x, "x")
    num_inits = check_positive_int(num_inits, "num_inits")
    if mesh == "auto":
        mesh = inits_mesh() if jax.device_count() > 1 else None
    if init_chunk == "auto":
        platform = (jax.devices() if mesh is None else mesh.devices.flat)[0].platform
        size = _init_size(model, x, key) if platform == "cpu" else (None, False)
        init_chunk = default_init_chunk(platform, *size)
    if init_chunk is not None:
        check_positive_int(init_chunk, "init_chunk")
    if mesh is not None and "inits" not in mesh.axis_names:
        raise ValueError(f"`mesh` must have an axis named 'inits'; got {mesh.axis_names}.")
    devices = 1 if mesh is None else mesh.shape["inits"]
    per_device = math.ceil(num_inits / devices)
    chunk = min(init_chunk or per_device, per_device) * devices
    keys = jax.random.split(key, num_inits)
    padded = math.ceil(num_inits / chunk) * chunk
    if padded != num_inits:  # a last partial chunk is filled with repeats, later dropped
        keys = keys[np.arange(padded) % num_inits]
    init_keys, probe_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    sharding = None if mesh is None else NamedSharding(mesh, P("inits"))
    place = (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
    split = lambda ks: tuple(place(ks[i: i + chunk]) for i in range(0, padded, chunk))
    if compiler_options == "auto":
        platform = (jax.devices() if mesh is None else mesh.devices.flat)[0].platform
        compiler_options = probe_compiler_options(platform)
    elif compiler_options is not None and not isinstance(compiler_options, dict):
        raise TypeError("`compiler_options` must be 'auto', None or a dict of XLA options; "
                        f"got {compiler_options!r}.")
    opts = None if compiler_options is None else tuple(sorted(compiler_options.items()))
    fns_kw = (train, tuple(sorted(probe_kw.items())), mesh, opts)
    init = _ensemble_fns(model, *fns_kw)[0]
    measure = _ensemble_fns(_applied_model(model), *fns_kw)[1]
    return EnsemblePlan(init, measure, x, split(init_keys), split(probe_keys), num_inits,
                        sharding)


def run_plan(plan: EnsemblePlan, compiled=None) -> BlockMoments:
    """Runs a plan, with its ahead-of-time ``compiled`` ``(init, measure)`` if given."""
    init, measure = compiled or (plan.init, plan.measure)
    if compiled is None and not is_concrete((plan.x, plan.init_keys)):
        # under an outer jit: the programs are inlined, and a nested jit may not carry
        # compiler options
        init, measure = plan.init.__wrapped__, plan.measure.__wrapped__
    chunks = [measure(init(plan.x, ki), plan.x, kp)
              for ki, kp in zip(plan.init_keys, plan.probe_keys, strict=True)]
    result = chunks[0] if len(chunks) == 1 else jax.tree.map(
        lambda *a: jnp.concatenate(a), *chunks)
    result = jax.tree.map(lambda a: a[: plan.num_inits], result)
    if is_concrete(result.blocks.finite):  # under an outer jit, `finite` says it instead
        raise_if_non_finite(result.names, jnp.all(result.blocks.finite, axis=0), x=plan.x)
    return result


def _over_inits(f):
    """``f`` mapped over the first (init) axis of its batched arguments.

    One init per call is applied directly rather than vmapped over an axis of 1: vmapped
    conv kernels become grouped convolutions, which XLA:CPU compiles several times slower.
    """

    def mapped(*args):
        if jax.tree.leaves(args[-1])[0].shape[0] == 1:
            out = f(*jax.tree.map(lambda a: a[0], args))
            return jax.tree.map(lambda a: a[None], out)
        return jax.vmap(f)(*args)

    return mapped


@functools.lru_cache(maxsize=64)
def _ensemble_fns(model, train, probe_kw, mesh, compiler_options):
    """The jitted ``(init, measure)`` for one (model, options, mesh), cached across calls."""
    probe_kw = dict(probe_kw)

    def batched_init(x, keys):
        return _over_inits(lambda k: model.init(k, x, train=False))(keys)

    def batched_measure(variables, x, keys):
        return _over_inits(lambda v, k: block_moments(model, v, x, key=k, train=train,
                                                      **probe_kw))(variables, keys)

    opts = None if compiler_options is None else dict(compiler_options)
    if mesh is None:
        return (jax.jit(batched_init, compiler_options=opts),
                jax.jit(batched_measure, compiler_options=opts))
    # check_vma=False: the inits are independent and there is no collective. With
    # varying-axis checks on, transposing the linearization w.r.t. the replicated input x
    # inserts a psum over devices (the transpose of pvary), which would sum the per-init
    # VJPs of different devices.
    shard = functools.partial(jax.shard_map, mesh=mesh, out_specs=P("inits"), check_vma=False)
    return (jax.jit(shard(batched_init, in_specs=(P(), P("inits"))), compiler_options=opts),
            jax.jit(shard(batched_measure, in_specs=(P("inits"), P(), P("inits"))),
                    compiler_options=opts))


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
    """Moments pooled over K initializations (derivations §1.1: the expectation sits inside φ).

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
