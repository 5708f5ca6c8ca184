"""Probes: Jacobian operators and the estimators of their normalized moments.

* `jacobian`: jvp/vjp closures of a pure function (``J v``, ``Jᵀ u``);
* `stochtrace`: probe samplers and trace estimators (Hutchinson, Hutch++);
* `moments`: φ(JJᵀ), φ((JJᵀ)²) and the spread ϕ with standard errors;
* `blocks`: the block structure models expose (``Block``, ``BlockGroup``);
* `block_moments`: the moments of every block of a chain, and end to end;
* `ensemble`: the same over many random initializations (vmapped, chunked, sharded);
* `sweep`: ensembles over a grid of model variants;
* `job`: the probe job behind ``python -m gne_jax.probe`` (tables, CSV, plots).
"""
