"""Normalization layers of the GNE paper and its companions (derivations §10, §12, §14.2).

Batch-statistic layers (:class:`SecondMomentNorm`, :class:`MeanOnlyBatchNorm`,
:class:`MeterezBatchNorm`) follow ``flax.linen.BatchNorm``'s conventions:

* ``use_running_average`` as a field or call argument (``nn.merge_param``);
* statistics per feature (``axis``, default the last) over every other axis, in at
  least float32; ``axis_name`` / ``axis_index_groups`` average them across devices
  with one ``lax.pmean`` (``pmap``/``shard_map``/``vmap``; under SPMD ``jit`` the
  statistics are global automatically);
* running statistics in the ``batch_stats`` collection, updated as
  ``ra = momentum·ra + (1 − momentum)·batch`` only in training mode, only when
  ``batch_stats`` is mutable (``apply(..., mutable=["batch_stats"])``) and never
  during ``init``. ``momentum = 0.9`` matches the reference's PyTorch momentum 0.1.

Weight-reparametrizing layers (:class:`ScaledWSConv`, :class:`ScaledWSDense`,
:class:`CenteredConv`, :class:`WeightNormConv`, :class:`WeightNormDense`) are
``flax.linen.Conv``/``Dense`` whose stored ``kernel`` V is mapped to the effective
kernel W in every forward pass; their parameter layout is that of the base layer
(plus ``scale`` for weight norm). Per-output-filter statistics run over all kernel
axes but the last (Flax layouts: Dense ``(in, out)``, Conv ``HWIO``).

Flax's ``nn.BatchNorm`` is used as is (re-exported here as :data:`BatchNorm`);
dropout, average pooling and concatenation are plain Flax/JAX operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Axes = int | tuple[int, ...]

BatchNorm = nn.BatchNorm  # standard BN, used as is (derivations §8 row "Batch norm")

SMN_VARIANTS = ("l2", "l1")


def _canonicalize_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an input with {ndim} dimensions.")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def _split_axes(x: Array, axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
    if x.ndim < 2:
        raise ValueError(
            f"Batch normalization layers need an input with a batch axis and a feature axis, "
            f"got shape {x.shape}."
        )
    feature_axes = _canonicalize_axes(x.ndim, axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = [x.shape[a] for a in feature_axes]
    return feature_axes, reduction_axes, feature_shape


def _stat_dtype(x: Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def _batch_mean(module: nn.Module, values: Array, reduction_axes: tuple[int, ...]) -> Array:
    """Per-feature mean over ``reduction_axes``, averaged over ``axis_name`` devices."""
    m = jnp.mean(values.astype(_stat_dtype(values)), axis=reduction_axes)
    if module.axis_name is not None and not module.is_initializing():
        m = lax.pmean(m, module.axis_name, axis_index_groups=module.axis_index_groups)
    return m


def _safe_sqrt(v: Array) -> Array:
    """sqrt with a zero (not NaN) gradient at 0: an all-zero channel stays finite."""
    pos = v > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _feature_broadcast(stat: Array, x: Array, feature_axes: tuple[int, ...]) -> Array:
    shape = [1] * x.ndim
    for a in feature_axes:
        shape[a] = x.shape[a]
    return stat.reshape(shape)


def _update(module: nn.Module, var, batch_value: Array) -> None:
    """EMA update, only in training, when batch_stats is mutable and not during init."""
    if module.is_initializing() or not module.is_mutable_collection("batch_stats"):
        return
    var.value = module.momentum * var.value + (1.0 - module.momentum) * batch_value


def _scale_shift(module, x, mul, shift, feature_axes, feature_shape, use_scale, use_bias):
    """y = x·(mul·γ) + (shift·γ + β) with per-feature γ, β.

    Folding γ into the per-feature multiplier before touching x (as Flax's BatchNorm
    does) keeps the elementwise work to one fused multiply-add, and the backward
    pass to the two reductions Σg and Σg·x of derivations §12.2 (otherwise autodiff
    forms separate Σg·x·inv and Σg·γ·x reductions).
    """
    if use_scale:
        gamma = module.param("scale", module.scale_init, feature_shape, module.param_dtype)
        gamma = gamma.astype(mul.dtype if mul is not None else shift.dtype)
        mul = gamma if mul is None else mul * gamma
        shift = None if shift is None else shift * gamma
    if use_bias:
        beta = module.param("bias", module.bias_init, feature_shape, module.param_dtype)
        beta = beta.astype(shift.dtype if shift is not None else mul.dtype)
        shift = beta if shift is None else shift + beta
    y = x
    if mul is not None:
        y = y * _feature_broadcast(mul, x, feature_axes)
    if shift is not None:
        y = y + _feature_broadcast(shift, x, feature_axes)
    return y


def _out_dtype(module, x):
    return module.dtype or jnp.result_type(x.dtype, module.param_dtype)


class _BatchStatNorm(nn.Module):
    """Base of the batch-statistic layers: the fields and the call they share.

    ``__call__`` merges ``use_running_average``, takes the per-feature statistic
    of the batch (:meth:`batch_statistics`) or the running one
    (:meth:`running_statistics`), updates the running value ``batch_stats/<stat_name>``
    (init ``stat_init``), and returns ``x·mul + shift`` (:meth:`normalizer`) with the
    optional per-feature γ, β. Subclasses set ``stat_name``/``stat_init`` and the
    three hooks; the statistics are in at least float32.
    """

    use_running_average: bool | None = None
    axis: Axes = -1
    momentum: float = 0.9
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None
    axis_index_groups: Any = None

    stat_name = "mean"
    stat_init = staticmethod(jnp.zeros)

    def check(self) -> None:
        """Raises ValueError for inconsistent fields (before touching any variable)."""

    def batch_statistics(self, x: Array, reduction_axes: tuple[int, ...]):
        """(statistics used by :meth:`normalizer`, value tracked in the running average)."""
        raise NotImplementedError

    def running_statistics(self, running: Array):
        """The statistics of :meth:`normalizer` from the running value (evaluation)."""
        raise NotImplementedError

    def normalizer(self, stats, x: Array, reduction_axes: tuple[int, ...]):
        """(per-feature multiplier or None, per-feature shift or None)."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Normalizes ``x`` per feature with batch (or running) statistics."""
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1], got "
                             f"{self.momentum}.")
        self.check()
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_axes, reduction_axes, feature_shape = _split_axes(x, self.axis)
        ra = self.variable(
            "batch_stats", self.stat_name, self.stat_init, feature_shape, jnp.float32
        )
        xs = x.astype(_stat_dtype(x))
        if use_running_average:
            stats = self.running_statistics(ra.value.astype(xs.dtype))
        else:
            stats, tracked = self.batch_statistics(xs, reduction_axes)
            _update(self, ra, lax.stop_gradient(tracked).astype(jnp.float32))
        mul, shift = self.normalizer(stats, x, reduction_axes)
        y = _scale_shift(
            self, xs, mul, shift, feature_axes, feature_shape, self.use_scale, self.use_bias
        )
        return y.astype(_out_dtype(self, x))


class SecondMomentNorm(_BatchStatNorm):
    """Second moment normalization, SMN (derivations §12; reference ``L2Norm2d``/``L1Norm2d``).

    Per feature c with the statistic taken over all other axes (M values):

    * ``variant="l2"``: m̄_c = √(E[x²]); y = γ_c·x/(m̄_c + ε) + β_c  (ε outside the
      square root, as in the reference code); with ``epsilon_inside_sqrt=True``
      y = γ_c·x/√(E[x²] + ε), Flax/PyTorch BN style.
    * ``variant="l1"``: m̄_c = E|x|; y = γ_c·x/(m̄_c + ε) + β_c.

    No mean subtraction. The running statistic is the running **RMS** (``l2``) or
    running mean absolute value (``l1``), stored as ``batch_stats/rms`` or
    ``batch_stats/mean_abs`` (init 1); evaluation uses it in place of m̄. The exact
    backward pass (derivations §12.2) is what autodiff of this forward pass computes.
    """

    epsilon: float = 1e-5
    epsilon_inside_sqrt: bool = False
    variant: str = "l2"

    stat_init = staticmethod(jnp.ones)

    @property
    def stat_name(self) -> str:
        return "rms" if self.variant == "l2" else "mean_abs"

    def check(self) -> None:
        if self.variant not in SMN_VARIANTS:
            raise ValueError(
                f"SecondMomentNorm: unknown variant {self.variant!r}; valid: {list(SMN_VARIANTS)}."
            )
        if self.variant == "l1" and self.epsilon_inside_sqrt:
            raise ValueError("SecondMomentNorm: epsilon_inside_sqrt applies to variant='l2' only.")

    # stats = (m̄, E[x²]); E[x²] is None for l1 (only the inside-sqrt form needs it)
    def batch_statistics(self, x, reduction_axes):
        if self.variant == "l2":
            ms = _batch_mean(self, x * x, reduction_axes)
            stat = _safe_sqrt(ms)
        else:
            ms, stat = None, _batch_mean(self, jnp.abs(x), reduction_axes)
        return (stat, ms), stat

    def running_statistics(self, running):
        return running, running * running

    def normalizer(self, stats, x, reduction_axes):
        stat, ms = stats
        if self.epsilon_inside_sqrt:
            return lax.rsqrt(ms + self.epsilon), None
        return 1.0 / (stat + self.epsilon), None


class MeanOnlyBatchNorm(_BatchStatNorm):
    """Mean-only batch norm (reference ``MeanOnlyBN``): y = x − E[x] + β, no division.

    Paired with Salimans weight norm in the reference's "original WN" baseline.
    Running mean in ``batch_stats/mean`` (init 0); no scale by default.
    """

    use_scale: bool = False

    def batch_statistics(self, x, reduction_axes):
        mean = _batch_mean(self, x, reduction_axes)
        return mean, mean

    def running_statistics(self, running):
        return running

    def normalizer(self, mean, x, reduction_axes):
        return None, -mean


class MeterezBatchNorm(_BatchStatNorm):
    """Batch norm of Meterez et al. (derivations §14.2): BN(X) = diag(XXᵀ)^(−1/2)·X.

    X is features × samples: each feature is divided by its **norm** over the batch
    (and spatial) axes, with no mean subtraction and no 1/n factor. ``scale_factor``
    multiplies the result: 1 is the paper's map (the code's ``force_factor=1``);
    ``scale_factor="sqrt_n"`` uses √M (M values per feature) and gives unit second
    moment, i.e. SMN with ε = 0. ``epsilon`` is added under the square root only to
    keep an all-zero feature finite.

    In evaluation mode the batch norm ‖x_c‖ is replaced by √M·(running RMS), with M
    the per-feature count of the current input (``batch_stats/rms``, init 1).
    No affine parameters by default (the paper's theory runs have none).
    """

    epsilon: float = 1e-12
    scale_factor: float | str = 1.0
    use_bias: bool = False
    use_scale: bool = False

    stat_name = "rms"
    stat_init = staticmethod(jnp.ones)

    def check(self) -> None:
        ok = isinstance(self.scale_factor, int | float) and not isinstance(self.scale_factor, bool)
        if self.scale_factor != "sqrt_n" and not ok:
            raise ValueError(
                f"MeterezBatchNorm: scale_factor must be a number or 'sqrt_n', "
                f"got {self.scale_factor!r}."
            )

    # stats = E[x²]
    def batch_statistics(self, x, reduction_axes):
        ms = _batch_mean(self, x * x, reduction_axes)
        return ms, _safe_sqrt(ms)

    def running_statistics(self, running):
        return running**2

    def normalizer(self, ms, x, reduction_axes):
        count = math.prod(x.shape[a] for a in reduction_axes)
        factor = math.sqrt(count) if self.scale_factor == "sqrt_n" else float(self.scale_factor)
        # ‖x_c‖² = M·E[x²]; with axis_name the count is per device, the mean is global.
        return factor * lax.rsqrt(count * ms + self.epsilon), None


# ----------------------------------------------------------------------------
# Kernel reparametrizations
# ----------------------------------------------------------------------------


def _filter_axes(kernel: Array) -> tuple[int, ...]:
    if kernel.ndim < 2:
        raise ValueError(f"Expected a kernel with >= 2 axes (..., out), got shape {kernel.shape}.")
    return tuple(range(kernel.ndim - 1))


def center_kernel(kernel: Array) -> Array:
    """V − mean(V) per output filter (reference ``CenterConv2d``)."""
    return kernel - jnp.mean(kernel, axis=_filter_axes(kernel), keepdims=True)


def standardize_kernel(
    kernel: Array, gain: float = math.sqrt(2.0), *, unbiased: bool = False, epsilon: float = 1e-10
) -> Array:
    """Scaled weight standardization (derivations §10): W = gain/√n · (V − mean V)/std V.

    Per output filter over its n = fan-in entries. With the population std each
    filter has ‖W_i‖² = gain² (= 2 by default, so conv+ReLU has φ = 1); with
    ``unbiased=True`` (PyTorch's ``std``, as in the reference ``WnConv2d``) it is
    gain²·(n − 1)/n. ``epsilon`` is added to the variance to keep a constant filter
    finite.
    """
    axes = _filter_axes(kernel)
    n = math.prod(kernel.shape[a] for a in axes)
    if unbiased and n < 2:
        raise ValueError("standardize_kernel: unbiased std needs a fan-in of at least 2.")
    centred = center_kernel(kernel)
    var = jnp.sum(centred * centred, axis=axes, keepdims=True) / (n - 1 if unbiased else n)
    return centred * (gain / math.sqrt(n)) * lax.rsqrt(var + epsilon)


def _weight_normalize(kernel: Array, scale: Array, epsilon: float) -> Array:
    """g·V/‖V‖ per output filter (Salimans & Kingma 2016)."""
    axes = _filter_axes(kernel)
    sq = jnp.sum(kernel * kernel, axis=axes, keepdims=True)
    return kernel * lax.rsqrt(sq + epsilon) * scale.reshape((1,) * (kernel.ndim - 1) + (-1,))


class _KernelTransform:
    """Mixin: the stored ``kernel`` V is replaced by ``self.transform_kernel(V)``.

    Flax's Dense/Conv fetch their kernel through ``self.param("kernel", ...)``; we
    intercept that call, so strides, padding, dilation, groups and dtypes behave
    exactly as in the base layer.
    """

    def param(self, name, init_fn, *init_args, **init_kwargs):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            value = self.transform_kernel(value)
        return value


# Public name: subclass ``(KernelTransform, nn.Conv)`` and define ``transform_kernel``.
KernelTransform = _KernelTransform


class CenteredConv(_KernelTransform, nn.Conv):
    """``nn.Conv`` with zero-mean filters in the forward pass (reference ``CenterConv2d``).

    The paper pairs it with SMN: zero-mean filters make the outputs zero-mean, so
    SMN's missing mean subtraction costs nothing (derivations §12.3).
    """

    def transform_kernel(self, kernel):
        return center_kernel(kernel)


class CenteredDense(_KernelTransform, nn.Dense):
    """``nn.Dense`` with zero-mean columns, the Dense twin of :class:`CenteredConv`.

    Each output unit's weights (a column of the ``(in, out)`` kernel) are centred
    over the inputs; the MLP's ``smn`` option uses it.
    """

    def transform_kernel(self, kernel):
        return center_kernel(kernel)


class _ScaledWSMixin(_KernelTransform):
    def transform_kernel(self, kernel):
        return standardize_kernel(
            kernel, self.gain, unbiased=self.unbiased_std, epsilon=self.ws_epsilon
        )


class ScaledWSConv(_ScaledWSMixin, nn.Conv):
    """``nn.Conv`` with scaled weight standardization, sWS (derivations §10, ``WnConv2d``).

    W_i = gain/√n·(V_i − mean V_i)/std V_i per output filter, n = k_h·k_w·c_in;
    ‖W_i‖² = gain² (2 by default) throughout training, not only at init.
    """

    gain: float = math.sqrt(2.0)
    unbiased_std: bool = False
    ws_epsilon: float = 1e-10


class ScaledWSDense(_ScaledWSMixin, nn.Dense):
    """``nn.Dense`` with scaled weight standardization (see :class:`ScaledWSConv`)."""

    gain: float = math.sqrt(2.0)
    unbiased_std: bool = False
    ws_epsilon: float = 1e-10


class _WeightNormMixin(_KernelTransform):
    def transform_kernel(self, kernel):
        scale = super().param(
            "scale", nn.initializers.constant(self.gain), (kernel.shape[-1],), self.param_dtype
        )
        return _weight_normalize(kernel, jnp.asarray(scale, kernel.dtype), self.wn_epsilon)


class WeightNormConv(_WeightNormMixin, nn.Conv):
    """``nn.Conv`` with Salimans weight norm W_i = g_i·V_i/‖V_i‖ (derivations §10).

    ``g`` (param ``scale``) starts at ``gain`` so each filter has the squared norm
    gain² that a gain-``gain`` Kaiming init gives in expectation (fan_in·gain²/fan_in);
    the default √2 keeps conv+ReLU at φ = 1. (``flax.linen.WeightNorm`` starts at 1,
    i.e. unit rows, whatever the wrapped initializer; see :func:`weight_norm`.)
    """

    gain: float = math.sqrt(2.0)
    wn_epsilon: float = 1e-12


class WeightNormDense(_WeightNormMixin, nn.Dense):
    """``nn.Dense`` with Salimans weight norm, scale initialised to ``gain`` (see
    :class:`WeightNormConv`)."""

    gain: float = math.sqrt(2.0)
    wn_epsilon: float = 1e-12


def weight_norm(layer: nn.Module, gain: float = math.sqrt(2.0), **kwargs) -> nn.WeightNorm:
    """``flax.linen.WeightNorm`` around ``layer`` with ``scale_init = gain`` (kernels only).

    Keeps the intended per-row squared norm gain² at init instead of Flax's unit rows.
    """
    return nn.WeightNorm(
        layer, scale_init=nn.initializers.constant(gain), variable_filter={"kernel"}, **kwargs
    )


# The batch-statistic normalization layers by name.
NORMALIZATION_LAYERS = {
    "batch_norm": BatchNorm,
    "smn": SecondMomentNorm,
    "mean_only_bn": MeanOnlyBatchNorm,
    "meterez_bn": MeterezBatchNorm,
}
