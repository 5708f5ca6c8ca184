"""Per-probe log-norms ln(‖Jv‖²/‖v‖²) of a function's Jacobian.

In deep narrow networks ‖Jv‖²/‖v‖² is close to log-normal (derivations §14.3): its mean can be
1 while its median shrinks like e^{−cL/d}, so the law is compared on logarithms. For one probe
v, normalizing by ‖v‖² (not by the expected ‖v‖² = n) makes the ratio depend on the direction
v/‖v‖ only; for a Gaussian probe and a Gaussian linear chain of width d,

    ln(‖W_L⋯W₁v‖²/‖v‖²) = Σₗ ln Rₗ,   Rₗ ~ χ²_d/d independent,

so E = L[ψ(d/2) − ln(d/2)] and Var = Lψ'(d/2) exactly (`gne_jax.theory.log_norms`).
``direction="forward"`` uses JVPs (v shaped like the input), ``"backward"`` VJPs
(‖Jᵀv‖²/‖v‖², v shaped like the output: the gradient's growth).

Weights are data, as in ``jacobian_moments``: an eager call runs a program compiled once
per structure of ``fn`` (``gne_jax.probes.compiled``), whether the weights are closed over
or passed as ``fn(params, x)`` with ``params=...``; a new weight state (a new
initialization, a checkpoint) compiles nothing new. Everything is a pure JAX function: vmap
it over initializations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.flatten_util import ravel_pytree

from gne_jax._tree import is_concrete, tree_size
from gne_jax._validate import (
    check_choice,
    check_float_tree,
    check_input_tree,
    check_key,
    check_positive_int,
    warn_deprecated,
)
from gne_jax.probes import compiled
from gne_jax.probes.moments import _all_finite, raise_non_finite

PyTree = Any

DIRECTIONS = ("forward", "backward")
PROBE_DISTRIBUTIONS = ("normal", "rademacher", "sphere")

__all__ = ["LogNorms", "log_norms", "DIRECTIONS", "PROBE_DISTRIBUTIONS"]


@struct.dataclass
class LogNorms:
    """Per-probe log-norm ratios and their summary.

    Attributes:
      log_ratio: ``[num_probes]``, ln(‖Jv‖²/‖v‖²) (forward) or ln(‖Jᵀv‖²/‖v‖²) (backward);
        −inf where the Jacobian annihilates the probe (a dead ReLU network).
      mean: mean of ``log_ratio`` over the probes.
      sem: its standard error across the probes (std/√K; 0 for one probe).
      median: median of ``log_ratio``.
      mean_ratio: mean of ‖Jv‖²/‖v‖² itself (exp of the logs), the "expectation analysis".
      finite: False when x, fn(x) or a ratio was NaN or inf (−inf logs allowed); only
        reachable under an outer jit/vmap, an eager call raises instead.
      direction: "forward" or "backward" (static).
    """

    log_ratio: jax.Array
    mean: jax.Array
    sem: jax.Array
    median: jax.Array
    mean_ratio: jax.Array
    finite: jax.Array
    direction: str = struct.field(pytree_node=False, default="forward")


def _probe(key, k, n, dist, dtype):
    if dist == "normal":
        return jax.random.normal(key, (k, n), dtype)
    if dist == "rademacher":
        return jax.random.rademacher(key, (k, n), dtype)
    v = jax.random.normal(key, (k, n), dtype)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def _measure(fn, x, key, probes, *, num_probes, direction, dist):
    """The measurement (traceable; no checks, no compilation of its own)."""
    x_flat, unravel_x = ravel_pytree(x)
    dtype = x_flat.dtype

    def flat_fn(z):
        return ravel_pytree(fn(unravel_x(z)))[0]

    if direction == "forward":
        y, apply = jax.linearize(flat_fn, x_flat)
        n = x_flat.shape[0]
    else:
        y, f_vjp = jax.vjp(flat_fn, x_flat)
        n = y.shape[0]

        def apply(v):
            return f_vjp(v.astype(y.dtype))[0]

    if probes is None:
        v = _probe(key, num_probes, n, dist, dtype)
    else:
        v = jnp.reshape(probes, (probes.shape[0], n)).astype(dtype)
    out = jax.lax.map(apply, v) if v.shape[0] > 256 else jax.vmap(apply)(v)
    num = jnp.sum(jnp.square(out.astype(jnp.float32 if dtype == jnp.float16 else out.dtype)),
                  axis=1)
    den = jnp.sum(jnp.square(v.astype(num.dtype)), axis=1)
    logs = jnp.log(num) - jnp.log(den)
    k = logs.shape[0]
    mean = jnp.mean(logs)
    sem = jnp.std(logs, ddof=1) / jnp.sqrt(k) if k > 1 else jnp.zeros_like(mean)
    finite = _all_finite((x_flat, y)) & jnp.all(jnp.isfinite(num))
    return LogNorms(logs, mean, sem, jnp.median(logs), jnp.mean(jnp.exp(logs)), finite,
                    direction)


def _probe_distribution(dist: str) -> str:
    if dist == "gaussian":  # the name of the first release
        warn_deprecated("log_norms(dist='gaussian') is now dist='normal', the name every "
                        "estimator uses; 'gaussian' will be removed in the next release.")
        return "normal"
    return check_choice(dist, "dist", PROBE_DISTRIBUTIONS)


def log_norms(
    fn: Callable,
    x: PyTree,
    *,
    key: jax.Array | None = None,
    params: PyTree = None,
    num_probes: int = 64,
    direction: str = "forward",
    dist: str = "normal",
    probes: jax.Array | None = None,
) -> LogNorms:
    """ln(‖Jv‖²/‖v‖²) for ``num_probes`` random probes v, J the Jacobian of ``fn`` at ``x``.

    Args:
      fn: ``fn(x)``, or ``fn(params, x)`` when ``params`` is given. Either way an eager
        call compiles once per structure: new weights compile nothing new.
      x: the input (any pytree of real floating arrays, not empty); J is taken with
        respect to it.
      key: PRNG key for the probes (required unless ``probes`` is given).
      params: the weights, passed to ``fn`` as its first argument.
      num_probes: number of probes K.
      direction: "forward" (JVP, v like x: ‖Jv‖²/‖v‖²) or "backward" (VJP, v like fn(x):
        ‖Jᵀv‖²/‖v‖²).
      dist: "normal" (the log-norm laws assume it), "rademacher" or "sphere"; the ratio
        depends only on v/‖v‖, so "sphere" and "normal" give the same law. ("gaussian",
        the former name, still works with a ``DeprecationWarning``.)
      probes: explicit probes ``[K, *shape]``, K probes of x's size (forward) or fn(x)'s
        (backward) (overrides ``key``, ``num_probes``, ``dist``).

    Returns:
      ``LogNorms`` (per-probe logs, mean ± SE, median, mean of the ratio).
    """
    check_choice(direction, "direction", DIRECTIONS)
    dist = _probe_distribution(dist)
    check_input_tree(x, "x")
    if probes is None:
        key = check_key(key)
        num_probes = check_positive_int(num_probes, "num_probes")
    else:
        probes = jnp.asarray(probes)
        if probes.ndim < 1 or probes.shape[0] < 1:
            raise ValueError(f"`probes` must have a leading probe axis; got shape {probes.shape}.")
        key = jax.random.key(0) if key is None else check_key(key)
        num_probes = int(probes.shape[0])
    if not callable(fn):
        raise TypeError(f"`fn` must be callable; got {type(fn).__name__}.")
    f = fn if params is None else functools.partial(fn, params)
    structure, consts, out_struct = compiled.hoist_at_input(f, x, key, params, probes)
    check_float_tree(out_struct, "fn(x)")
    if probes is not None:
        n = tree_size(x) if direction == "forward" else tree_size(out_struct)
        if probes[0].size != n:
            what = "x" if direction == "forward" else "fn(x)"
            raise ValueError(
                f"`probes` holds probes of {probes[0].size} elements (shape {probes.shape}); "
                f"direction={direction!r} needs probes of {what}'s size, {n}.")
        if is_concrete(probes):
            norms = np.linalg.norm(np.asarray(probes, np.float64).reshape(num_probes, -1),
                                   axis=1)
            bad = np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))
            if bad.size:
                raise ValueError(
                    f"`probes`[{bad[0]}] has norm {norms[bad[0]]:g}: every probe must be a "
                    "finite, non-zero vector (the log-ratio divides by ‖v‖²).")
    options = dict(num_probes=num_probes, direction=direction, dist=dist)
    if structure is None:  # under an outer jit/vmap/grad: inline
        return _measure(f, x, key, probes, **options)
    prog = compiled.program(_measure, tuple(sorted(options.items())), (structure,))
    result = prog([consts], x, key, probes)
    if not bool(result.finite):
        raise_non_finite(f, x)
    return result
