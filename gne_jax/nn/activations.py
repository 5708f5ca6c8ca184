"""Activations of the GNE paper and its companions (derivations §8, §9, §11, §14.2).

``get_activation(name, **params)`` returns

* a pure function ``x -> f(x)`` for fixed activations, or
* for learned ones (``LEARNED_ACTIVATIONS``: prelu, sprelu) a **module factory**:
  call it with no arguments inside a ``@nn.compact`` method to get a fresh Flax
  module (its own slope parameter), e.g. ``get_activation("prelu")()(x)``.

:class:`Activation` wraps both cases in one Flax module, so a model can always
write ``Activation("relu")(x)`` or ``Activation("prelu")(x)``.

The depth-aware SELU coefficients come from :func:`selu_coefficients`, a pure
function of (ε, γ₀, q) solving derivations §11.1 (i)–(ii); it is the one implementation
shared with :mod:`gne_jax.theory`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ACTIVATIONS = (
    "linear",
    "relu",
    "leaky_relu",
    "prelu",
    "sprelu",
    "tanh",
    "sigmoid",
    "selu",
    "selu_depth_aware",
    "shaped_tanh",
    "shaped_sin",
)
LEARNED_ACTIVATIONS = ("prelu", "sprelu")

# Parameters each activation accepts in get_activation (required ones have no default).
_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {},
    "relu": {},
    "leaky_relu": {"negative_slope": None},
    "prelu": {"slope_init": 0.25},
    "sprelu": {"slope_init": 0.25},
    "tanh": {},
    "sigmoid": {},
    "selu": {},
    "selu_depth_aware": {"epsilon": None, "gamma0": 1.0, "q": 1.0},
    "shaped_tanh": {"layer_index": None, "exponent": None},
    "shaped_sin": {"layer_index": None, "exponent": None},
}

# Original SELU constants (Klambauer et al. 2017).
SELU_LAMBDA = 1.0507009873554805
SELU_ALPHA = 1.6732632423543772


# ----------------------------------------------------------------------------
# Depth-aware SELU (derivations §11)
# ----------------------------------------------------------------------------


def _e2v_phi(v: float, k: float) -> float:
    """e^{k²v/2}·Φ(−k√v), computed as exp(k²v/2 + log Φ(−k√v)) to avoid overflow."""
    from scipy.special import log_ndtr

    return float(np.exp(k * k * v / 2.0 + log_ndtr(-k * math.sqrt(v))))


def selu_derivative_moment(lam: float, alpha: float, v: float) -> float:
    """E[selu'(x)²] for x ~ N(0, v): λ²/2 + λ²α² e^{2v} Φ(−2√v) (derivations §8, §11.1 (i))."""
    return lam**2 / 2.0 + lam**2 * alpha**2 * _e2v_phi(v, 2.0)


def selu_second_moment(lam: float, alpha: float, v: float) -> float:
    """E[selu(x)²] for x ~ N(0, v) (derivations §11.1 (ii)).

    λ²[α²(e^{2v}Φ(−2√v) − 2e^{v/2}Φ(−√v) + ½) + v/2].
    """
    return lam**2 * (alpha**2 * (_e2v_phi(v, 2.0) - 2.0 * _e2v_phi(v, 1.0) + 0.5) + v / 2.0)


def selu_coefficients(
    epsilon: float, gamma0: float = 1.0, q: float = 1.0, *, tol: float = 1e-10
) -> tuple[float, float]:
    """(λ, α) of the depth-aware SELU: solve derivations §11.1 (i)–(ii) with v = q·γ₀.

    (i)  γ₀·E[selu'(x)²] = 1 + ε       (each block has φ = 1 + ε)
    (ii) E[selu(x)²]     = q            (forward second-moment fixed point)
    for x ~ N(0, v). Solved with ``scipy.optimize.fsolve`` from (1, 1) as in the
    reference code (``ops/neurons.py::SeLUv2``), then checked: a residual above
    ``tol`` or a non-positive root raises ``ValueError``. Pure (no JAX tracing).

    Examples (derivations §11.2): ε = 0.0716 → (1.0506, 1.6738); ε = 0.07157 recovers the
    original SELU (1.0507, 1.6732); γ₀ = 2, ε = 0.03 → (0.9441, 0.7803).

    Args:
      epsilon: per-block excess of φ, > −1 (typically ~c/depth, derivations §11.3).
      gamma0: gain² of the preceding weights (weight variance × fan-in), > 0.
      q: fixed point of the SELU output second moment, > 0.
    """
    epsilon, gamma0, q = float(epsilon), float(gamma0), float(q)
    if not (math.isfinite(epsilon) and epsilon > -1.0):
        raise ValueError(f"selu_coefficients: epsilon must be finite and > -1, got {epsilon}.")
    if not (math.isfinite(gamma0) and gamma0 > 0):
        raise ValueError(f"selu_coefficients: gamma0 must be finite and > 0, got {gamma0}.")
    if not (math.isfinite(q) and q > 0):
        raise ValueError(f"selu_coefficients: q must be finite and > 0, got {q}.")
    return _solve_selu(epsilon, gamma0, q, float(tol))


@functools.lru_cache(maxsize=256)  # pure in its arguments; models may call it per layer
def _solve_selu(epsilon: float, gamma0: float, q: float, tol: float) -> tuple[float, float]:
    from scipy.optimize import fsolve

    v = q * gamma0

    def residual(z):
        lam, alpha = z
        return [
            gamma0 * selu_derivative_moment(lam, alpha, v) - (1.0 + epsilon),
            selu_second_moment(lam, alpha, v) / q - 1.0,
        ]

    (lam, alpha), info, ier, msg = fsolve(residual, [1.0, 1.0], full_output=True, xtol=1e-13)
    res = float(np.max(np.abs(residual([lam, alpha]))))
    if not (res < tol and lam > 0 and alpha > 0):
        raise ValueError(
            "selu_coefficients: no positive solution (λ, α) found for "
            f"epsilon={epsilon}, gamma0={gamma0}, q={q} (residual {res:.2e}, "
            f"λ={lam:.4g}, α={alpha:.4g}; fsolve: {msg.strip()}). Try a smaller epsilon."
        )
    return float(lam), float(alpha)


def selu_with(lam: float, alpha: float) -> Callable[[Array], Array]:
    """x ↦ λ·elu_α(x) = λx for x > 0, λα(eˣ − 1) otherwise."""

    def selu_fn(x):
        return lam * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0)))

    return selu_fn


# ----------------------------------------------------------------------------
# Shaped activations of Meterez et al. (derivations §14.2)
# ----------------------------------------------------------------------------

SHAPED = {"tanh": jnp.tanh, "sin": jnp.sin}


def shaped_gain(layer_index, exponent):
    """α_ℓ = ℓ^(−p) for the 1-based layer index ℓ (Meterez et al. use p = 0.4).

    Works on traced ``layer_index`` too (e.g. inside ``lax.scan``); concrete values
    are checked (ℓ ≥ 1).
    """
    if not isinstance(layer_index, jax.core.Tracer) and np.any(np.asarray(layer_index) < 1):
        raise ValueError(f"layer_index must be >= 1 (1-based), got {layer_index}.")
    if not isinstance(exponent, jax.core.Tracer) and not np.all(np.isfinite(exponent)):
        raise ValueError(f"exponent must be finite, got {exponent}.")
    return jnp.asarray(layer_index, jnp.float32) ** (-jnp.asarray(exponent, jnp.float32))


def shaped_activation(name: str, layer_index, exponent: float) -> Callable[[Array], Array]:
    """x ↦ σ(α_ℓ·x) with σ ∈ {tanh, sin} and α_ℓ = ℓ^(−exponent) (derivations §14.2).

    As α_ℓ → 0 the activation tends to the identity (σ(0) = 0, σ'(0) = 1).
    """
    if name not in SHAPED:
        raise ValueError(f"Unknown shaped activation {name!r}; valid: {list(SHAPED)}.")
    sigma = SHAPED[name]
    gain = shaped_gain(layer_index, exponent)

    def fn(x):
        return sigma(gain.astype(x.dtype) * x)

    return fn


# ----------------------------------------------------------------------------
# Learned activations
# ----------------------------------------------------------------------------


class PReLU(nn.Module):
    """PReLU: x for x > 0, a·x otherwise; one learned slope ``a`` (init 0.25).

    ``per_channel=True`` learns one slope per feature (last axis) instead of the
    single shared slope of ``torch.nn.PReLU()`` used by the reference code.
    """

    slope_init: float = 0.25
    per_channel: bool = False
    param_dtype: Any = jnp.float32

    def _slope(self, x):
        shape = (x.shape[-1],) if self.per_channel else ()
        a = self.param(
            "negative_slope", nn.initializers.constant(self.slope_init), shape, self.param_dtype
        )
        return jnp.asarray(a, x.dtype)

    @nn.compact
    def __call__(self, x):
        a = self._slope(x)
        return jnp.where(x >= 0, x, a * x)


class SPReLU(PReLU):
    """Scaled PReLU: PReLU_a(x)/√(1 + a²) (reference ``ops/neurons.py::sPReLU``).

    φ = ½ at p = ½ for every slope a (derivations §8). The reference's ``clamp(0, 0.5)``
    is not in place and so has no effect; we do not clamp either.
    """

    @nn.compact
    def __call__(self, x):
        a = self._slope(x)
        return jnp.where(x >= 0, x, a * x) / jnp.sqrt(1.0 + a * a)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


def _leaky(negative_slope):
    negative_slope = float(negative_slope)
    if not math.isfinite(negative_slope):
        raise ValueError(f"leaky_relu: negative_slope must be finite, got {negative_slope}.")
    return functools.partial(jax.nn.leaky_relu, negative_slope=negative_slope)


def _linear(x):
    return x


def get_activation(name: str, **params) -> Callable:
    """Activation by name (see ``ACTIVATIONS``); parameters as keyword arguments.

    =================  ==========================================  ==================
    name               parameters                                  returns
    =================  ==========================================  ==================
    linear, relu,      –                                           function
    tanh, sigmoid,
    selu (original)
    leaky_relu         negative_slope (required)                   function
    prelu, sprelu      slope_init=0.25, per_channel=False          module factory
    selu_depth_aware   epsilon (required), gamma0=1, q=1           function
    shaped_tanh/sin    layer_index (1-based), exponent p           function σ(ℓ^(−p)x)
    =================  ==========================================  ==================
    """
    if name not in _PARAMS:
        raise ValueError(f"Unknown activation {name!r}; valid: {list(ACTIVATIONS)}.")
    accepted = dict(_PARAMS[name])
    if name in LEARNED_ACTIVATIONS:
        accepted["per_channel"] = False
    unknown = set(params) - set(accepted)
    if unknown:
        raise ValueError(
            f"Activation {name!r} got unexpected parameter(s) {sorted(unknown)}; "
            f"accepted: {sorted(accepted) or 'none'}."
        )
    missing = [k for k, d in accepted.items() if d is None and k not in params]
    if missing:
        raise ValueError(f"Activation {name!r} needs parameter(s) {missing}.")
    p = {**accepted, **params}

    if name == "linear":
        return _linear
    if name == "relu":
        return jax.nn.relu
    if name == "leaky_relu":
        return _leaky(p["negative_slope"])
    if name == "tanh":
        return jnp.tanh
    if name == "sigmoid":
        return jax.nn.sigmoid
    if name == "selu":
        return jax.nn.selu
    if name == "selu_depth_aware":
        return selu_with(*selu_coefficients(p["epsilon"], p["gamma0"], p["q"]))
    if name in ("shaped_tanh", "shaped_sin"):
        return shaped_activation(name.split("_")[1], p["layer_index"], p["exponent"])
    module = PReLU if name == "prelu" else SPReLU
    return functools.partial(
        module, slope_init=float(p["slope_init"]), per_channel=bool(p["per_channel"])
    )


def is_learned(name: str) -> bool:
    """True if ``get_activation(name)`` returns a module factory (learned parameters)."""
    if name not in _PARAMS:
        raise ValueError(f"Unknown activation {name!r}; valid: {list(ACTIVATIONS)}.")
    return name in LEARNED_ACTIVATIONS


class Activation(nn.Module):
    """Any activation of ``ACTIVATIONS`` as a Flax module: ``Activation("relu")(x)``.

    ``params`` are the keyword arguments of :func:`get_activation` (a dict, or a
    tuple of (key, value) pairs). Learned activations create their module as a child
    named after the activation ("prelu"/"sprelu").
    """

    kind: str
    params: Any = None

    @nn.compact
    def __call__(self, x):
        kw = dict(self.params or {})
        act = get_activation(self.kind, **kw)
        if is_learned(self.kind):
            return act(name=self.kind)(x)
        return act(x)
