"""Theory side of gne_jax: predicted φ(JJᵀ) and ϕ(JJᵀ) beside measurements.

* `components`: the component library of derivations §8 (dense/conv/orthogonal
  weights, activations incl. Gauss–Hermite for smooth ones, normalizations, ...);
* `compose`: serial/parallel/residual composition nested to any depth with the
  forward second-moment map (`Serial`, `Parallel`, `Residual`, `Repeat`, `predict`);
* `predict_model` (module `model_predict`): predictions from the library's own model configs;
* companion results, by topic: `resnet_spectrum` (the universal ResNet Jacobian spectrum),
  `bn_isometry` (batch norm's isometry gap and gradient growth), `log_norms` (log-normal
  gradient norms of deep chains), `sample_variance` (within-sample variance decay);
* `compare`: predicted vs measured table with z-scores (and a plot).

Light to import: numpy/jax only (matplotlib and the models load lazily).
"""

from gne_jax.theory import (  # noqa: F401
    bn_isometry,
    components,
    compose,
    log_norms,
    resnet_spectrum,
    sample_variance,
)
from gne_jax.theory.compare import (  # noqa: F401
    Comparison,
    PooledMoments,
    compare,
    pool_inits,
)
from gne_jax.theory.components import *  # noqa: F401,F403
from gne_jax.theory.compose import (  # noqa: F401
    Concat,
    Parallel,
    Prediction,
    Repeat,
    Residual,
    Serial,
    per_block,
    predict,
)


def selu_coefficients(epsilon, gamma0=1.0, q=1.0, *, tol=1e-10):
    """(λ, α) of the depth-aware SELU (derivations §11), solved by `gne_jax.nn.activations`."""
    from gne_jax.nn.activations import selu_coefficients as _solve  # lazy: pulls in flax

    return _solve(epsilon, gamma0, q, tol=tol)


def depth_aware_selu(epsilon, gamma0=1.0, q=1.0):
    """SELU component with the depth-aware (λ, α) for (ε, γ₀, q): block φ = 1 + ε at v = qγ₀."""
    lam, alpha = selu_coefficients(epsilon, gamma0, q)
    return components.selu(lam, alpha)


_LAZY = ("predict_model", "model_network", "ModelPrediction", "SUPPORTED_MODELS")


def __getattr__(name):  # predict_model pulls in the models (flax); load on first use
    if name in _LAZY:
        from gne_jax.theory import model_predict as _p

        return getattr(_p, name)
    raise AttributeError(f"module 'gne_jax.theory' has no attribute {name!r}")
