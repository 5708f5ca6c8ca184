"""The persistent XLA compilation cache the command lines share.

``enable_compilation_cache()`` points ``jax_compilation_cache_dir`` at
``$GNE_JAX_CACHE_DIR`` (default ``~/.cache/gne_jax/xla``), so a re-run of a config, or a
run that shares programs with an earlier one, loads compiled programs from disk instead
of compiling them again. ``GNE_JAX_CACHE_DIR=''`` turns the cache off.
"""

from __future__ import annotations

import os

DEFAULT_DIR = os.path.join("~", ".cache", "gne_jax", "xla")


def cache_dir() -> str | None:
    """The cache directory from ``GNE_JAX_CACHE_DIR`` (None when set to the empty string)."""
    value = os.environ.get("GNE_JAX_CACHE_DIR")
    if value is None:
        value = DEFAULT_DIR
    return os.path.expanduser(value) if value else None


def enable_compilation_cache(min_compile_time_s: float = 1.0) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None: off).

    Programs that took at least ``min_compile_time_s`` to compile are written.
    """
    import jax  # noqa: PLC0415

    path = cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path
