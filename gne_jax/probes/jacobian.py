"""Matrix-free Jacobian operators of a pure function at a point.

For ``y = fn(x)`` with pytree input and output, J = ∂y/∂x is an m×n linear map
(m, n the total numbers of output and input elements). ``jacobian_operators``
linearizes ``fn`` once (one forward pass, residuals kept) and returns

  jvp(u)  = J u        (u shaped like x)
  vjp(v)  = Jᵀ v       (v shaped like y; the transpose of the linearization,
                        so the forward pass is not recomputed)
  jjt(v)  = J Jᵀ v     (m×m, the operator whose normalized moments φ, φ₂ the
                        gradient-norm-equality probes estimate)
  jtj(u)  = Jᵀ J u     (n×n)

All closures are pure JAX and compose with jit, vmap and grad. A batch-coupled
``fn`` (training-mode batch norm) is handled naturally: x is the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from gne_jax._tree import tree_size
from gne_jax._validate import check_float_tree

PyTree = Any


class JacobianOperators(NamedTuple):
    """Linear maps of the Jacobian J of ``fn`` at ``x``; see module docstring."""

    out: PyTree
    jvp: Callable[[PyTree], PyTree]
    vjp: Callable[[PyTree], PyTree]
    jjt: Callable[[PyTree], PyTree]
    jtj: Callable[[PyTree], PyTree]
    in_size: int
    out_size: int


def output_shape(fn: Callable, x: PyTree, argname: str = "x") -> PyTree:
    """``jax.eval_shape(fn, x)`` with a clear error when ``fn`` rejects ``x``."""
    try:
        return jax.eval_shape(fn, x)
    except Exception as e:  # the user's function raised: say which argument and why
        shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), x)
        raise ValueError(
            f"`fn` rejected the input `{argname}` with (shape, dtype) {shapes}: "
            f"{type(e).__name__}: {e}"
        ) from e


def jacobian_operators(fn: Callable[[PyTree], PyTree], x: PyTree) -> JacobianOperators:
    """J u, Jᵀ v, JJᵀ v and JᵀJ u of ``fn`` at ``x`` from a single linearization.

    Args:
      fn: pure function from a pytree of float arrays to a pytree of float arrays
        (e.g. ``lambda x: model.apply(variables, x)``).
      x: the point; its total element count is n.

    Returns:
      ``JacobianOperators(out, jvp, vjp, jjt, jtj, in_size, out_size)``.
    """
    check_float_tree(x, "x")
    out_struct = output_shape(fn, x)
    check_float_tree(out_struct, "fn(x)")
    out, jvp = jax.linearize(fn, x)
    transpose = jax.linear_transpose(jvp, x)

    def vjp(v):
        return transpose(v)[0]

    def jjt(v):
        return jvp(vjp(v))

    def jtj(u):
        return vjp(jvp(u))

    return JacobianOperators(out, jvp, vjp, jjt, jtj, tree_size(x), tree_size(out_struct))
