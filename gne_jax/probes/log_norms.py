"""Per-probe log-norms ln(‖Jv‖²/‖v‖²) of a function's Jacobian.

In deep narrow networks ‖Jv‖²/‖v‖² is close to log-normal (derivations §14.3): its mean can be
1 while its median shrinks like e^{−cL/d}, so the law is compared on logarithms. For one probe
v, normalizing by ‖v‖² (not by the expected ‖v‖² = n) makes the ratio depend on the direction
v/‖v‖ only; for a Gaussian probe and a Gaussian linear chain of width d,

    ln(‖W_L⋯W₁v‖²/‖v‖²) = Σₗ ln Rₗ,   Rₗ ~ χ²_d/d independent,

so E = L[ψ(d/2) − ln(d/2)] and Var = Lψ'(d/2) exactly (`gne_jax.theory.log_norms`).
``direction="forward"`` uses JVPs (v shaped like the input), ``"backward"`` VJPs
(‖Jᵀv‖²/‖v‖², v shaped like the output: the gradient's growth).

The function may take its weights as an explicit argument, ``fn(params, x)`` with
``params=...``: the program is then compiled once per structure (shapes and dtypes) and the
weights are data, not constants; a new weight state (a new initialization, a checkpoint)
compiles nothing new. Everything is a pure JAX function: vmap it over initializations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.flatten_util import ravel_pytree

from gne_jax._validate import check_choice, check_float_tree, check_key, check_positive_int

PyTree = Any

DIRECTIONS = ("forward", "backward")
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher", "sphere")

__all__ = ["LogNorms", "log_norms", "DIRECTIONS", "PROBE_DISTRIBUTIONS"]


@struct.dataclass
class LogNorms:
    """Per-probe log-norm ratios and their summary.

    Attributes:
      log_ratio: ``[num_probes]``, ln(‖Jv‖²/‖v‖²) (forward) or ln(‖Jᵀv‖²/‖v‖²) (backward).
      mean: mean of ``log_ratio`` over the probes.
      sem: its standard error across the probes (std/√K; 0 for one probe).
      median: median of ``log_ratio``.
      mean_ratio: mean of ‖Jv‖²/‖v‖² itself (exp of the logs), the "expectation analysis".
      direction: "forward" or "backward" (static).
    """

    log_ratio: jax.Array
    mean: jax.Array
    sem: jax.Array
    median: jax.Array
    mean_ratio: jax.Array
    direction: str = struct.field(pytree_node=False, default="forward")


def _probe(key, k, n, dist, dtype):
    if dist == "gaussian":
        return jax.random.normal(key, (k, n), dtype)
    if dist == "rademacher":
        return jax.random.rademacher(key, (k, n), dtype)
    v = jax.random.normal(key, (k, n), dtype)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def _measure(fn, has_params, num_probes, direction, dist, params, x, key, probes):
    f = functools.partial(fn, params) if has_params else fn
    x_flat, unravel_x = ravel_pytree(x)
    dtype = x_flat.dtype

    def flat_fn(z):
        return ravel_pytree(f(unravel_x(z)))[0]

    if direction == "forward":
        n = x_flat.shape[0]
        apply = jax.linearize(flat_fn, x_flat)[1]
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
    return LogNorms(logs, mean, sem, jnp.median(logs), jnp.mean(jnp.exp(logs)), direction)


@functools.cache
def _measure_jit():
    return jax.jit(_measure, static_argnums=(0, 1, 2, 3, 4))


def log_norms(
    fn: Callable,
    x: PyTree,
    *,
    key: jax.Array | None = None,
    params: PyTree = None,
    num_probes: int = 64,
    direction: str = "forward",
    dist: str = "gaussian",
    probes: jax.Array | None = None,
) -> LogNorms:
    """ln(‖Jv‖²/‖v‖²) for ``num_probes`` random probes v, J the Jacobian of ``fn`` at ``x``.

    Args:
      fn: ``fn(x)``, or ``fn(params, x)`` when ``params`` is given (the compile-once form:
        pass the weights here rather than closing over them).
      x: the input (any pytree of floating arrays); J is taken with respect to it.
      key: PRNG key for the probes (required unless ``probes`` is given).
      params: the weights, passed to ``fn`` as its first argument.
      num_probes: number of probes K.
      direction: "forward" (JVP, v like x: ‖Jv‖²/‖v‖²) or "backward" (VJP, v like fn(x):
        ‖Jᵀv‖²/‖v‖²).
      dist: "gaussian" (the log-norm laws assume it), "rademacher" or "sphere"; the ratio
        depends only on v/‖v‖, so "sphere" and "gaussian" give the same law.
      probes: explicit probes ``[K, *shape]`` (overrides ``key``, ``num_probes``, ``dist``).

    Returns:
      ``LogNorms`` (per-probe logs, mean ± SE, median, mean of the ratio).
    """
    check_choice(direction, "direction", DIRECTIONS)
    check_choice(dist, "dist", PROBE_DISTRIBUTIONS)
    check_float_tree(x, "x")
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
    has_params = params is not None
    args = (fn, has_params, num_probes, direction, dist, params, x, key, probes)
    return _measure_jit()(*args)
