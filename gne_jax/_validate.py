"""Argument checks shared by the public entry points.

They run on abstract values only (shapes, dtypes, Python ints), so they work
unchanged under ``jit`` and ``vmap`` and fail before any work is done.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gne_jax._tree import leaf_dtype


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


@functools.cache
def _dtype_kind(dtype) -> str:
    """``"complex"``, ``"real"`` (floating) or ``"other"``, once per dtype."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return "complex"
    return "real" if jnp.issubdtype(dtype, jnp.inexact) else "other"


def check_float_tree(tree, argname: str) -> None:
    """Every leaf is an inexact (floating) array: Jacobians need a tangent space."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"`{argname}` has no array leaves.")
    for leaf in leaves:
        dtype = leaf_dtype(leaf)
        if _dtype_kind(dtype) == "other":
            raise TypeError(
                f"`{argname}` must contain floating-point arrays (Jacobians are taken with "
                f"respect to it); found a leaf of dtype {dtype} and shape {jnp.shape(leaf)}. "
                f"Cast it, e.g. x.astype(jnp.float32)."
            )


def _leaf_finite(leaf) -> bool:
    """On the host for NumPy and CPU arrays; on its device otherwise (one bool comes back,
    not the array)."""
    if not isinstance(leaf, jax.Array) or all(d.platform == "cpu" for d in leaf.devices()):
        return bool(np.isfinite(np.asarray(leaf)).all())
    return bool(jnp.isfinite(leaf).all())


def check_finite_tree(tree, argname: str) -> None:
    """Raise ``FloatingPointError`` naming ``argname`` if a concrete floating leaf holds a
    NaN or inf (read on the host: no program is compiled; traced leaves are skipped)."""
    from gne_jax._tree import is_concrete

    for leaf in jax.tree.leaves(tree):
        if (hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
                and is_concrete(leaf) and not _leaf_finite(leaf)):
            raise FloatingPointError(
                f"`{argname}` contains NaN or inf (a leaf of shape {tuple(jnp.shape(leaf))}).")


def check_input_tree(tree, argname: str) -> None:
    """A real floating-point pytree with at least one element (Jacobians of it are defined).

    Complex leaves are refused (φ is defined here for real Jacobians; split real and
    imaginary parts into two real inputs), and so are empty inputs (no Jacobian to probe).
    """
    check_float_tree(tree, argname)
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = leaf_dtype(leaf)
        if _dtype_kind(dtype) == "complex":
            raise TypeError(
                f"`{argname}` has a complex leaf (dtype {dtype}, shape {jnp.shape(leaf)}): the "
                f"moments are defined for real Jacobians. Pass the real and imaginary parts "
                f"as two real arrays."
            )
        total += math.prod(np.shape(leaf))
    if total == 0:
        raise ValueError(
            f"`{argname}` is empty (zero elements, shapes "
            f"{[tuple(jnp.shape(a)) for a in jax.tree.leaves(tree)]}): there is no Jacobian "
            f"to probe."
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIPPED_FRAMES = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(jax.__file__)) + os.sep,
                   os.path.abspath(functools.__file__))


def warn_deprecated(message: str) -> None:
    """A ``DeprecationWarning`` attributed to the caller's line that called into gne_jax,
    however deep inside the package (or JAX's transformations, a ``functools.partial``) it
    is raised (Python's default filters show a DeprecationWarning only when that line is
    in ``__main__``: a script, a notebook)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED_FRAMES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def renamed_argument(new_value, old_value, *, new: str, old: str, default):
    """Resolves a renamed keyword: the old name still works, with a ``DeprecationWarning``.

    ``new_value`` is ``None`` when the caller did not pass the new name (its default is
    ``default``); passing both names is an error.
    """
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"pass `{new}` only (`{old}` is its deprecated former name), not both.")
    warn_deprecated(f"`{old}` is deprecated and will be removed in the next release; use `{new}`.")
    return old_value


def legacy_key(like, legacy, key, *, like_name: str = "like"):
    """``(like, key)`` from a call in the new ``f(op, like, *, key=...)`` form or the old
    positional ``f(op, key, like)`` form (kept one release, with a ``DeprecationWarning``);
    ``like`` is checked to be a non-empty pytree of real floating arrays.
    """
    if legacy is not None:
        if key is not None:
            raise TypeError(f"pass `key` by keyword only: f(..., {like_name}, key=key).")
        warn_deprecated(
            f"passing `key` positionally before `{like_name}` is deprecated and will be removed "
            f"in the next release; call f(..., {like_name}, key=key).")
        like, key = legacy, like
    check_operator_space(like, like_name)
    return like, key


def check_operator_space(like, argname: str = "like") -> None:
    """``like`` gives the shapes and dtype of an operator's vectors: real floating, not empty."""
    leaves = jax.tree.leaves(like)
    for leaf in leaves:
        dtype = leaf_dtype(leaf)
        if _dtype_kind(dtype) != "real":
            raise TypeError(
                f"`{argname}` must hold real floating-point arrays (the operator's vectors are "
                f"drawn shaped and typed like it); found a leaf of dtype {dtype} and shape "
                f"{jnp.shape(leaf)}. Cast it, e.g. like.astype(jnp.float32).")
    if sum(math.prod(np.shape(leaf)) for leaf in leaves) == 0:
        raise ValueError(f"`{argname}` has no elements (shapes "
                         f"{[tuple(jnp.shape(a)) for a in leaves]}): there is no vector space.")


def square_matvec(matvec, like, argname: str = "matvec"):
    """``matvec``, checking when it is traced that it maps a vector shaped like ``like`` to
    one of the same tree and shapes (a square operator): a wrong operator is named before
    anything is compiled, not in a shape error from deep inside the estimator."""

    def checked(v):
        out = matvec(v)
        shapes = [tuple(jnp.shape(a)) for a in jax.tree.leaves(out)]
        want = [tuple(jnp.shape(a)) for a in jax.tree.leaves(like)]
        if jax.tree.structure(out) != jax.tree.structure(like) or shapes != want:
            raise ValueError(
                f"`{argname}` must map a vector shaped like `like` to one of the same shapes "
                f"(a square operator); it maps shapes {want} to {shapes}.")
        return out

    return checked
