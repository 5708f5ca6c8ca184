"""Argument checks shared by the public entry points.

They run on abstract values only (shapes, dtypes, Python ints), so they work
unchanged under ``jit`` and ``vmap`` and fail before any work is done.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_key(key, argname: str = "key") -> jax.Array:
    """Accepts a typed PRNG key (``jax.random.key``) or a raw ``uint32[2]`` key."""
    if key is None:
        raise TypeError(f"`{argname}` is required: pass a PRNG key, e.g. jax.random.key(0).")
    try:
        dtype = key.dtype
        shape = key.shape
    except AttributeError:
        raise TypeError(
            f"`{argname}` must be a JAX PRNG key (jax.random.key(seed)); got {type(key).__name__}."
        ) from None
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"`{argname}` must be a single PRNG key (shape ()); got a key array of shape "
                f"{shape}. To use many keys, jax.vmap over them."
            )
        return key
    if dtype == jnp.uint32 and shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"`{argname}` must be a JAX PRNG key (jax.random.key(seed)) or a raw uint32[2] key; "
        f"got an array of dtype {dtype} and shape {shape}."
    )


def check_positive_int(value, argname: str, minimum: int = 1) -> int:
    """A Python int >= ``minimum`` (static: it sets array shapes)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(
                f"`{argname}` must be a Python int >= {minimum}; got {value!r} "
                f"({type(value).__name__})."
            ) from None
    if value < minimum:
        raise ValueError(f"`{argname}` must be >= {minimum}; got {value}.")
    return value


def check_choice(value, argname: str, choices) -> str:
    if value not in choices:
        raise ValueError(
            f"`{argname}` must be one of {sorted(choices)}; got {value!r}."
        )
    return value


def check_float_tree(tree, argname: str) -> None:
    """Every leaf is an inexact (floating) array: Jacobians need a tangent space."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{argname}` has no array leaves.")
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`{argname}` must contain floating-point arrays (Jacobians are taken with "
                f"respect to it); found a leaf of dtype {dtype} and shape {jnp.shape(leaf)}. "
                f"Cast it, e.g. x.astype(jnp.float32)."
            )
