"""Orbax checkpoints of the training state, refusing to save non-finite states.

A checkpoint holds the whole train state (step, params, batch statistics,
optimizer state, the running sums of the current epoch's metrics) plus a small
JSON record. ``save`` checks that every floating leaf is finite first, so a
diverged run never replaces its last good checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or parameter; the last good checkpoint is kept."""


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: PyTree) -> bool:
    """True when every floating-point leaf of ``tree`` is finite (one jitted reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return True if not leaves else bool(_all_finite(leaves))


class Checkpointer:
    """Saves/restores ``(state, meta)`` under ``<workdir>/checkpoints`` with Orbax."""

    def __init__(self, workdir: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: PyTree, meta: dict) -> None:
        """Saves ``state`` at ``step``; raises :class:`NonFiniteError` instead of saving NaNs."""
        if not all_finite(state):
            raise NonFiniteError(
                f"the train state at step {step} holds non-finite values; not saved. The last "
                f"good checkpoint (step {self.latest_step()}) in {self.directory} is kept."
            )
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, state_like: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
        """Restores the checkpoint at ``step`` (latest by default) into ``state_like``'s layout.

        ``state_like=None`` restores the saved tree as host arrays (for inspection).
        """
        step = self.latest_step() if step is None else step
        abstract = (None if state_like is None
                    else jax.tree.map(ocp.utils.to_shape_dtype_struct, state_like))
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    meta=ocp.args.JsonRestore()),
        )
        return out.state, dict(out.meta)

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
