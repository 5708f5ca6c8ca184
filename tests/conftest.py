"""Test-wide settings.

Accelerators run float32 matrix products at reduced precision by default (TF32 passes on
NVIDIA GPUs, bfloat16 passes on TPUs: relative errors ~1e-3). The tests compare estimates
with exact answers at float32 tolerances (1e-4 to 1e-6), so on an accelerator they ask for
full float32 products; on the CPU, float32 products are full precision already and nothing
changes. (Measured on an H200 with the default precision: 11 of 78 probe, estimator and
Lanczos tests missed their float32 tolerances; docs/probes.md, "Precision on accelerators".)
"""

import jax

if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
