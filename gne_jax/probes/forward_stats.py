"""Per-block forward statistics: second moments α and the within-sample variance fraction.

For a chain of blocks (``model.blocks(...)``, ``gne_jax.probes.blocks``) and a batch x,
every block j maps its input h_j to h_{j+1}. This module reports, per block,

* α_in = mean(h_j²), α_out = mean(h_{j+1}²): the forward second moments (over every entry
  of the batch). Their ratio is the block's φ by the second-moment lemma (derivations §5)
  when the block is (near) homogeneous and its input near white;
* the within-sample variance fraction of the block output (Luther & Seung),

      v²/σ² = 1 − ⟨(mean_b h)²⟩ / ⟨h²⟩,

  with mean_b the mean over the batch axis of one unit (one non-batch entry) and ⟨·⟩ the
  mean over units (and batch). It is the share of the second moment that varies across
  samples: 1 for centred units (batch norm with batch statistics), and 1 − ρ_k after k ReLU
  Kaiming layers on white noise (``gne_jax.theory.sample_variance``).

The statistics are pure JAX: ``groups_forward_stats`` works under ``jit`` and ``vmap`` (vmap
over initializations), and ``forward_stats(model, variables, x, train=...)`` compiles once per model
structure, the variables being arguments of the program (not constants).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from gne_jax._validate import check_finite_tree, check_float_tree
from gne_jax.probes.blocks import BlockGroup

PyTree = Any

__all__ = [
    "ForwardStats",
    "forward_stats",
    "groups_forward_stats",
    "scan_group",
    "second_moment",
    "within_sample_fraction",
]


@struct.dataclass
class ForwardStats:
    """Forward statistics of every block (leading axis: block, in order).

    Attributes:
      names: block names (static).
      alpha_in: second moment of the activation entering each block.
      alpha_out: second moment of each block's output.
      within_fraction: within-sample variance fraction of each block's output.
      mean_sq: ⟨(mean_b h)²⟩ of each block's output (the squared sample mean part).
    """

    names: tuple[str, ...] = struct.field(pytree_node=False)
    alpha_in: jax.Array
    alpha_out: jax.Array
    within_fraction: jax.Array
    mean_sq: jax.Array

    @property
    def alpha_ratio(self) -> jax.Array:
        """α_out/α_in per block (the second-moment lemma's φ)."""
        return self.alpha_out / self.alpha_in


def second_moment(h: jax.Array) -> jax.Array:
    """α = mean(h²) over every entry."""
    h = jnp.asarray(h)
    return jnp.mean(jnp.square(h.astype(jnp.promote_types(h.dtype, jnp.float32))))


def _sample_mean_sq(h, batch_axis):
    h = jnp.asarray(h)
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    return jnp.mean(jnp.square(jnp.mean(h, axis=batch_axis)))


def within_sample_fraction(h: jax.Array, batch_axis: int = 0) -> jax.Array:
    """1 − ⟨(mean_b h)²⟩/⟨h²⟩: the share of the second moment that varies across the batch.

    ``h``: activations with a batch axis (``batch_axis``, default 0); every other entry is a
    unit. With B samples the plain sample mean biases the ratio by ≈ +(1/B)(fraction) for
    independent samples; no correction is applied (the papers' convention).
    """
    h = jnp.asarray(h)
    if h.ndim < 2:
        raise ValueError(f"`h` needs a batch axis and at least one unit axis; got {h.shape}.")
    if not isinstance(batch_axis, int) or not -h.ndim <= batch_axis < h.ndim:
        raise ValueError(f"`batch_axis`={batch_axis!r} is not an axis of `h` (shape {h.shape}).")
    return 1.0 - _sample_mean_sq(h, batch_axis) / second_moment(h)


def scan_group(prefix: str, apply, params: PyTree, x: jax.Array) -> BlockGroup:
    """A ``BlockGroup`` of n identical blocks ``h ↦ apply(params[i], h)`` entered at ``x``.

    ``params`` leaves have a leading axis n (one slice per block); the input of every block
    is computed with one ``lax.scan`` (blocks named ``f"{prefix}{i}"``, i = 1..n). Pure: it
    works under ``jit`` and ``vmap``.
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("`params` has no array leaves: it must hold the stacked weights.")
    n = int(jnp.shape(leaves[0])[0])

    def step(h, p):
        return apply(p, h), h

    _, inputs = jax.lax.scan(step, x, params)
    return BlockGroup(tuple(f"{prefix}{i + 1}" for i in range(n)), apply, params, inputs)


def _group_stats(g: BlockGroup, batch_axis: int):
    outs = jax.vmap(g.apply)(g.params, g.inputs)  # every block of the run at once
    alpha_in = jax.vmap(second_moment)(g.inputs)
    alpha_out = jax.vmap(second_moment)(outs)
    msq = jax.vmap(lambda h: _sample_mean_sq(h, batch_axis))(outs)
    return alpha_in, alpha_out, msq


def groups_forward_stats(groups: Sequence[BlockGroup], *, batch_axis: int = 0) -> ForwardStats:
    """``ForwardStats`` of a chain of ``BlockGroup``\\ s (their ``inputs`` hold the batch).

    Each group's blocks are evaluated at once with ``vmap`` (no loop over layers); the groups
    themselves are a handful (stem, runs of identical blocks, head).
    """
    if not groups:
        raise ValueError("`groups` is empty: nothing to measure.")
    names, parts = [], []
    for g in groups:
        if not isinstance(g, BlockGroup):
            raise TypeError(f"`groups` must hold BlockGroup; got {type(g).__name__}.")
        names.extend(g.names)
        parts.append(_group_stats(g, batch_axis))
    a_in, a_out, msq = (jnp.concatenate([p[i] for p in parts]) for i in range(3))
    return ForwardStats(tuple(names), a_in, a_out, 1.0 - msq / a_out, msq)


def _measure(model, train, batch_axis, variables, x):
    groups = model.blocks(variables, x, train=train)
    return groups_forward_stats(groups, batch_axis=batch_axis)


@functools.cache
def _measure_jit():
    return jax.jit(_measure, static_argnums=(0, 1, 2))


def forward_stats(model, variables: PyTree, x: jax.Array, *, train: bool,
                  batch_axis: int = 0) -> ForwardStats:
    """Per-block α_in, α_out and within-sample variance fraction of ``model`` on batch ``x``.

    ``model`` exposes ``blocks(variables, x, *, train)`` (every model of ``gne_jax.models``);
    ``train`` (required, as for ``block_moments``): ``True`` uses batch statistics in
    batch-coupled layers, ``False`` running statistics. Compiled once per model and
    input shape; ``variables`` are data, so vmapping over initializations or calling at a new
    weight state compiles nothing new.
    """
    if not hasattr(model, "blocks"):
        raise TypeError(
            f"`model` ({type(model).__name__}) does not expose blocks: it needs a "
            f"`blocks(variables, x, *, train)` method; for a chain of functions build the groups "
            f"(gne_jax.chain_blocks) and call groups_forward_stats.")
    if not isinstance(train, bool):
        raise TypeError(f"`train` must be a bool; got {train!r}.")
    check_float_tree(x, "x")
    check_finite_tree(x, "x")
    check_finite_tree(variables, "variables")
    return _measure_jit()(model, train, int(batch_axis), variables, x)
