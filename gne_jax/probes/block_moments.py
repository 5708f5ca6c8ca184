"""Per-block Jacobian moments: which block breaks gradient norm equality.

For a network f = f_L ∘ … ∘ f_1 exposed as ``BlockGroup``\\ s (``gne_jax.probes.blocks``),
``block_moments`` estimates, for every block j, φ(J_jJ_jᵀ), φ₂ and ϕ of the block's
Jacobian at the activation that enters it (derivations §2, Block Dynamical Isometry),
for residual blocks h ↦ s(h) + b(h) also those of the branch b, and the moments of
the whole network. By the serial theorem (§3) the end-to-end φ is the product of
the blocks' φ; for an identity shortcut φ = 1 + φ(branch) (§4.3).

The blocks of one group share a function and differ only in their stacked
parameters, so their probes are vmapped (or mapped in chunks) over the group: the
compile time does not grow with the number of blocks in a run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gne_jax._tree import is_concrete
from gne_jax._validate import check_input_tree, check_key, check_positive_int
from gne_jax.probes import compiled
from gne_jax.probes.blocks import BlockGroup, compose_blocks, single_block
from gne_jax.probes.compiled import probe_compiler_options
from gne_jax.probes.moments import JacobianMoments, check_moment_options, jacobian_moments

PyTree = Any


@struct.dataclass
class BlockMoments:
    """Moments of every block (leading axis: block), of residual branches, and end to end.

    Attributes:
      names: block names, in order (static).
      branch_of: for each entry of ``branch``, the index of its block in ``names`` (static).
      blocks: ``JacobianMoments`` whose fields have a leading axis of length len(names).
      branch: ``JacobianMoments`` of the residual branches (leading axis len(branch_of)),
        or ``None`` when no block is residual.
      end_to_end: ``JacobianMoments`` of the whole composition, or ``None`` if not asked.
    """

    names: tuple[str, ...] = struct.field(pytree_node=False)
    branch_of: tuple[int, ...] = struct.field(pytree_node=False)
    blocks: JacobianMoments
    branch: JacobianMoments | None
    end_to_end: JacobianMoments | None


_STATIC = ("num_matvecs", "size", "out_size", "in_size")


def _concat(results: Sequence[JacobianMoments]) -> JacobianMoments:
    """Concatenates per-group results along the block axis.

    The static sizes stay Python ints when every block shares them, and become tuples
    with one entry per block otherwise.
    """
    if len(results) == 1:
        return results[0]
    counts = [int(jnp.shape(jnp.atleast_1d(r.phi))[0]) for r in results]
    statics = {}
    for f in _STATIC:
        per_block = []
        for r, n in zip(results, counts, strict=True):
            v = getattr(r, f)
            per_block.extend(v if isinstance(v, tuple) else (v,) * n)
        statics[f] = per_block[0] if len(set(per_block)) == 1 else tuple(per_block)
    arrays = {f: jnp.concatenate([jnp.atleast_1d(getattr(r, f)) for r in results])
              for f in ("phi", "phi2", "varphi", "phi_sem", "phi2_sem", "varphi_sem",
                        "phi_samples", "phi2_samples", "finite")}
    return JacobianMoments(**arrays, **statics)


def _group_moments(fn_of_params, params, inputs, keys, block_chunk, probe_kw):
    """Moments of h ↦ fn(p_i, h) at inputs[i] for every block i of a group."""

    def one(args):
        p, h, k = args
        return jacobian_moments(lambda z: fn_of_params(p, z), h, key=k, **probe_kw)

    xs = (params, inputs, keys)
    if block_chunk is None or block_chunk >= inputs.shape[0]:
        return jax.vmap(one)(xs)
    return jax.lax.map(one, xs, batch_size=block_chunk)


def groups_moments(
    groups: Sequence[BlockGroup],
    x: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 32,
    method: str = "hutchinson",
    dist: str = "rademacher",
    probe_chunk: int | None = None,
    block_chunk: int | None = None,
    end_to_end: bool = True,
) -> BlockMoments:
    """``BlockMoments`` of a chain of ``BlockGroup``\\ s applied to ``x``.

    For block j with map f_j at the activation h_j entering it: φ_j = Tr(J_jJ_jᵀ)/m_j,
    φ₂ = Tr((J_jJ_jᵀ)²)/m_j, ϕ_j = φ₂ − φ_j² (``jacobian_moments``), the blocks of a group
    vmapped over their stacked parameters.

    Called eagerly, the groups' functions are traced (``gne_jax.probes.compiled``) and
    the measurement runs as one program compiled once per structure: new parameters
    of the same architecture compile nothing new.

    Args:
      groups: the blocks, in order (``model.blocks(...)`` or hand-built, e.g. with
        ``chain_blocks``).
      x: the network input (the whole batch for batch-coupled blocks).
      key: PRNG key; every block gets its own key folded from it.
      num_probes, method, dist, probe_chunk: as in ``jacobian_moments``.
      block_chunk: probe this many blocks of a group at a time (``lax.map``) to bound
        memory; ``None`` vmaps over the whole group.
      end_to_end: also measure the whole network.
    """
    key = check_key(key)
    options = check_group_options(num_probes=num_probes, method=method, dist=dist,
                                  probe_chunk=probe_chunk, block_chunk=block_chunk,
                                  end_to_end=end_to_end)
    groups = list(groups)
    if not groups:
        raise ValueError("`groups` is empty: there is no block to probe.")
    for gi, g in enumerate(groups):
        if not isinstance(g, BlockGroup):
            raise TypeError(f"`groups[{gi}]` must be a BlockGroup; got {type(g).__name__}.")
    check_input_tree(x, "x")
    if not is_concrete((x, key, [(g.params, g.inputs) for g in groups])):
        return _groups_moments(groups, x, key, **options)
    fns, layout = [], []
    for gi, g in enumerate(groups):
        p0 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], a.dtype), g.params)
        h0 = jax.ShapeDtypeStruct(g.inputs.shape[1:], g.inputs.dtype)
        parts = [f for f in (g.apply, g.branch, g.shortcut) if f is not None]
        fns.extend((f, (p0, h0), f"groups[{gi}].{n}") for f, n in zip(
            parts, ("apply", "branch", "shortcut"), strict=False))
        layout.append((tuple(g.names), g.branch is not None, g.shortcut is not None))
    args = (tuple(g.params for g in groups), tuple(g.inputs for g in groups), x, key)
    result = compiled.call(_groups_program, dict(layout=tuple(layout), **options), fns, args)
    raise_if_non_finite(result.names, result.blocks.finite, x=x)
    return result


def check_group_options(*, num_probes, method, dist, probe_chunk, block_chunk, end_to_end):
    """Validated per-block probe options as a dict (before any tracing)."""
    check_moment_options(num_probes=num_probes, method=method, dist=dist,
                         probe_chunk=probe_chunk)
    if block_chunk is not None:
        check_positive_int(block_chunk, "block_chunk")
    if not isinstance(end_to_end, bool):
        raise TypeError(f"`end_to_end` must be a bool; got {end_to_end!r}.")
    return dict(num_probes=num_probes, method=method, dist=dist, probe_chunk=probe_chunk,
                block_chunk=block_chunk, end_to_end=end_to_end)


def _groups_program(*args, layout, **options):
    """Rebuilds the groups from their traced functions and measures them."""
    nfns = sum(1 + b + s for _, b, s in layout)
    fns, (params, inputs, x, key) = list(args[:nfns]), args[nfns:]
    groups = []
    for (names, has_branch, has_shortcut), p, h in zip(layout, params, inputs, strict=True):
        apply = fns.pop(0)
        branch = fns.pop(0) if has_branch else None
        shortcut = fns.pop(0) if has_shortcut else None
        groups.append(BlockGroup(names, apply, p, h, branch, shortcut))
    return _groups_moments(groups, x, key, **options)


def _groups_moments(groups, x, key, *, num_probes, method, dist, probe_chunk, block_chunk,
                    end_to_end):
    probe_kw = dict(num_probes=num_probes, method=method, dist=dist, probe_chunk=probe_chunk)
    k_blocks, k_branch, k_e2e = jax.random.split(key, 3)
    names: list[str] = []
    branch_of: list[int] = []
    block_res, branch_res = [], []
    for gi, g in enumerate(groups):
        keys = jax.random.split(jax.random.fold_in(k_blocks, gi), g.size)
        block_res.append(_group_moments(g.apply, g.params, g.inputs, keys, block_chunk, probe_kw))
        if g.branch is not None:
            bkeys = jax.random.split(jax.random.fold_in(k_branch, gi), g.size)
            branch_res.append(
                _group_moments(g.branch, g.params, g.inputs, bkeys, block_chunk, probe_kw))
            branch_of.extend(range(len(names), len(names) + g.size))
        names.extend(g.names)
    e2e = None
    if end_to_end:
        e2e = jacobian_moments(lambda z: compose_blocks(groups, z), x, key=k_e2e, **probe_kw)
    return BlockMoments(
        names=tuple(names),
        branch_of=tuple(branch_of),
        blocks=_concat(block_res),
        branch=_concat(branch_res) if branch_res else None,
        end_to_end=e2e,
    )


def raise_if_non_finite(names: Sequence[str], finite, x=None, variables=None) -> None:
    """A clear error naming the blocks whose moments are non-finite (``finite[j]`` False).

    With ``x`` (and ``variables``), the message names the true cause when it is there: a
    NaN/inf in the input or in the parameters, or a low-precision dtype that overflowed.
    """
    bad = [n for n, ok in zip(names, np.asarray(finite).tolist(), strict=True) if not ok]
    if not bad:
        return
    for what, tree in (("`x` (the input)", x), ("`variables`", variables)):
        leaves = [a for a in jax.tree.leaves(tree) if hasattr(a, "dtype")
                  and jnp.issubdtype(a.dtype, jnp.inexact)]
        if leaves and not all(bool(jnp.all(jnp.isfinite(a))) for a in leaves):
            raise FloatingPointError(
                f"non-finite Jacobian moments in block(s) {bad}: {what} contains NaN or inf.")
    low = sorted({str(a.dtype) for a in jax.tree.leaves((x, variables)) if hasattr(a, "dtype")
                  and str(a.dtype) in ("float16", "bfloat16")})
    hint = (f" The computation is in {low[0]}, whose largest finite value is "
            f"{float(jnp.finfo(low[0]).max):.6g}: use float32." if low else
            " Check the initialization scale, or use float64 (jax_enable_x64).")
    raise FloatingPointError(
        f"non-finite Jacobian moments in block(s) {bad}: the input and parameters are finite, "
        f"so the activation entering them, their output or their Jacobian overflowed."
        + hint
    )


def check_block_model(model, *, init: bool = False) -> None:
    """A clear TypeError unless ``model`` has ``blocks`` (and ``init`` when asked)."""
    if not hasattr(model, "blocks") or (init and not hasattr(model, "init")):
        needs = "`blocks(variables, x, *, train)`" + (
            " and `init(key, x, train=False)`" if init else "")
        raise TypeError(
            f"`model` ({type(model).__name__}) does not expose blocks: it needs {needs} "
            f"(see gne_jax.probes.blocks). For any other function, use gne_jax.chain_blocks "
            f"or gne_jax.jacobian_moments."
        )


def model_blocks(model, variables, x, *, train: bool) -> list[BlockGroup]:
    """``model.blocks(variables, x, train=train)`` with a clear error for a rejected input."""
    check_block_model(model)
    from flax.errors import FlaxError  # (a parameter whose shape does not fit the input)

    try:
        return model.blocks(variables, x, train=train)
    except (ValueError, TypeError, FlaxError) as e:
        shapes = jax.tree.map(lambda a: tuple(jnp.shape(a)), x)
        expected = getattr(model, "expected_input_shape", None)
        hint = f" The model expects input of shape {expected}." if expected else ""
        raise ValueError(
            f"{type(model).__name__} rejected the input `x` of shape {shapes}.{hint} "
            f"Original error: {type(e).__name__}: {e}"
        ) from e


def block_moments(
    model,
    variables: PyTree,
    x: PyTree,
    *,
    key: jax.Array,
    train: bool,
    num_probes: int = 32,
    method: str = "hutchinson",
    dist: str = "rademacher",
    probe_chunk: int | None = None,
    block_chunk: int | None = None,
    end_to_end: bool = True,
) -> BlockMoments:
    """φ, φ₂, ϕ (with SEs) of every block of ``model`` at ``variables``, and end to end.

    For each block j exposed by ``model.blocks`` (derivations §2): φ_j = Tr(J_jJ_jᵀ)/m_j,
    ϕ_j = φ₂ − φ_j², as in ``groups_moments``. ``train`` (required) selects the mode:
    ``True`` measures batch-coupled layers with batch statistics (the whole batch ``x``
    is one input, derivations §1.4); ``False`` with running statistics (at init an
    almost-identity map, so a batch-norm network looks isometric). The other options
    are those of ``groups_moments``.

    Called eagerly it runs one program per (model configuration, options, shapes):
    ``variables`` are data, so a new checkpoint or a new initialization compiles nothing.
    """
    key = check_key(key)
    if not isinstance(train, bool):
        raise TypeError(f"`train` must be a bool; got {train!r}.")
    options = check_group_options(num_probes=num_probes, method=method, dist=dist,
                                  probe_chunk=probe_chunk, block_chunk=block_chunk,
                                  end_to_end=end_to_end)
    check_input_tree(x, "x")
    kw = tuple(sorted(options.items()))
    if not is_concrete((variables, x, key)):
        return _measure(model, variables, x, key, train, kw)
    if not hasattr(model, "blocks"):
        model_blocks(model, variables, x, train=train)  # raises the clear error
    try:
        hash(model)
    except TypeError:  # an unhashable model: trace its blocks, compile once per structure
        return groups_moments(model_blocks(model, variables, x, train=train), x, key=key,
                              **options)
    # Called eagerly: one compiled program (cached for equal models and options) rather
    # than op-by-op dispatch.
    result = _measure_jit(jax.default_backend())(model, variables, x, key, train, kw)
    raise_if_non_finite(result.names, result.blocks.finite, x=x, variables=variables)
    return result


def _measure(model, variables, x, key, train, kw):
    groups = model_blocks(model, variables, x, train=train)
    return _groups_moments(groups, x, key, **dict(kw))


@functools.cache
def _measure_jit(platform):
    return jax.jit(_measure, static_argnums=(0, 4, 5),
                   compiler_options=probe_compiler_options(platform))


def chain_blocks(named_fns: Sequence[tuple[str, Callable]], x: PyTree) -> list[BlockGroup]:
    """Groups of one block each for a chain of plain functions (any JAX model).

    ``named_fns`` is ``[(name, fn), ...]`` applied in order; each fn closes over its own
    parameters (e.g. the sub-modules of an NNX model after ``nnx.split``).
    """
    groups, h = [], x
    for name, fn in named_fns:
        groups.append(single_block(name, lambda p, z, fn=fn: fn(z), {}, h))
        h = fn(h)
    return groups
