"""LSUV (Mishkin & Matas 2016, "All you need is a good init") in JAX, on the library's blocks.

Algorithm 1 of the paper:

1. pre-initialize every weight layer with an orthonormal matrix (the kernel flattened to
   (fan_in, fan_out), as the reference implementation's SVD of a Gaussian);
2. for each layer L from the input side, on one batch:
   while |Var(B_L) − 1| ≥ Tol_var and T_i < T_max: forward the batch, compute the
   variance Var(B_L) of the layer's output B_L, W_L ← W_L / √Var(B_L).

B_L is the output of the convolution / dense layer (before normalization and
activation), captured with ``flax.linen.intercept_methods`` inside the block. Blocks
are processed in order and each sees the output of the already rescaled blocks before
it. A block with one weight layer (plain nets) is exactly the paper's layer; a block
with k > 1 weight layers is rescaled jointly, W ← W·Var^(−1/(2k)), on the output of
its last weight layer (exact for homogeneous activations). For a chain of plain
functions (no Flax layers inside) B_L is the block's output. The variance is the
biased variance over every entry of B_L (batch and features), as ``torch.var`` up to
the n/(n−1) factor. Biases are left as they are (zero at the library's init).

The paper uses Tol_var = 0.1 and T_max = 10.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gne_jax._tree import path_names
from gne_jax._validate import check_key, check_positive_int
from gne_jax.calibration.knobs import count_selected, scale_leaves
from gne_jax.nn.initializers import orthogonal
from gne_jax.probes.blocks import BlockGroup, single_block

PyTree = Any
_is_kernel = lambda path, leaf: bool(path) and path[-1] == "kernel"  # noqa: E731


class LSUVReport(NamedTuple):
    """Per block: the layer-output variance before (after the orthonormal pre-init) and
    after, the factor applied, forward passes spent and whether |Var − 1| < tol."""

    names: tuple[str, ...]
    tol: float
    max_iter: int
    var_before: np.ndarray
    var_after: np.ndarray
    scale: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    captured: np.ndarray  # True: B_L is a Dense/Conv output; False: the block output

    @property
    def forwards(self) -> np.ndarray:
        """Forward passes of each block (one per variance measurement)."""
        return self.iterations + 1


def _layer_output(apply, p, h):
    """(output of the block's last Dense/Conv call, whether one was captured)."""
    recs = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense | nn.Conv):
            recs.append(out)
        return out

    with nn.intercept_methods(interceptor):
        y = apply(p, h)
    return (recs[-1], True) if recs else (y, False)


def orthonormal_kernels(params: PyTree, key: jax.Array, gain: float = 1.0) -> PyTree:
    """Every ``kernel`` leaf redrawn as gain × a Haar-orthogonal kernel (flattened
    (fan_in, fan_out), ``gne_jax.nn.initializers.orthogonal``)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if _is_kernel(path_names(path), leaf) and jnp.ndim(leaf) >= 2:
            leaf = orthogonal(gain)(jax.random.fold_in(key, i), jnp.shape(leaf),
                                    jnp.result_type(leaf))
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _lsuv_block(apply, p, h, key, tol, max_iter, orthonormal, n_kernels):
    if orthonormal:
        p = orthonormal_kernels(p, key)
    k = max(n_kernels, 1)

    def var_of(p):
        out, captured = _layer_output(apply, p, h)
        return jnp.var(out.astype(jnp.float32)), captured

    v0, captured = var_of(p)

    def cond(s):
        it, _, _, v = s
        return (jnp.abs(v - 1.0) >= tol) & (it < max_iter) & jnp.isfinite(v) & (v > 0)

    def body(s):
        it, p, g, v = s
        f = v ** (-0.5 / k)
        p = scale_leaves(p, f, _is_kernel)
        return it + 1, p, g * f, var_of(p)[0]

    it, p, g, v = jax.lax.while_loop(cond, body, (jnp.asarray(0), p, jnp.asarray(1.0), v0))
    return p, (v0, v, g, it, jnp.abs(v - 1.0) < tol, jnp.asarray(captured))


def _lsuv_groups(groups, x, key, tol, max_iter, orthonormal):
    h, new_params, stats = x, [], []
    for gi, g in enumerate(groups):
        nk = count_selected(jax.tree.map(lambda a: a[0], g.params), _is_kernel)
        keys = jax.random.split(jax.random.fold_in(key, gi), g.size)

        def solve(p, h, k, g=g, nk=nk):
            p, st = _lsuv_block(g.apply, p, h, k, tol, max_iter, orthonormal, nk)
            return p, g.apply(p, h), st

        if g.size == 1:
            p, h, st = solve(jax.tree.map(lambda a: a[0], g.params), h, keys[0])
            stack = lambda t: jax.tree.map(lambda a: jnp.asarray(a)[None], t)  # noqa: E731
            p, st = stack(p), stack(st)
        else:
            def step(carry, xs, solve=solve):
                p, k = xs
                p, out, st = solve(p, carry, k)
                return out, (p, st)

            h, (p, st) = jax.lax.scan(step, h, (g.params, keys))
        new_params.append(p)
        stats.append(st)
    return new_params, jax.tree.map(lambda *a: jnp.concatenate(a), *stats)


def _program_model(model, variables, x, key, train, tol, max_iter, orthonormal):
    from gne_jax.calibration.core import _model_groups, _write_back

    groups = _model_groups(model, variables, x, train)
    new_params, stats = _lsuv_groups(groups, x, key, tol, max_iter, orthonormal)
    return _write_back(model, variables, new_params), stats


def _program_chain(fns, params, x, key, tol, max_iter, orthonormal):
    groups: list[BlockGroup] = []
    h = x
    for i, (fn, p) in enumerate(zip(fns, params, strict=True)):
        groups.append(single_block(str(i), fn, p, h))
        h = fn(p, h)
    new_params, stats = _lsuv_groups(groups, x, key, tol, max_iter, orthonormal)
    return [jax.tree.map(lambda a: a[0], p) for p in new_params], stats


@functools.cache
def _jitted(kind):
    if kind == "model":
        return jax.jit(_program_model, static_argnums=(0, 4, 5, 6, 7))
    return jax.jit(_program_chain, static_argnums=(0, 4, 5, 6))


def lsuv(model, variables, x, *, key, tol: float = 0.1, max_iter: int = 10,
         orthonormal: bool = True, train: bool = True) -> tuple[PyTree, LSUVReport]:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016) on ``model``'s blocks.

    Args:
      model, variables: as in ``gne_jax.calibrate`` (a library model and its variables, or
        a list of block functions ``fn(params, h)`` and a list of params).
      x: the batch.
      key: PRNG key of the orthonormal pre-initialization.
      tol: Tol_var, |Var(B_L) − 1| < tol stops a layer (paper: 0.1).
      max_iter: T_max rescalings per layer (paper: 10).
      orthonormal: do step 1 (the orthonormal pre-init); False rescales the given weights.
      train: batch-coupled layers use batch statistics.

    Returns:
      ``(variables, LSUVReport)``. Cost: (iterations + 1) forward passes of each block.
    """
    from gne_jax.calibration.core import _chain_spec, _is_block_model, _structure

    key = check_key(key)
    tol = float(tol)
    if not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"`tol` must be a finite number > 0; got {tol!r}.")
    check_positive_int(max_iter, "max_iter")
    if _is_block_model(model):
        names = tuple(n for ns, _ in _structure(model, variables, x, bool(train)) for n in ns)
        out, st = _jitted("model")(model, variables, x, key, bool(train), tol, max_iter,
                                   bool(orthonormal))
    else:
        if callable(model) and not isinstance(model, list | tuple):
            raise TypeError(f"`model` ({type(model).__name__}) does not expose blocks; pass a "
                            f"library model or a list of block functions fn(params, h).")
        names, fns, params = _chain_spec(model, variables)
        out, st = _jitted("chain")(fns, params, x, key, tol, max_iter, bool(orthonormal))
    v0, v, g, it, ok, cap = (np.asarray(a) for a in st)
    return out, LSUVReport(names, tol, max_iter, v0, v, g, it.astype(int), ok.astype(bool),
                           cap.astype(bool))
