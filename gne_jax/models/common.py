"""Pieces shared by the model families: config checks, layer factories, block layout.

Every model is a :class:`BlockModel`: its ``layout()`` lists :class:`Stage` specs
(a name, the block names, a factory for the Flax module of one block, whether
the run of blocks is scanned). The same specs drive

* ``__call__``: single blocks are applied once, runs of identical blocks with
  ``nn.scan`` (parameters stacked on a leading axis, compile time flat in depth);
* ``blocks(variables, x, train=...)``: one :class:`~gne_jax.probes.blocks.BlockGroup` per
  stage whose ``apply`` is the same module applied to one slice of the stacked
  variables, so composing the groups reproduces ``model.apply`` exactly.

Block modules are Linen modules with a ``train`` attribute and ``__call__(h)``
(or ``__call__(h, xs)`` when the stage has per-block inputs ``xs``); residual
blocks also define ``branch(h)`` and ``shortcut(h)`` with
``__call__(h) = shortcut(h) + branch(h)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from gne_jax.nn import activations as _act
from gne_jax.nn import initializers as _init
from gne_jax.nn import normalization as _norm
from gne_jax.probes.blocks import BlockGroup, single_block

Array = jax.Array

# PyTorch's BN momentum 0.1 is Flax's 0.9 (Flax keeps the old average's weight); ε as in PyTorch.
NORM_MOMENTUM = 0.9
NORM_EPSILON = 1e-5

# The `normalization` options: the convolutional families take CONV_NORMALIZATIONS,
# the MLP all of NORMALIZATIONS (Meterez et al.'s batch norm is an MLP construction).
CONV_NORMALIZATIONS = ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly")
NORMALIZATIONS = (*CONV_NORMALIZATIONS, "meterez")
DTYPES = ("float32", "float64", "bfloat16", "float16")


# ----------------------------------------------------------------------------
# Config handling
# ----------------------------------------------------------------------------


def merge_config(name: str, defaults: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    """Defaults overridden by ``config``; unknown keys raise a ValueError listing valid ones."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    merged = dict(defaults)
    unknown = sorted(k for k in config if k not in defaults and k != "name")
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown} for model {name!r}; valid keys: "
            f"{sorted(['name', *defaults])}."
        )
    merged.update({k: v for k, v in config.items() if k != "name"})
    return merged


def check_choice(value, key: str, choices) -> Any:
    if value not in choices:
        raise ValueError(f"Config `{key}` must be one of {list(choices)}; got {value!r}.")
    return value


def check_positive_int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | jnp.integer):
        raise ValueError(f"Config `{key}` must be an int >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"Config `{key}` must be >= {minimum}; got {value}.")
    return int(value)


def check_positive_ints(values, key: str, length: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"Config `{key}` must be a sequence of ints; got {values!r}.") from None
    if length is not None and len(values) != length:
        raise ValueError(f"Config `{key}` must have {length} entries; got {values!r}.")
    if not values:
        raise ValueError(f"Config `{key}` must not be empty.")
    return tuple(check_positive_int(v, f"{key}[{i}]") for i, v in enumerate(values))


def check_float(value, key: str, *, positive: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Config `{key}` must be a number; got {value!r}.") from None
    if not math.isfinite(f) or (positive and f <= 0):
        what = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"Config `{key}` must be {what}; got {value!r}.")
    return f


def resolve_dtype(value, key: str = "dtype"):
    if value is None:
        return None
    if isinstance(value, str):
        check_choice(value, key, DTYPES)
        return jnp.dtype(value)
    try:
        dt = jnp.dtype(value)
    except TypeError:
        raise ValueError(
            f"Config `{key}` must be None or one of {list(DTYPES)}; got {value!r}."
        ) from None
    check_choice(dt.name, key, DTYPES)
    return dt


def param_dtype():
    """float64 under ``jax_enable_x64``, float32 otherwise (evaluated at trace time)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def to_config_dict(name: str, defaults: Mapping[str, Any]) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, **defaults})


def check_depth(depth, key: str = "depth", minimum: int = 8) -> int:
    """A depth of the form 6n + 2 (the serial CNN and the CIFAR ResNets)."""
    depth = check_positive_int(depth, key)
    if depth < minimum or (depth - 2) % 6:
        raise ValueError(
            f"Config `{key}` must be 6n + 2 with n >= {(minimum - 2) // 6} "
            f"(e.g. 8, 14, 20, 32, 44, 56, 110); got {depth}."
        )
    return depth


# ----------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------

ACTIVATION_DEFAULTS = {
    "activation": "relu",
    "negative_slope": 0.18,  # leaky ReLU slope (the reference code's default)
    "selu_epsilon": 0.03,  # depth-aware SELU: per-block φ excess ε (derivations §11)
    "selu_gamma0": 1.0,  # depth-aware SELU: γ₀ = gain² of the weights
}
SHAPED = ("shaped_tanh", "shaped_sin")


def family_defaults(*, num_classes: int, normalization: str, **own) -> dict:
    """The ``DEFAULTS`` of a family: its ``own`` keys, then the keys every family has
    (``num_classes``, the activation keys, ``init``, ``gain``, ``normalization``,
    ``head_init``, ``head_gain``, ``dtype``)."""
    return {
        **own,
        "num_classes": num_classes,
        **ACTIVATION_DEFAULTS,
        "init": "kaiming_normal",
        "gain": None,
        "normalization": normalization,
        "head_init": "kaiming_normal",
        "head_gain": 1.0,
        "dtype": None,
    }


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """An activation of :mod:`gne_jax.nn.activations` with its config parameters."""

    name: str = "relu"
    negative_slope: float = 0.18
    selu_epsilon: float = 0.03
    selu_gamma0: float = 1.0
    shaped_exponent: float = 0.4

    def kwargs(self, layer_index=None) -> dict:
        if self.name == "leaky_relu":
            return {"negative_slope": self.negative_slope}
        if self.name == "selu_depth_aware":
            return {"epsilon": self.selu_epsilon, "gamma0": self.selu_gamma0}
        if self.name in SHAPED:
            return {"layer_index": layer_index, "exponent": self.shaped_exponent}
        return {}

    def make(self):
        """A function, or a fresh Flax module for learned activations (call in setup)."""
        if self.name in SHAPED:
            raise ValueError("Shaped activations need the layer index; the MLP applies them.")
        act = _act.get_activation(self.name, **self.kwargs())
        return act() if _act.is_learned(self.name) else act

    def gain(self) -> float:
        """Default weight gain (derivations §9): gain²·φ_act = 1."""
        if self.name in ("relu", "prelu", "sprelu", "leaky_relu", "tanh", "linear", "selu"):
            return _init.activation_gain(self.name, self.negative_slope)
        if self.name == "selu_depth_aware":
            return math.sqrt(self.selu_gamma0)  # γ₀ = gain² (derivations §11.1)
        if self.name in SHAPED:
            return 1.0  # σ'(0) = 1
        if self.name == "sigmoid":
            return 4.0  # φ_sigmoid → 1/16 for small inputs (derivations §8)
        raise ValueError(f"No default gain for activation {self.name!r}; set `gain`.")


def activation_spec(cfg: Mapping[str, Any], *, allow_shaped: bool = False) -> ActivationSpec:
    valid = tuple(a for a in _act.ACTIVATIONS if allow_shaped or a not in SHAPED)
    name = check_choice(cfg["activation"], "activation", valid)
    spec = ActivationSpec(
        name=name,
        negative_slope=check_float(cfg["negative_slope"], "negative_slope"),
        selu_epsilon=check_float(cfg["selu_epsilon"], "selu_epsilon"),
        selu_gamma0=check_float(cfg["selu_gamma0"], "selu_gamma0", positive=True),
        shaped_exponent=check_float(cfg.get("shaped_exponent", 0.4), "shaped_exponent"),
    )
    if name == "selu_depth_aware":  # fail at construction, not at trace time
        _act.selu_coefficients(spec.selu_epsilon, spec.selu_gamma0)
    return spec


def resolve_gain(cfg: Mapping[str, Any], act: ActivationSpec) -> float:
    gain = cfg["gain"]
    if gain is None:
        return act.gain()
    return check_float(gain, "gain", positive=True)


# ----------------------------------------------------------------------------
# Initializers
# ----------------------------------------------------------------------------


def kernel_init(name: str, gain: float, **kwargs):
    check_choice(name, "init", _init.INITIALIZERS)
    return _init.get_initializer(name, gain, **kwargs)


def check_init(name: str, key: str = "init", *, conv: bool = True) -> str:
    valid = (
        _init.INITIALIZERS
        if conv
        else tuple(i for i in _init.INITIALIZERS if i != "delta_orthogonal")
    )
    return check_choice(name, key, valid)


def zeros_init(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


# ----------------------------------------------------------------------------
# Convolution + normalization factories
# ----------------------------------------------------------------------------


def torch_padding(kernel_size: int, padding: int | None = None):
    """Symmetric padding of PyTorch (k//2 by default); Flax 'SAME' differs for stride 2."""
    p = kernel_size // 2 if padding is None else padding
    return ((p, p), (p, p))


# The conv and dense layers of each normalization option (plain for the others);
# those of sWS and weight norm take the layer's gain.
_WEIGHT_LAYERS = {
    "smn": {"conv": _norm.CenteredConv, "dense": _norm.CenteredDense},
    "smn_l1": {"conv": _norm.CenteredConv, "dense": _norm.CenteredDense},
    "sws": {"conv": _norm.ScaledWSConv, "dense": _norm.ScaledWSDense},
    "weightnorm": {"conv": _norm.WeightNormConv, "dense": _norm.WeightNormDense},
}
_PLAIN_LAYERS = {"conv": nn.Conv, "dense": nn.Dense}
_GAIN_LAYERS = ("sws", "weightnorm")


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """Which convolution/dense kind and normalization layer a model uses."""

    name: str = "none"
    dtype: Any = None

    @property
    def has_norm_layer(self) -> bool:
        return self.name not in ("none", "sws")

    def conv(self, features, kernel_size, *, strides=1, padding=None, kernel_init, use_bias, gain):
        """The convolution of this scheme: plain, centred (SMN), sWS or weight-normalized.

        ``gain`` is the layer's intended gain: sWS rows get squared norm gain², the
        weight-norm scale starts at gain (derivations §10).
        """
        return self._weight_layer(
            "conv",
            gain,
            features=features,
            kernel_size=(kernel_size, kernel_size),
            strides=(strides, strides),
            padding=torch_padding(kernel_size, padding),
            use_bias=use_bias,
            kernel_init=kernel_init,
        )

    def dense(self, features, *, kernel_init, use_bias, gain):
        """The dense layer of this scheme (see :meth:`conv`)."""
        return self._weight_layer(
            "dense", gain, features=features, use_bias=use_bias, kernel_init=kernel_init
        )

    def _weight_layer(self, kind: str, gain: float, **kw):
        """The ``kind`` ("conv" or "dense") layer of this scheme, in its dtype."""
        if self.name in _GAIN_LAYERS:
            kw["gain"] = gain
        cls = _WEIGHT_LAYERS.get(self.name, _PLAIN_LAYERS)[kind]
        return cls(dtype=self.dtype, param_dtype=param_dtype(), **kw)

    def norm(self, train: bool):
        """The activation-normalization layer, or None (momentum 0.9 = PyTorch's 0.1)."""
        kw = dict(use_running_average=not train, dtype=self.dtype, param_dtype=param_dtype())
        if self.name == "batchnorm":
            return nn.BatchNorm(momentum=NORM_MOMENTUM, epsilon=NORM_EPSILON, **kw)
        if self.name in ("smn", "smn_l1"):
            variant = "l2" if self.name == "smn" else "l1"
            return _norm.SecondMomentNorm(
                momentum=NORM_MOMENTUM, epsilon=NORM_EPSILON, variant=variant, **kw
            )
        # "weightnorm" is the reference's WN baseline: weight-normalized conv + mean-only BN
        if self.name in ("weightnorm", "meanonly"):
            return _norm.MeanOnlyBatchNorm(momentum=NORM_MOMENTUM, **kw)
        if self.name == "meterez":
            return _norm.MeterezBatchNorm(momentum=NORM_MOMENTUM, **kw)
        return None


def norm_spec(cfg: Mapping[str, Any], valid=NORMALIZATIONS) -> NormSpec:
    name = check_choice(cfg["normalization"], "normalization", valid)
    return NormSpec(name=name, dtype=resolve_dtype(cfg["dtype"]))


def maybe(layer, h):
    return h if layer is None else layer(h)


# ----------------------------------------------------------------------------
# Fixup (derivations §13)
# ----------------------------------------------------------------------------


def fixup_scale(num_blocks: int, p: float | None, m: int) -> float:
    """L^(−p/(2m)): the std factor of the branch convs in the paper's Fixup (derivations §13)."""
    return 1.0 if p is None else float(num_blocks) ** (-p / (2.0 * m))


def check_fixup_normalization(keys: str, normalization: str) -> None:
    """Fixup replaces normalization: it needs ``normalization="none"``."""
    if normalization != "none":
        raise ValueError(
            f"Fixup ({keys}) replaces normalization: it needs normalization='none'; "
            f"got normalization={normalization!r}."
        )


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------


def check_input(x, ndim: int, what: str, channels: int | None = None):
    shape = jnp.shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{what} expects an input of rank {ndim}; got shape {shape}.")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{what} expects a floating-point input; got {jnp.result_type(x)}.")
    if channels is not None and shape[-1] != channels:
        raise ValueError(f"{what} expects {channels} input features; got shape {shape}.")


# ----------------------------------------------------------------------------
# Block layout and the BlockModel base
# ----------------------------------------------------------------------------


def module_factory(cls, *args, **fields) -> Callable[..., nn.Module]:
    """The ``make`` of a :class:`Stage`: ``make(train, **kw) = cls(*args, train=train,
    **fields, **kw)`` (``kw``: Flax's ``name``/``parent``)."""

    def make(train, **kw):
        return cls(*args, train=train, **fields, **kw)

    return make


class Stage(NamedTuple):
    """One group of blocks of a model.

    Attributes:
      name: variable scope of the stage (a key of ``variables['params']``).
      block_names: human-readable block names, e.g. ``("stage1.block2", ...)``.
      make: ``make(train, **module_kwargs)`` -> the Flax module of one block.
      scanned: True for runs of identical blocks (``nn.scan``, stacked variables);
        False for a single block (unstacked variables).
      xs: per-block extra input of the block module (stacked for scanned stages),
        e.g. the layer index of shaped activations; None if the block takes none.
      residual: the block module defines ``branch`` and ``shortcut``.
      identity_shortcut: the shortcut is exactly the identity (BlockGroup.shortcut None).
    """

    name: str
    block_names: tuple[str, ...]
    make: Callable[..., nn.Module]
    scanned: bool = False
    xs: Any = None
    residual: bool = False
    identity_shortcut: bool = False


def _scan_body(module, carry, xs):
    out = module(carry) if xs is None else module(carry, xs)
    return out, None


def _scan(module: nn.Module, h, length: int, xs):
    scan = nn.scan(
        _scan_body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        length=length,
    )
    h, _ = scan(module, h, xs)
    return h


def _module_fn(module: nn.Module, train: bool, with_xs: bool, method=None):
    """(params_i, h) -> the block module applied with one block's variables."""

    def call(variables, h, *args):
        kw = {} if method is None else {"method": method}
        if train:  # batch statistics; running averages are not updated
            return module.apply(variables, h, *args, mutable=["batch_stats"], **kw)[0]
        return module.apply(variables, h, *args, **kw)

    if with_xs:
        return lambda p, h: call(p["variables"], h, p["xs"])
    return lambda p, h: call(p, h)


def sub_variables(variables, name: str) -> dict:
    """The variables of child ``name``, every collection that has it."""
    return {col: tree[name] for col, tree in variables.items() if name in tree}


class BlockModel(nn.Module):
    """Base of the model families: a chain of stages given by ``layout()``."""

    def layout(self) -> list[Stage]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x) -> None:  # pragma: no cover - overridden
        pass

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Logits (or features) of the model; ``train`` uses batch statistics."""
        self.check_input(x)
        h = x
        for st in self.layout():
            module = st.make(train, name=st.name)
            if st.scanned:
                h = _scan(module, h, len(st.block_names), st.xs)
            else:
                h = module(h) if st.xs is None else module(h, st.xs)
        return h

    def blocks(self, variables, x, *, train: bool) -> list[BlockGroup]:
        """The model's blocks: ``compose_blocks(model.blocks(v, x, train=t), x)`` = apply.

        In train mode batch-normalized blocks use the statistics of the batch they
        are given (the whole batch is one input) and do not update running stats.
        """
        self.check_input(x)
        groups = []
        h = x
        for st in self.layout():
            module = st.make(train, parent=None)
            v = sub_variables(variables, st.name)
            with_xs = st.xs is not None
            apply = _module_fn(module, train, with_xs)
            branch = shortcut = None
            if st.residual:
                branch = _module_fn(module, train, with_xs, method="branch")
                if not st.identity_shortcut:
                    shortcut = _module_fn(module, train, with_xs, method="shortcut")
            params = {"variables": v, "xs": st.xs} if with_xs else v
            if st.scanned:

                def step(carry, p, apply=apply):
                    return apply(p, carry), carry

                out, inputs = jax.lax.scan(step, h, params)
                groups.append(BlockGroup(st.block_names, apply, params, inputs, branch, shortcut))
            else:
                out = apply(params, h)
                groups.append(
                    single_block(
                        st.block_names[0], apply, params, h, branch=branch, shortcut=shortcut
                    )
                )
            h = out
        return groups


class Classifier(BlockModel):
    """A :class:`BlockModel` with the fields every family has (:func:`classifier_kwargs`)."""

    #: Fields read only by the kernel initializers (``model.init``), never by ``apply``:
    #: ensembles measure a model with these at their defaults, so variants that differ
    #: only in them share one traced and compiled measurement (`gne_jax.probes.ensemble`).
    init_only_fields: ClassVar[tuple[str, ...]] = ("init_name", "head_init")

    num_classes: int | None = 10
    act_spec: ActivationSpec = ActivationSpec()
    init_name: str = "kaiming_normal"
    gain: float = 2.0**0.5
    norm_spec: NormSpec = NormSpec()
    head_init: str = "kaiming_normal"
    head_gain: float = 1.0


def classifier_kwargs(
    cfg: Mapping[str, Any], normalizations=CONV_NORMALIZATIONS, *, conv: bool = True
) -> dict:
    """The :class:`Classifier` fields, validated, from a merged config.

    ``conv=False`` (the MLP) allows shaped activations and ``num_classes=None``
    (no head) and refuses the ``delta_orthogonal`` init.
    """
    act = activation_spec(cfg, allow_shaped=not conv)
    num_classes = cfg["num_classes"]
    if conv or num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes")
    return dict(
        num_classes=num_classes,
        act_spec=act,
        init_name=check_init(cfg["init"], conv=conv),
        gain=resolve_gain(cfg, act),
        norm_spec=norm_spec(cfg, normalizations),
        head_init=check_init(cfg["head_init"], "head_init", conv=False),
        head_gain=check_float(cfg["head_gain"], "head_gain", positive=True),
    )
