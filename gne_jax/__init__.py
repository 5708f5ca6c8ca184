"""gne_jax: gradient norm equality probes, theory and layers for JAX/Flax.

Each section below is owned by one part of the library; keep imports light
(no TensorFlow, no plotting) so that ``import gne_jax`` stays fast.
"""

__version__ = "0.1.0"

# --- probes: Jacobian operators, trace estimators, moments (issue 2) ---------
from gne_jax.jacobian import JacobianOperators, jacobian_operators  # noqa: F401
from gne_jax.moments import JacobianMoments, jacobian_moments  # noqa: F401
from gne_jax.stochtrace import TraceEstimate, hutchinson, hutchpp  # noqa: F401

# --- block structure (shared by models and per-block probes) ----------------
from gne_jax.blocks import Block, BlockGroup, compose_blocks, iter_blocks  # noqa: F401

# --- layers and models (issue 3) ---------------------------------------------
from gne_jax.activations import (  # noqa: F401
    ACTIVATIONS,
    PReLU,
    SPReLU,
    get_activation,
    selu_coefficients,
    shaped_activation,
)
from gne_jax.initializers import (  # noqa: F401
    INITIALIZERS,
    activation_gain,
    delta_orthogonal,
    get_initializer,
    orthogonal,
)
from gne_jax.normalization import (  # noqa: F401
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
from gne_jax.models import MODEL_NAMES, create_model, default_config  # noqa: F401

# --- per-block moments, ensembles, sweeps (issue 4) --------------------------
from gne_jax.block_moments import (  # noqa: F401
    BlockMoments,
    block_moments,
    chain_blocks,
    groups_moments,
)
from gne_jax.ensemble import (  # noqa: F401
    EnsemblePlan,
    ensemble_block_moments,
    ensemble_summary,
    plan_ensemble,
    run_plan,
)
from gne_jax.sweep import compile_plans, result_rows, run_sweep  # noqa: F401

# --- theory (issue 5): use `gne_jax.theory` ----------------------------------
from gne_jax import theory  # noqa: F401,E402  (numpy/jax only; models and plots load lazily)

# --- spectra and curvature (issue 6) -----------------------------------------
from gne_jax.lanczos import EigenResult, LanczosResult, eigh_extreme, lanczos_tridiag  # noqa: F401
from gne_jax.spectral import (  # noqa: F401
    SpectralDensity,
    jacobian_spectral_density,
    smooth_density,
    spectral_density,
    trace_function,
)
from gne_jax.curvature import (  # noqa: F401
    GroupTraces,
    gauss_newton_matvec,
    hessian_density,
    hessian_eigenpairs,
    hessian_group_traces,
    hessian_matvec,
    hessian_trace,
)
