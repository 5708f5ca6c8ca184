"""gne_jax: gradient norm equality probes, theory and layers for JAX/Flax.

The public API, grouped by the sub-package that owns it:

* `gne_jax.probes`: Jacobian operators, trace estimators, φ/ϕ moments, per-block
  moments, ensembles over initializations, sweeps;
* `gne_jax.linalg`: Lanczos and spectral densities (stochastic Lanczos quadrature);
* `gne_jax.curvature`: Hessian and Gauss–Newton traces, eigenvalues and densities;
* `gne_jax.nn`: initializers, activations and normalization layers;
* `gne_jax.models`: the model zoo, each model exposing its blocks;
* `gne_jax.theory`: predicted moments beside measurements;
* `gne_jax.training`: the training loop (needs the ``[train]`` extra; not imported here).

Imports stay light (no TensorFlow, no plotting) so that ``import gne_jax`` is fast.
"""

__version__ = "0.1.0"

# --- probes ------------------------------------------------------------------
from gne_jax.probes.jacobian import JacobianOperators, jacobian_operators
from gne_jax.probes.moments import JacobianMoments, jacobian_moments
from gne_jax.probes.stochtrace import TraceEstimate, hutchinson, hutchpp
from gne_jax.probes.blocks import Block, BlockGroup, compose_blocks, iter_blocks
from gne_jax.probes.block_moments import BlockMoments, block_moments, chain_blocks, groups_moments
from gne_jax.probes.ensemble import (
    EnsemblePlan,
    ensemble_block_moments,
    ensemble_summary,
    plan_ensemble,
    run_plan,
)
from gne_jax.probes.sweep import compile_plans, result_rows, run_sweep
from gne_jax.probes.log_norms import LogNorms, log_norms
from gne_jax.probes.forward_stats import (
    ForwardStats,
    forward_stats,
    groups_forward_stats,
    scan_group,
    second_moment,
    within_sample_fraction,
)

# --- linear algebra and curvature ---------------------------------------------
from gne_jax.linalg.lanczos import EigenResult, LanczosResult, eigh_extreme, lanczos_tridiag
from gne_jax.linalg.spectral import (
    SpectralDensity,
    jacobian_spectral_density,
    smooth_density,
    spectral_density,
    trace_function,
)
from gne_jax.curvature import (
    GroupTraces,
    gauss_newton_matvec,
    group_traces,
    hessian_density,
    hessian_eigenpairs,
    hessian_group_traces,
    hessian_matvec,
    hessian_trace,
)

# --- layers and models ---------------------------------------------------------
from gne_jax.nn.activations import (
    ACTIVATIONS,
    PReLU,
    SPReLU,
    get_activation,
    selu_coefficients,
    shaped_activation,
)
from gne_jax.nn.initializers import (
    INITIALIZERS,
    activation_gain,
    delta_orthogonal,
    get_initializer,
    orthogonal,
)
from gne_jax.nn.normalization import (
    CenteredConv,
    CenteredDense,
    MeanOnlyBatchNorm,
    MeterezBatchNorm,
    ScaledWSConv,
    ScaledWSDense,
    SecondMomentNorm,
    WeightNormConv,
    WeightNormDense,
)
from gne_jax.models import MODEL_NAMES, create_model, default_config

# --- theory (numpy/jax only; models and plots load lazily) ---------------------
from gne_jax import theory

# --- calibration to Block Dynamical Isometry, and its baselines -----------------
from gne_jax.calibration import (
    CalibrationReport,
    calibrate,
    lsuv,
    orthogonal_gain_config,
    plot_calibration,
)

__all__ = [
    # probes
    "JacobianOperators", "jacobian_operators",
    "JacobianMoments", "jacobian_moments",
    "TraceEstimate", "hutchinson", "hutchpp",
    "Block", "BlockGroup", "compose_blocks", "iter_blocks",
    "BlockMoments", "block_moments", "chain_blocks", "groups_moments",
    "EnsemblePlan", "ensemble_block_moments", "ensemble_summary", "plan_ensemble", "run_plan",
    "compile_plans", "result_rows", "run_sweep",
    "LogNorms", "log_norms",
    "ForwardStats", "forward_stats", "groups_forward_stats", "scan_group", "second_moment",
    "within_sample_fraction",
    # linear algebra and curvature
    "EigenResult", "LanczosResult", "eigh_extreme", "lanczos_tridiag",
    "SpectralDensity", "jacobian_spectral_density", "smooth_density", "spectral_density",
    "trace_function",
    "GroupTraces", "gauss_newton_matvec", "group_traces", "hessian_density", "hessian_eigenpairs",
    "hessian_group_traces", "hessian_matvec", "hessian_trace",
    # layers and models
    "ACTIVATIONS", "PReLU", "SPReLU", "get_activation", "selu_coefficients", "shaped_activation",
    "INITIALIZERS", "activation_gain", "delta_orthogonal", "get_initializer", "orthogonal",
    "CenteredConv", "CenteredDense", "MeanOnlyBatchNorm", "MeterezBatchNorm", "ScaledWSConv",
    "ScaledWSDense", "SecondMomentNorm", "WeightNormConv", "WeightNormDense",
    "MODEL_NAMES", "create_model", "default_config",
    # theory
    "theory",
    # calibration
    "CalibrationReport", "calibrate", "lsuv", "orthogonal_gain_config", "plot_calibration",
]
