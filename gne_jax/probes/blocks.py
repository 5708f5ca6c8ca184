"""The block structure a model exposes to the per-block probes.

A network is a chain f = f_L ∘ … ∘ f_1 of blocks (derivations §2). Models in
`gne_jax.models` describe that chain as an ordered list of `BlockGroup`s: a
group is a run of n consecutive blocks that share one pure function
``apply(params_i, h)`` and differ only in their parameters, stacked along a
leading axis. Probes can then ``vmap`` (or ``lax.map``) over the blocks of a
group instead of unrolling a Python loop over layers, and the compile time of a
per-block measurement stays flat in depth. A heterogeneous block (a stem, a
down-sampling block, a head) is a group of one.

Contract, checked by ``tests/test_models.py`` for every model:
``compose_blocks(model.blocks(variables, x, train=t), x) == model.apply(...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any


class BlockGroup(NamedTuple):
    """A run of blocks ``h ↦ apply(params[i], h)`` applied one after the other.

    Attributes:
      names: one name per block, e.g. ``("layer3", "layer4", ...)``.
      apply: ``(params_i, h) -> h'``, pure; ``params_i`` is one slice of ``params``.
      params: pytree whose leaves have a leading axis of length ``len(names)``.
      inputs: array ``[len(names), *h.shape]``, the activation entering each block
        (the whole batch: batch-coupled blocks see the batch as one input).
      branch: for residual blocks ``h' = shortcut(h) + branch(h)``, the branch as
        ``(params_i, h) -> branch(h)``; ``None`` for plain blocks.
      shortcut: the shortcut as ``(params_i, h) -> shortcut(h)``; ``None`` means the
        identity when ``branch`` is set.
    """

    names: tuple[str, ...]
    apply: Callable[[PyTree, Array], Array]
    params: PyTree
    inputs: Array
    branch: Callable[[PyTree, Array], Array] | None = None
    shortcut: Callable[[PyTree, Array], Array] | None = None

    @property
    def size(self) -> int:
        return len(self.names)

    @property
    def is_residual(self) -> bool:
        return self.branch is not None


class Block(NamedTuple):
    """One block with its parameters closed over: ``fn(h)`` is the block's map."""

    name: str
    fn: Callable[[Array], Array]
    input: Array
    branch: Callable[[Array], Array] | None = None
    shortcut: Callable[[Array], Array] | None = None


def single_block(name: str, apply, params, h, *, branch=None, shortcut=None) -> BlockGroup:
    """A group of one block: ``params`` and ``h`` get a leading axis of length 1."""
    stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], params)
    return BlockGroup((name,), apply, stacked, jnp.asarray(h)[None], branch, shortcut)


def run_group(group: BlockGroup, h: Array) -> Array:
    """Applies the blocks of ``group`` in order to ``h`` with ``lax.scan``.

    A group of one block is applied directly: single blocks (stem, down-sampling
    block, head) may change the shape of ``h``, which a scan carry cannot.
    """
    if group.size == 1:
        return group.apply(jax.tree.map(lambda a: a[0], group.params), h)

    def step(carry, p):
        return group.apply(p, carry), None

    out, _ = jax.lax.scan(step, h, group.params)
    return out


def compose_blocks(groups: list[BlockGroup], x: Array) -> Array:
    """f_L(…f_1(x)): the model's output rebuilt from its exposed blocks."""
    h = x
    for g in groups:  # a handful of heterogeneous groups; the runs are scanned
        h = run_group(g, h)
    return h


def iter_blocks(groups: list[BlockGroup]) -> Iterator[Block]:
    """Unstacks the groups into single blocks with their parameters closed over.

    Convenient outside ``jit`` (tables, debugging); the probes use the groups.
    """
    for g in groups:
        for i, name in enumerate(g.names):
            p = jax.tree.map(lambda a, i=i: a[i], g.params)
            fn = lambda h, p=p, g=g: g.apply(p, h)
            br = None if g.branch is None else (lambda h, p=p, g=g: g.branch(p, h))
            sc = None if g.shortcut is None else (lambda h, p=p, g=g: g.shortcut(p, h))
            yield Block(name, fn, g.inputs[i], br, sc)
