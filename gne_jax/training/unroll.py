"""Evaluate a function with every ``lax.scan`` unrolled (the fast CPU train step).

The models scan runs of identical blocks (``nn.scan``: parameters stacked on a leading
axis, compile time flat in depth). On XLA:CPU the weight-gradient convolution inside a
loop body takes a slow path (measured 30× slower than the same convolutions unrolled;
see ``benchmarks/RESULTS.md``). :func:`unroll_scans` removes the loops without touching
the model: it traces ``fn`` to a jaxpr and re-evaluates it, replacing every ``scan`` of
length ``n`` by ``n`` copies of its body,

    carry_{i+1}, y_i = body(consts, carry_i, xs[i]),   ys = stack(y_0, …, y_{n-1}),

(``i`` running backwards for ``reverse=True``), recursing into nested ``jit`` calls and
scan bodies. Every other primitive is bound unchanged, so the result, and its gradient
under ``jax.grad``, is the same computation in the same order: only the loop structure
differs. Parameters keep their stacked layout; checkpoints and optimizer states are
unaffected. Compile time grows with the number of unrolled blocks instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

UNROLL_MODES = ("auto", "true", "false")


def should_unroll(mode: str | bool, backend: str | None = None) -> bool:
    """Whether ``config.unroll_scans`` unrolls: ``'auto'`` = on for the CPU backend only."""
    if isinstance(mode, bool):
        return mode
    mode = str(mode).lower()
    if mode not in UNROLL_MODES:
        raise ValueError(f"config.unroll_scans={mode!r} is unknown; expected one of "
                         f"{UNROLL_MODES} (auto = unrolled on CPU backends only)")
    if mode == "auto":
        return (backend or jax.default_backend()) == "cpu"
    return mode == "true"


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _eval_jaxpr(jaxpr, consts, *args):
    """``jax.core.eval_jaxpr`` with scans unrolled and jit calls inlined."""
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "scan":
            outvals = _unrolled_scan(invals, **eqn.params)
        elif name in ("pjit", "jit"):
            closed = eqn.params["jaxpr"]
            outvals = _eval_jaxpr(closed.jaxpr, closed.consts, *invals)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns = []
            if isinstance(bind_params, tuple):  # jax < 0.7: (subfuns, params)
                subfuns, bind_params = bind_params
            with eqn.ctx.manager:
                outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        for v, x in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _unrolled_scan(args, *, reverse, length, jaxpr, num_consts, num_carry, **_):
    consts = args[:num_consts]
    carry = list(args[num_consts:num_consts + num_carry])
    xs = args[num_consts + num_carry:]
    ys: list[list[Any]] = [None] * length  # type: ignore[list-item]
    # One split per stacked input: its transpose (the gradient) is one concatenation,
    # where indexing x[i] per block would transpose to `length` full-size scatters.
    parts = [[jnp.squeeze(p, 0) for p in jnp.split(x, length)] if length else [] for x in xs]
    order = range(length - 1, -1, -1) if reverse else range(length)
    for i in order:
        out = _eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, *consts, *carry, *[p[i] for p in parts])
        carry, ys[i] = list(out[:num_carry]), out[num_carry:]
    num_ys = len(jaxpr.jaxpr.outvars) - num_carry
    if length == 0:
        stacked = [jnp.zeros((0, *a.shape), a.dtype) for a in jaxpr.out_avals[num_carry:]]
    else:
        stacked = [jnp.stack([ys[i][k] for i in range(length)]) for k in range(num_ys)]
    return carry + stacked


def unroll_scans(fn: Callable) -> Callable:
    """``fn`` with every ``lax.scan`` (hence every ``nn.scan``) unrolled; same values.

    ``fn``'s keyword arguments are treated as static (e.g. ``train=True``,
    ``mutable=['batch_stats']``); positional arguments are pytrees of arrays.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        closed, out_shape = jax.make_jaxpr(functools.partial(fn, **kwargs),
                                           return_shape=True)(*args)
        out = _eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped
