"""Weight initializers and the activation gain table (derivations §8, §9).

All initializers follow the Flax convention ``init(key, shape, dtype) -> array``
and Flax kernel layouts: a Dense kernel is ``(fan_in, fan_out)``, a convolution
kernel is ``HWIO`` = ``(*spatial, c_in, c_out)``. The fan-in of a kernel is the
product of all axes but the last, the number of output features is the last axis.

The gain table is the one of the reference code (``Initializer.gain``, derivations §9):
choosing ``gain² · φ_act = 1`` makes each weight+activation block have φ = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from gne_jax.linalg.qr import qr

Array = jax.Array
Initializer = Callable[..., Array]

# Gains of the reference code (GNEDNN_release, ops/initialization.py).
GAIN_NAMES = ("linear", "tanh", "relu", "prelu", "sprelu", "leaky_relu", "selu")


def activation_gain(name: str, negative_slope: float | None = None) -> float:
    """Weight gain that gives φ = 1 per weight+activation block (derivations §9).

    linear, tanh: 1; relu, prelu, sprelu: √2; leaky_relu with slope a: √(2/(1+a²));
    selu: 1, i.e. the weight variance 1/fan_in of the self-normalizing setup, for
    which the (depth-aware) SELU coefficients carry the gain (derivations §11; use
    ``gamma0 = gain²`` in :func:`gne_jax.nn.activations.selu_coefficients` when a
    different gain is wanted).

    Args:
      name: one of ``GAIN_NAMES``.
      negative_slope: the slope a, required for ``leaky_relu`` (the reference code
        defaults to 0.18; we require it explicitly to avoid silent mismatches).
    """
    if name in ("linear", "tanh", "selu"):
        return 1.0
    if name in ("relu", "prelu", "sprelu"):
        return math.sqrt(2.0)
    if name == "leaky_relu":
        if negative_slope is None:
            raise ValueError("activation_gain('leaky_relu') needs negative_slope=a (e.g. 0.18).")
        a = float(negative_slope)
        if not math.isfinite(a):
            raise ValueError(f"negative_slope must be finite, got {negative_slope!r}.")
        return math.sqrt(2.0 / (1.0 + a * a))
    raise ValueError(f"Unknown activation {name!r} for activation_gain; valid: {list(GAIN_NAMES)}.")


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"{what} needs a kernel shape with at least 2 axes (fan_in..., fan_out), got {shape}."
        )
    if any(s <= 0 for s in shape):
        raise ValueError(f"{what}: every axis of shape must be positive, got {shape}.")
    return shape


def _check_dtype(dtype, what: str):
    """A floating dtype: an integer kernel would round the draw to zeros."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what}: dtype must be a floating type (kernels are real-valued "
                        f"draws), got {jnp.dtype(dtype).name}.")
    return dtype


def _check_gain(gain: float, what: str) -> float:
    gain = float(gain)
    if not (math.isfinite(gain) and gain >= 0):
        raise ValueError(f"{what}: gain must be a finite number >= 0, got {gain!r}.")
    return gain


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Flax kernel: fan_in = ∏shape[:-1], fan_out = ∏spatial·shape[-1].

    For a Dense kernel (n, m) this is (n, m); for an HWIO conv kernel it is
    (k_h k_w c_in, k_h k_w c_out), the PyTorch convention.
    """
    shape = _check_shape(shape, "fans")
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


_MODES = ("fan_in", "fan_out", "fan_avg")


def _fan(shape, mode: str, what: str) -> float:
    fan_in, fan_out = fans(shape)
    if mode == "fan_in":
        return float(fan_in)
    if mode == "fan_out":
        return float(fan_out)
    if mode == "fan_avg":
        return (fan_in + fan_out) / 2.0
    raise ValueError(f"{what}: unknown mode {mode!r}; valid: {list(_MODES)}.")


def _scaled(draw, gain: float, mode: str, what: str) -> Initializer:
    """Initializer drawing ``draw(key, shape, dtype, std)`` with std = gain/√fan."""
    gain = _check_gain(gain, what)
    if mode not in _MODES:
        raise ValueError(f"{what}: unknown mode {mode!r}; valid: {list(_MODES)}.")

    def init(key, shape, dtype=jnp.float32):
        shape = _check_shape(shape, what)
        dtype = _check_dtype(dtype, what)
        return draw(key, shape, dtype, gain / math.sqrt(_fan(shape, mode, what)))

    return init


def _gaussian(gain: float, mode: str, what: str) -> Initializer:
    return _scaled(lambda k, s, d, std: std * jax.random.normal(k, s, d), gain, mode, what)


def _uniform(gain: float, mode: str, what: str) -> Initializer:
    # U(-b, b) has variance b²/3: b = √3·std gives variance gain²/fan.
    def draw(k, s, d, std):
        return jax.random.uniform(k, s, d, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)

    return _scaled(draw, gain, mode, what)


def kaiming_normal(gain: float = math.sqrt(2.0), mode: str = "fan_in") -> Initializer:
    """N(0, gain²/fan): He init; fan-in mode as in the reference code (std = gain/√fan_in)."""
    return _gaussian(gain, mode, "kaiming_normal")


def kaiming_uniform(gain: float = math.sqrt(2.0), mode: str = "fan_in") -> Initializer:
    """U(−b, b) with b = gain·√(3/fan), i.e. variance gain²/fan (default fan = fan_in)."""
    return _uniform(gain, mode, "kaiming_uniform")


def xavier_normal(gain: float = 1.0, mode: str = "fan_avg") -> Initializer:
    """N(0, gain²/fan) with Glorot's fan = (fan_in + fan_out)/2 by default.

    Note: the reference code has no Xavier init; ``mode="fan_in"`` makes this the
    fan-in rule std = gain/√fan_in of the reference's Kaiming init.
    """
    return _gaussian(gain, mode, "xavier_normal")


def xavier_uniform(gain: float = 1.0, mode: str = "fan_avg") -> Initializer:
    """U(−b, b), b = gain·√(3/fan), Glorot's fan = (fan_in + fan_out)/2 by default."""
    return _uniform(gain, mode, "xavier_uniform")


def _haar(key, n_rows: int, n_cols: int, dtype) -> Array:
    """Haar-distributed matrix with orthonormal columns (n_rows ≥ n_cols) or rows.

    QR of a Gaussian matrix with the signs of diag(R) folded into Q (Mezzadri 2007),
    which makes Q exactly Haar; computed in at least float32.
    """
    tall = n_rows >= n_cols
    big, small = (n_rows, n_cols) if tall else (n_cols, n_rows)
    cdtype = jnp.promote_types(dtype, jnp.float32)
    a = jax.random.normal(key, (big, small), cdtype)
    q, r = qr(a)  # batched on GPUs too (gne_jax.linalg.qr)
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q if tall else q.T


def orthogonal(gain: float = 1.0) -> Initializer:
    """gain × Haar-orthogonal kernel (derivations §8 row "orthogonal weight γO").

    The kernel is flattened to ``(fan_in, fan_out) = (∏shape[:-1], shape[-1])``. With
    ``W = kernelᵀ`` (m = fan_out outputs, n = fan_in inputs): for m ≤ n the rows of W
    are orthonormal (WWᵀ = gain²·I, φ = gain², ϕ = 0); for m > n its columns are
    (WᵀW = gain²·I). Same distribution as ``torch.nn.init.orthogonal_`` on the
    reference's ``(out, in·k·k)`` flattening. For conv kernels this orthogonalises the
    flattened kernel, not the convolution operator (use :func:`delta_orthogonal`).
    """
    gain = _check_gain(gain, "orthogonal")

    def init(key, shape, dtype=jnp.float32):
        shape = _check_shape(shape, "orthogonal")
        dtype = _check_dtype(dtype, "orthogonal")
        fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
        q = _haar(key, fan_in, fan_out, dtype)
        return (gain * q).reshape(shape).astype(dtype)

    return init


def delta_orthogonal(gain: float = 1.0, scale_by_fan_ratio: bool = False) -> Initializer:
    """Delta-orthogonal conv kernel (Xiao et al. 2018): orthogonal centre tap, zeros elsewhere.

    For an HWIO kernel the centre tap ``kernel[kh//2, kw//2]`` is a ``(c_in, c_out)``
    Haar block (orthonormal columns if c_in ≥ c_out, rows otherwise) times ``gain``;
    every other tap is 0, so the convolution acts per position as that matrix
    (φ = gain², ϕ = 0 for c_out ≤ c_in, derivations §8).

    Args:
      gain: overall scale.
      scale_by_fan_ratio: multiply by the extra √(c_out/c_in) of the reference code
        (``tensor.mul_(gain * sqrt(fan_out / fan_in))``); then φ = gain² for
        c_out ≥ c_in and gain²·c_out/c_in for c_out < c_in (derivations §8). Off by default.
    """
    gain = _check_gain(gain, "delta_orthogonal")

    def init(key, shape, dtype=jnp.float32):
        shape = _check_shape(shape, "delta_orthogonal")
        dtype = _check_dtype(dtype, "delta_orthogonal")
        if len(shape) < 3:
            raise ValueError(
                f"delta_orthogonal needs a conv kernel (*spatial, c_in, c_out), got {shape}."
            )
        c_in, c_out = shape[-2], shape[-1]
        scale = gain * (math.sqrt(c_out / c_in) if scale_by_fan_ratio else 1.0)
        centre = tuple(s // 2 for s in shape[:-2])
        q = _haar(key, c_in, c_out, dtype) * scale
        return jnp.zeros(shape, dtype).at[centre].set(q.astype(dtype))

    return init


_REGISTRY: dict[str, Callable[..., Initializer]] = {
    "kaiming_normal": kaiming_normal,
    "kaiming_uniform": kaiming_uniform,
    "xavier_normal": xavier_normal,
    "xavier_uniform": xavier_uniform,
    "orthogonal": orthogonal,
    "delta_orthogonal": delta_orthogonal,
}
INITIALIZERS = tuple(_REGISTRY)


def get_initializer(name: str, gain: float | None = None, **kwargs) -> Initializer:
    """Initializer by name; ``gain=None`` uses each initializer's default gain.

    Valid names: ``INITIALIZERS``. Extra keyword arguments go to the factory
    (e.g. ``mode="fan_avg"``, ``scale_by_fan_ratio=True``).
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown initializer {name!r}; valid: {list(INITIALIZERS)}.")
    factory = _REGISTRY[name]
    try:
        return factory(**kwargs) if gain is None else factory(gain=gain, **kwargs)
    except TypeError as e:
        raise ValueError(f"Bad arguments for initializer {name!r}: {e}") from None
