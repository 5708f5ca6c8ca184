"""Calibration to Block Dynamical Isometry: one scalar per block so that its φ = target.

For a network f = f_L ∘ … ∘ f_1 exposed as blocks (derivations §2), ``calibrate`` finds
for every block j a scalar g_j on a knob of its parameters (``knobs.py``: the kernel
scale by default, the residual-branch scale for residual blocks whose shortcut has no
kernel) such that the block's measured

    φ_j(g_j) = Tr(J_j J_jᵀ)/m_j = target        (J_j at the block's input h_{j−1}),

block by block from the input side: block j is solved at the activation produced by the
already calibrated blocks 1..j−1, on the user's batch (batch-coupled layers in train
mode see the whole batch as one input). φ_j is estimated with Hutchinson probes, each
one VJP + one JVP (``gne_jax.jacobian_moments``); by the serial theorem (derivations §3)
the calibrated network then has end-to-end φ = Π φ_j ≈ target^L.

Solver, per block (in log–log coordinates, u = ln g, y = ln φ):

* start at g⁽⁰⁾ (1, a given array, or the theory start g⁽⁰⁾ = (target/φ_theory)^{1/2});
* Newton/secant steps u ← u + (ln target − y)/s with slope s = 2 on the first step
  (exact for a homogeneous block with one weight layer: φ ∝ g²) and the secant slope of
  the last two scales after that (clipped to [0.5, 4]; steps clipped to a factor 4); a
  measurement within 2 SE of the target is pooled with the next one at the same scale;
* stop when |φ̂ − target| + 2·SE(φ̂) ≤ tol·target, or after ``max_iter`` measurements.

For a ReLU or linear block the second measurement is accepted (one exact step); tanh
needs a few secant steps. Everything runs in one jitted program per model structure:
the blocks of a scanned group are solved inside ``lax.scan`` (carry: the activation),
with a ``lax.while_loop`` per block, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gne_jax._tree import is_concrete
from gne_jax._validate import check_choice, check_finite_tree, check_key, check_positive_int
from gne_jax.calibration.knobs import count_selected, make_knob
from gne_jax.calibration.report import CalibrationReport
from gne_jax.probes.blocks import BlockGroup, single_block
from gne_jax.probes.moments import jacobian_moments
from gne_jax.probes.stochtrace import DISTRIBUTIONS

PyTree = Any

SLOPE_MIN, SLOPE_MAX = 0.5, 4.0  # clip of the secant slope d ln φ / d ln g
MAX_STEP = math.log(4.0)  # at most a factor 4 on g per iteration
Z_ACCEPT = 2.0  # accept when |φ̂ − target| + Z·SE ≤ tol·target


class Options(NamedTuple):
    """Static options of one calibration program (hashable: part of the jit cache key)."""

    knob: Any
    num_probes: int
    max_iter: int
    dist: str
    tol: float
    slope0: float
    verify: bool
    block_chunk: int | None
    method: str = "auto"


class BlockStats(NamedTuple):
    """Per-block arrays of a calibration (leading axis: block)."""

    phi_before: jax.Array
    phi_before_sem: jax.Array
    varphi_before: jax.Array
    varphi_before_sem: jax.Array
    phi_after: jax.Array
    phi_after_sem: jax.Array
    varphi_after: jax.Array
    varphi_after_sem: jax.Array
    scale: jax.Array
    start_scale: jax.Array
    iterations: jax.Array
    converged: jax.Array
    last_slope: jax.Array
    cost: jax.Array


def _moments(fn, h, key, opts):
    m = jacobian_moments(fn, h, key=key, num_probes=opts.num_probes, dist=opts.dist,
                         method=opts.method)
    return m.phi, m.phi_sem, m.varphi, m.varphi_sem


def _accept(phi, sem, target, tol):
    return jnp.isfinite(phi) & (jnp.abs(phi - target) + Z_ACCEPT * sem <= tol * target)


def _pool(a, na, b, nb):
    """Pools two estimates (φ, SE, ϕ, SE) from na and nb probes at the same g."""
    w = na / (na + nb)
    mean = lambda u, v: w * u + (1 - w) * v  # noqa: E731
    se = lambda u, v: jnp.sqrt((w * u) ** 2 + ((1 - w) * v) ** 2)  # noqa: E731
    return (mean(a[0], b[0]), se(a[1], b[1]), mean(a[2], b[2]), se(a[3], b[3]))


def _solve_block(apply, knob, p, h, key, g0, active, target, opts):
    """(g, (φ, SE, ϕ, SE) at g, iterations, converged, slope) for one block at input h.

    A step is taken only when φ̂ differs from the target by more than 2 SE; otherwise the
    next measurement is taken at the same g and pooled with the previous ones (the
    estimate is noise-limited, not off target). The secant slope is updated only when
    the change in ln φ between two scales exceeds 4 relative SEs.
    """

    def measure(g, it):
        return _moments(lambda z: apply(knob(p, g), z), h, jax.random.fold_in(key, it), opts)

    k = float(opts.num_probes)
    m0 = measure(jnp.asarray(g0, jnp.float32), 0)
    dtype = m0[0].dtype  # the moments' dtype (float64 with float64 parameters under x64)
    logt = jnp.log(target).astype(dtype)
    g0 = jnp.asarray(g0, dtype)
    nan = jnp.asarray(jnp.nan, dtype)
    slope0 = jnp.asarray(opts.slope0, dtype)
    # state: it, g, probes pooled at g, (ln g, ln φ, rel SE) of the previous scale, m, done, slope
    state0 = (jnp.asarray(1), g0, jnp.asarray(k), (nan, nan, nan), m0,
              _accept(m0[0], m0[1], target, opts.tol) | ~active, slope0)

    def cond(s):
        it, _, _, _, m, done, _ = s
        ok = jnp.isfinite(m[0]) & (m[0] > 0)
        return (~done) & ok & (it < opts.max_iter)

    def body(s):
        it, g, n, prev, m, _, slope = s
        lg, ly, rel = jnp.log(g), jnp.log(m[0]), m[1] / m[0]
        move = jnp.abs(m[0] - target) > Z_ACCEPT * m[1]
        step = jnp.clip((logt - ly) / slope, -MAX_STEP, MAX_STEP)
        g_new = jnp.where(move, jnp.exp(lg + step), g)
        m_new = measure(g_new, it)
        pooled = _pool(m, n, m_new, k)
        m_next = jax.tree.map(lambda a, b: jnp.where(move, b, a), pooled, m_new)
        n_next = jnp.where(move, k, n + k)
        # secant slope between the previous scale and the new one, when it is resolved
        lg_prev, ly_prev, rel_prev = prev
        ly_new, rel_new = jnp.log(m_next[0]), m_next[1] / m_next[0]
        dly, dlg = ly_new - ly, jnp.log(g_new) - lg
        resolved = move & (jnp.abs(dly) > 4 * jnp.sqrt(rel**2 + rel_new**2)) & (
            jnp.abs(dlg) > 1e-3)
        secant = jnp.clip(dly / jnp.where(dlg == 0, 1.0, dlg), SLOPE_MIN, SLOPE_MAX)
        slope_next = jnp.where(resolved & jnp.isfinite(secant), secant, slope)
        prev_next = jax.tree.map(lambda a, b: jnp.where(move, b, a), prev, (lg, ly, rel))
        del lg_prev, ly_prev, rel_prev
        done = _accept(m_next[0], m_next[1], target, opts.tol)
        return (it + 1, g_new, n_next, prev_next, m_next, done, slope_next)

    it, g, _, _, m, done, slope = jax.lax.while_loop(cond, body, state0)
    return g, m, it, _accept(m[0], m[1], target, opts.tol) | ~active, slope


def _measure_blocks(fn_of_params, params, inputs, keys, opts):
    """(φ, SE, ϕ, SE) of h ↦ fn(p_i, h) at inputs[i] for every block i of a group."""

    def one(args):
        p, h, k = args
        return _moments(lambda z: fn_of_params(p, z), h, k, opts)

    xs = (params, inputs, keys)
    n = inputs.shape[0]
    if opts.block_chunk is None or opts.block_chunk >= n:
        return jax.vmap(one)(xs)
    return jax.lax.map(one, xs, batch_size=opts.block_chunk)


def _solve_group(group: BlockGroup, h, key, g0, active, target, opts):
    """Calibrates the blocks of one group in order from input ``h``.

    Returns (new stacked params, output activation, stacked inputs of the calibrated
    blocks, per-block solver results).
    """
    knob = make_knob(opts.knob)[0]
    keys = jax.random.split(key, group.size)

    def solve(p, h, k, g0_i, a_i):
        g, m, it, done, slope = _solve_block(group.apply, knob, p, h, k, g0_i, a_i, target,
                                             opts)
        p_new = knob(p, g)
        return p_new, group.apply(p_new, h), (g, m, it, done, slope)

    if group.size == 1:  # may change the shape of h: no scan
        p0 = jax.tree.map(lambda a: a[0], group.params)
        p_new, out, res = solve(p0, h, keys[0], g0[0], active[0])
        stack = lambda t: jax.tree.map(lambda a: jnp.asarray(a)[None], t)  # noqa: E731
        return stack(p_new), out, jnp.asarray(h)[None], stack(res)

    def step(carry, xs):
        p, k, g0_i, a_i = xs
        p_new, out, res = solve(p, carry, k, g0_i, a_i)
        return out, (p_new, carry, res)

    out, (params, inputs, res) = jax.lax.scan(step, h, (group.params, keys, g0, active))
    return params, out, inputs, res


def _group_method(group: BlockGroup, opts: Options) -> tuple[Options, float]:
    """The group's estimator and its cost per φ measurement in VJP+JVP pairs.

    ``"auto"`` materializes the Jacobian (``method="exact"``: min(m, n) VJPs or JVPs, no
    probe noise) when that is no more products than Hutchinson's 2·num_probes and the
    Jacobian has at most 2²² entries (a small head, a narrow block); Hutchinson otherwise.
    """
    p0 = jax.tree.map(lambda a: a[0], group.params)
    n = math.prod(group.inputs.shape[1:])
    m = math.prod(jax.eval_shape(group.apply, p0, group.inputs[0]).shape)
    method = opts.method
    if method == "auto":
        small = min(m, n) <= 2 * opts.num_probes and m * n <= 2**22
        method = "exact" if small else "hutchinson"
    cost = min(m, n) / 2 if method == "exact" else float(opts.num_probes)
    return opts._replace(method=method), cost


def calibrate_groups(
    groups: Sequence[BlockGroup],
    x: PyTree,
    *,
    key: jax.Array,
    target,
    start: jax.Array,
    opts: Options,
    active: jax.Array | None = None,
) -> tuple[list[PyTree], BlockStats]:
    """The calibration of a chain of ``BlockGroup``\\ s (pure; jit it, or use ``calibrate``).

    Returns the groups' new stacked parameters (one pytree per group, same structure as
    ``group.params``) and the per-block ``BlockStats``. ``start`` is g⁽⁰⁾ per block;
    blocks with ``active`` False keep g⁽⁰⁾ (measured, not solved).
    """
    if active is None:
        active = jnp.ones(start.shape, bool)
    k_before, k_solve, k_after = jax.random.split(key, 3)
    new_params, before, after_inputs, solved, costs = [], [], [], [], []
    h, offset = x, 0
    group_opts = []
    for gi, g in enumerate(groups):  # a handful of heterogeneous groups; runs are scanned
        opts_g, cost = _group_method(g, opts)
        group_opts.append(opts_g)
        costs.append(jnp.full((g.size,), cost, jnp.float32))
        g0 = start[offset:offset + g.size]
        a = active[offset:offset + g.size]
        keys = jax.random.split(jax.random.fold_in(k_before, gi), g.size)
        before.append(_measure_blocks(g.apply, g.params, g.inputs, keys, opts_g))
        p, h, inputs, res = _solve_group(g, h, jax.random.fold_in(k_solve, gi), g0, a, target,
                                         opts_g)
        new_params.append(p)
        after_inputs.append(inputs)
        solved.append(res)
        offset += g.size
    cat = lambda *xs: jnp.concatenate([jnp.atleast_1d(a) for a in xs])  # noqa: E731
    before = jax.tree.map(cat, *before)
    g, m, it, done, slope = jax.tree.map(cat, *solved)
    if opts.verify:  # an independent measurement (fresh probes) of the calibrated blocks
        after = []
        for gi, (grp, p, inputs, o) in enumerate(zip(groups, new_params, after_inputs,
                                                     group_opts, strict=True)):
            keys = jax.random.split(jax.random.fold_in(k_after, gi), grp.size)
            after.append(_measure_blocks(grp.apply, p, inputs, keys, o))
        m = jax.tree.map(cat, *after)
    stats = BlockStats(*before, *m, g, start, it, done, slope, jnp.concatenate(costs))
    return new_params, stats


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def _check_target(target) -> float:
    try:
        t = float(target)
    except (TypeError, ValueError):
        raise TypeError(f"`target` must be a number > 0; got {target!r}.") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"`target` must be a finite number > 0 (the φ each block is set to); "
                         f"got {target!r}.")
    return t


def _check_tol(tol) -> float:
    t = float(tol)
    if not math.isfinite(t) or not 0 < t < 1:
        raise ValueError(f"`tol` must be in (0, 1) (relative to the target); got {tol!r}.")
    return t


def _chain_spec(model, variables):
    """(names, fns, params list) for a chain of ``(name, fn(params, h))`` or plain fns."""
    if isinstance(model, BlockGroup) or (
            isinstance(model, Sequence) and model and isinstance(model[0], BlockGroup)):
        raise TypeError("`model` is a list of BlockGroups: use "
                        "gne_jax.calibration.calibrate_groups for those.")
    items = list(model)
    if not items:
        raise ValueError("`model` has no blocks: pass a model with a `blocks(variables, x, "
                         "train=...)` method or a non-empty list of block functions.")
    names, fns = [], []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, fn = item
        else:
            name, fn = f"block{i}", item
        if not callable(fn):
            raise TypeError(f"block {i} of `model` is not callable (a block is a function "
                            f"fn(params, h) or a (name, fn) pair); got {type(fn).__name__}.")
        names.append(name)
        fns.append(fn)
    if not isinstance(variables, Sequence) or len(variables) != len(fns):
        raise ValueError(f"for a chain of {len(fns)} block functions, `variables` must be a "
                         f"list with one params pytree per block; got {type(variables).__name__}"
                         + (f" of length {len(variables)}" if isinstance(variables, Sequence)
                            else "") + ".")
    return tuple(names), tuple(fns), list(variables)


def _is_block_model(model) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "layout")


def _model_groups(model, variables, x, train):
    from gne_jax.probes.block_moments import model_blocks

    return model_blocks(model, variables, x, train=train)


def _write_back(model, variables, new_params):
    """The model's variables with each stage's sub-tree replaced by its calibrated params."""
    out = {col: dict(tree) for col, tree in variables.items()}
    for st, p in zip(model.layout(), new_params, strict=True):
        if st.xs is not None:
            p = p["variables"]
        if not st.scanned:
            p = jax.tree.map(lambda a: a[0], p)
        for col, tree in p.items():
            out[col][st.name] = tree
    return out


def _program_model(model, variables, x, key, target, start, active, train, opts):
    groups = _model_groups(model, variables, x, train)
    new_params, stats = calibrate_groups(groups, x, key=key, target=target, start=start,
                                         opts=opts, active=active)
    return _write_back(model, variables, new_params), stats


def _program_chain(fns, params, x, key, target, start, active, opts):
    groups, h = [], x
    for i, (fn, p) in enumerate(zip(fns, params, strict=True)):
        groups.append(single_block(str(i), fn, p, h))
        h = fn(p, h)
    new_params, stats = calibrate_groups(groups, x, key=key, target=target, start=start,
                                         opts=opts, active=active)
    return [jax.tree.map(lambda a: a[0], p) for p in new_params], stats


@functools.cache
def _jitted(kind: str):
    from gne_jax.probes.block_moments import probe_compiler_options

    copts = probe_compiler_options()
    if kind == "model":
        return jax.jit(_program_model, static_argnums=(0, 7, 8), compiler_options=copts)
    return jax.jit(_program_chain, static_argnums=(0, 7), compiler_options=copts)


def _structure(model, variables, x, train):
    """[(block names, stacked params shapes)] per group, traced abstractly (no compute)."""
    out = []

    def f(v, x):
        groups = _model_groups(model, v, x, train)
        out.extend((g.names, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                          g.params)) for g in groups)
        return 0

    jax.eval_shape(f, variables, x)
    return out


def _theory_start(config, x, target, train, names):
    from gne_jax.theory import predict_model

    q_in = float(jnp.mean(jnp.square(x)))
    pred = predict_model(config, tuple(jnp.shape(x)), train=train, q_in=q_in)
    if tuple(pred.names) != tuple(names):
        raise ValueError(f"the theory's blocks {pred.names} do not match the model's {names}; "
                         f"is `config` the model's config?")
    phi = np.asarray(pred.phi, dtype=np.float64)
    g0 = np.where(np.isfinite(phi) & (phi > 0), np.sqrt(target / np.maximum(phi, 1e-30)), 1.0)
    return g0.astype(np.float32), phi


def calibrate(
    model,
    variables: PyTree,
    x: PyTree,
    *,
    key: jax.Array,
    target: float = 1.0,
    tol: float = 0.05,
    knob="kernel",
    num_probes: int = 32,
    max_iter: int = 8,
    start="ones",
    config=None,
    train: bool = True,
    dist: str = "rademacher",
    verify: bool = True,
    block_chunk: int | None = None,
    exclude=(),
    method: str = "auto",
) -> tuple[PyTree, CalibrationReport]:
    """Rescales every block so that its Jacobian's φ equals ``target`` (an initialization).

    For each block j (from the input side, at the activation of the calibrated blocks
    before it, on the batch ``x``) a scalar g_j on the ``knob`` is solved so that the
    Hutchinson estimate of φ_j = Tr(J_jJ_jᵀ)/m_j meets
    |φ̂_j − target| + 2·SE(φ̂_j) ≤ tol·target (module docstring: the solver).

    Args:
      model: one of the library's models (anything with ``blocks(variables, x, *, train)``
        and ``layout()``, see ``gne_jax.models``), or a chain of blocks: a list of
        functions ``fn(params, h)`` or of ``(name, fn)`` pairs, applied in order.
      variables: the model's Flax variables, or for a chain a list of per-block params.
      x: the batch (for batch-coupled layers the whole batch is one input).
      key: PRNG key for the probes.
      target: the φ every block is set to, > 0 (1: Block Dynamical Isometry's φ = 1).
      tol: relative tolerance on φ (default 0.05: |φ − target| ≤ 5% of the target, with
        the estimate's 2·SE inside that band).
      knob: ``"kernel"`` (default; for residual blocks with a parameter-free shortcut the
        branch scale), ``"scale"`` (normalization γ), ``"all"`` or a callable
        ``(params, g) -> params`` (see ``gne_jax.calibration.knobs``).
      num_probes: probes per φ measurement (each one VJP + one JVP).
      max_iter: measurements per block at most (the solve); blocks that do not meet the
        tolerance within it are flagged in ``report.converged`` (and warned about).
      start: ``"ones"`` (start from the given weights), ``"theory"`` (data-free start
        g⁽⁰⁾ = √(target/φ_theory) from ``gne_jax.theory.predict_model``; needs ``config``),
        or an array with one g⁽⁰⁾ per block.
      config: the model's config, for ``start="theory"``.
      train: measure batch-coupled layers with batch statistics (default True).
      dist: probe distribution (``"rademacher"`` or ``"normal"``).
      verify: measure the calibrated blocks again with fresh probes for the report's
        "after" (otherwise the solver's accepted measurement is reported).
      block_chunk: measure this many blocks of a group at a time in the before/after
        passes (bounds memory); ``None`` vmaps over the group.
      exclude: names of blocks left as they are (measured, not rescaled), e.g. ``("head",)``.
      method: φ estimator per block: ``"auto"`` (exact Jacobian when it costs no more
        products than Hutchinson, e.g. a small head; Hutchinson otherwise),
        ``"hutchinson"`` or ``"exact"``.

    Returns:
      ``(variables, report)``: the calibrated variables (same structure; a list for a
      chain) and a ``CalibrationReport`` (φ, ϕ before/after with SEs, scales, iterations,
      matvecs per block). Cost per block: (1 + iterations + verify)·num_probes VJP+JVP
      products of that block; one compiled program per model structure and options.
    """
    key = check_key(key)
    target = _check_target(target)
    tol = _check_tol(tol)
    check_finite_tree(x, "x")
    check_finite_tree(variables, "variables")
    check_positive_int(num_probes, "num_probes", minimum=2)
    check_positive_int(max_iter, "max_iter", minimum=1)
    check_choice(dist, "dist", DISTRIBUTIONS)
    if block_chunk is not None:
        check_positive_int(block_chunk, "block_chunk")
    knob_fn, knob_name, select = make_knob(knob)
    check_choice(method, "method", ("auto", "hutchinson", "exact"))
    opts = Options(knob, num_probes, max_iter, dist, tol, 2.0, bool(verify), block_chunk,
                   method)

    if isinstance(model, Mapping):
        raise TypeError("`model` is a dict (a model config?): pass the model itself, "
                        "gne_jax.create_model(config), and the config as `config=`.")
    if _is_block_model(model):
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError(f"`variables` must be the model's Flax variables (a dict with "
                            f"'params', from model.init); got {type(variables).__name__}.")
        shapes = _structure(model, variables, x, bool(train))
        names = tuple(n for ns, _ in shapes for n in ns)
        block_params = [(ns, p) for ns, p in shapes]
    elif hasattr(model, "blocks"):
        raise TypeError(f"`model` ({type(model).__name__}) exposes blocks but not the layout "
                        f"needed to write calibrated parameters back; pass its blocks as a "
                        f"chain of functions fn(params, h) with a list of params.")
    elif callable(model) or hasattr(model, "apply") and not isinstance(model, Sequence):
        raise TypeError(
            f"`model` ({type(model).__name__}) does not expose blocks: calibration needs "
            f"a model with `blocks(variables, x, *, train)` (gne_jax.models) or a list of "
            f"block functions fn(params, h).")
    else:
        names, fns, params = _chain_spec(model, variables)
        block_params = [((n,), p) for n, p in zip(names, params, strict=True)]
    if not names:
        raise ValueError("`model` has no blocks to calibrate.")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"`exclude` names unknown block(s) {unknown}; blocks: {list(names)}.")
    if select is not None:
        empty = [ns[0] for ns, p in block_params
                 if any(nm not in exclude for nm in ns) and count_selected(p, select) == 0]
        if empty:
            raise ValueError(f"knob={knob_name!r} finds no parameters in block(s) {empty}; "
                             f"choose another knob ('kernel', 'scale', 'all' or a callable) "
                             f"or leave those blocks out with `exclude`.")

    n = len(names)
    theory_phi = None
    if isinstance(start, str):
        check_choice(start, "start", ("ones", "theory"))
        if start == "theory":
            if config is None:
                raise ValueError("start='theory' needs the model's `config` (the one passed "
                                 "to gne_jax.create_model).")
            g0, theory_phi = _theory_start(config, x, target, bool(train), names)
        else:
            g0 = np.ones(n, np.float32)
    else:
        g0 = np.asarray(start, np.float32)
        if g0.shape != (n,) or not np.all(np.isfinite(g0)) or np.any(g0 <= 0):
            raise ValueError(f"`start` must be 'ones', 'theory' or {n} finite positive scales "
                             f"(one per block); got shape {g0.shape}.")
    active = np.array([nm not in exclude for nm in names])
    g0 = jnp.asarray(np.where(active, g0, 1.0).astype(np.float32))
    active = jnp.asarray(active)
    t = jnp.asarray(target, jnp.float32)

    if _is_block_model(model):
        out, stats = _jitted("model")(model, variables, x, key, t, g0, active, bool(train), opts)
    else:
        out, stats = _jitted("chain")(fns, params, x, key, t, g0, active, opts)

    report = CalibrationReport.from_stats(
        names, stats, knob=knob_name, target=target, tol=tol, num_probes=num_probes,
        verify=bool(verify), theory_phi=theory_phi)
    if is_concrete(stats.converged) and not report.converged.all():
        bad = [nm for nm, ok in zip(names, report.converged, strict=True) if not ok]
        warnings.warn(f"calibrate: {len(bad)} block(s) did not reach φ = {target:g} within "
                      f"tol={tol:g} in max_iter={max_iter} measurements: {bad[:8]}"
                      f"{' ...' if len(bad) > 8 else ''} (see report.converged). If a "
                      f"normalization layer follows the weights, the kernel scale has no effect "
                      f"on φ: use knob='scale'.",
                      RuntimeWarning, stacklevel=2)
    return out, report


def knob_of(knob) -> Callable[[PyTree, Any], PyTree]:
    """The function ``(params, g) -> params`` of a knob name or callable."""
    return make_knob(knob)[0]
