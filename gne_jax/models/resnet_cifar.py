"""CIFAR ResNets of depth 6n + 2 (ResNet-56: n = 9), setups §1.3 and §1.7.

BasicBlocks [n, n, n] with widths 16/32/64; branch conv3×3 → norm → act →
conv3×3 → norm; the activation after the addition; down-sampling shortcut
AvgPool(kernel 1, stride 2) = ``h[:, ::2, ::2]`` plus zero channels; global
average pooling and a linear layer.

Normalization: "batchnorm", "smn" / "smn_l1" (with centred convs), "none" and the
others of ``NORMALIZATIONS``. With ``normalization="none"``, ``fixup_p=p`` gives
the paper's Fixup re-derivation (derivations §13): both branch convs get the init std
× L^(−p/(2m)) with L = 3n blocks and m = 2 convs per branch (the last conv is
not zero); ``fixup_scalars=True`` adds Fixup's scalar biases before each conv and
activation and a scalar multiplier (init 1) and bias at the branch end, plus a
bias after the stem conv and one before the fc layer.

Block structure. A block of the code is ``h ↦ act(S(h) + B(h))``. So that every
exposed block has the residual form ``shortcut(h) + branch(h)`` exactly, the
activation after an addition is applied at the start of the *next* block
(the composition is unchanged):

* ``stem``: conv → norm → act;
* ``stage1.block1``: ``h ↦ h + B(h)`` (identity shortcut; its input is activated);
* ``stage{s}.block{i}``, other blocks: ``h ↦ S(act(h)) + B(act(h))``; ``shortcut``
  is ``S∘act`` (``S`` the identity within a stage, subsample + zero channels at
  ``stage{s}.block1`` for s ≥ 2); blocks 2..n of a stage form one scanned group;
* ``head``: act → global average pool → linear.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNormAct, Head
from gne_jax.models.serial_cnn import check_depth

DEFAULTS = {
    "depth": 56,
    "widths": (16, 32, 64),
    "num_classes": 10,
    **C.ACTIVATION_DEFAULTS,
    "init": "kaiming_normal",
    "gain": None,
    "normalization": "batchnorm",
    "fixup_p": None,
    "fixup_scalars": False,
    "head_init": "kaiming_normal",
    "head_gain": 1.0,
    "dtype": None,
}
NORMALIZATIONS = ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly")


def fixup_scale(num_blocks: int, p: float | None, m: int) -> float:
    """L^(−p/(2m)): the std factor of the branch convs in the paper's Fixup (derivations §13)."""
    return 1.0 if p is None else float(num_blocks) ** (-p / (2.0 * m))


def subsample_pad(h, strides: int, features: int):
    """AvgPool(kernel 1, stride s) followed by concatenation of zero channels."""
    if strides > 1:
        h = h[:, ::strides, ::strides, :]
    extra = features - h.shape[-1]
    if extra < 0:
        raise ValueError(f"shortcut cannot reduce channels {h.shape[-1]} -> {features}.")
    if extra:
        h = jnp.pad(h, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return h


class BasicBlock(nn.Module):
    """``shortcut(h) + branch(h)``; with ``act_first`` both act on ``act(h)``."""

    features: int
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    strides: int = 1
    act_first: bool = True
    scalars: bool = False
    train: bool = False

    def setup(self):
        conv = lambda s: self.norm_spec.conv(  # noqa: E731
            self.features,
            3,
            strides=s,
            kernel_init=C.kernel_init(self.init_name, self.gain),
            use_bias=False,
            gain=self.gain,
        )
        self.conv1 = conv(self.strides)
        self.norm1 = self.norm_spec.norm(self.train)
        self.conv2 = conv(1)
        self.norm2 = self.norm_spec.norm(self.train)
        self.act_mid = self.act_spec.make()
        if self.act_first:
            self.act_in = self.act_spec.make()
        if self.scalars:
            zeros, ones = C.zeros_init, nn.initializers.ones
            pd = C.param_dtype()
            self.bias1a = self.param("bias1a", zeros, (), pd)
            self.bias1b = self.param("bias1b", zeros, (), pd)
            self.bias2a = self.param("bias2a", zeros, (), pd)
            self.scale = self.param("scale", ones, (), pd)
            self.bias2b = self.param("bias2b", zeros, (), pd)

    def _input(self, h):
        return self.act_in(h) if self.act_first else h

    def _bias(self, h, name):
        return h + getattr(self, name).astype(h.dtype) if self.scalars else h

    def branch(self, h):
        h = self._bias(self._input(h), "bias1a")
        h = self._bias(C.maybe(self.norm1, self.conv1(h)), "bias1b")
        h = self._bias(self.act_mid(h), "bias2a")
        h = C.maybe(self.norm2, self.conv2(h))
        if self.scalars:
            h = h * self.scale.astype(h.dtype)
        return self._bias(h, "bias2b")

    def shortcut(self, h):
        return subsample_pad(self._input(h), self.strides, self.features)

    def __call__(self, h):
        return self.shortcut(h) + self.branch(h)


class ResNetCIFAR(C.BlockModel):
    """CIFAR ResNet with 6n + 2 layers (see the module docstring)."""

    depth: int = 56
    widths: tuple[int, ...] = (16, 32, 64)
    num_classes: int = 10
    act_spec: C.ActivationSpec = C.ActivationSpec()
    init_name: str = "kaiming_normal"
    gain: float = 2.0**0.5
    norm_spec: C.NormSpec = C.NormSpec("batchnorm")
    fixup_p: float | None = None
    fixup_scalars: bool = False
    head_init: str = "kaiming_normal"
    head_gain: float = 1.0

    def check_input(self, x):
        C.check_input(x, 4, "ResNetCIFAR (NHWC images)")

    def _block(self, features, strides, act_first):
        n = (self.depth - 2) // 6
        gain = self.gain * fixup_scale(3 * n, self.fixup_p, 2)

        def make(train, **kw):
            return BasicBlock(
                features,
                self.act_spec,
                self.norm_spec,
                self.init_name,
                gain,
                strides=strides,
                act_first=act_first,
                scalars=self.fixup_scalars,
                train=train,
                **kw,
            )

        return make

    def layout(self):
        n = (self.depth - 2) // 6
        stem = lambda train, **kw: ConvNormAct(  # noqa: E731
            self.widths[0],
            3,
            self.act_spec,
            self.norm_spec,
            self.init_name,
            self.gain,
            use_bias=False,
            scalar_bias=self.fixup_scalars,
            train=train,
            **kw,
        )
        stages = [C.Stage("stem", ("stem",), stem)]
        for s, w in enumerate(self.widths, start=1):
            strides = 1 if s == 1 else 2
            stages.append(
                C.Stage(
                    f"stage{s}_block1",
                    (f"stage{s}.block1",),
                    self._block(w, strides, act_first=s > 1),
                    residual=True,
                    identity_shortcut=s == 1,
                )
            )
            names = tuple(f"stage{s}.block{i}" for i in range(2, n + 1))
            if names:
                stages.append(
                    C.Stage(
                        f"stage{s}", names, self._block(w, 1, True), scanned=True, residual=True
                    )
                )
        head = lambda train, **kw: Head(  # noqa: E731
            self.num_classes,
            self.norm_spec,
            self.head_init,
            self.head_gain,
            act_spec=self.act_spec,
            scalar_bias=self.fixup_scalars,
            train=train,
            **kw,
        )
        stages.append(C.Stage("head", ("head",), head))
        return stages


def check_fixup(cfg: dict, normalization: str):
    p = C.check_float(cfg["fixup_p"], "fixup_p", positive=True, allow_none=True)
    scalars = bool(cfg["fixup_scalars"])
    if (p is not None or scalars) and normalization != "none":
        raise ValueError(
            "Fixup (`fixup_p`, `fixup_scalars`) replaces normalization: it needs "
            f"normalization='none'; got normalization={normalization!r}."
        )
    return p, scalars


def from_config(cfg: dict) -> ResNetCIFAR:
    act = C.activation_spec(cfg)
    norm = C.norm_spec(cfg, NORMALIZATIONS)
    p, scalars = check_fixup(cfg, norm.name)
    widths = C.check_positive_ints(cfg["widths"], "widths", 3)
    if any(b < a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(
            f"Config `widths` must be non-decreasing (the zero-padded shortcut only adds "
            f"channels); got {widths}."
        )
    return ResNetCIFAR(
        depth=check_depth(cfg["depth"]),
        widths=widths,
        num_classes=C.check_positive_int(cfg["num_classes"], "num_classes"),
        act_spec=act,
        init_name=C.check_init(cfg["init"]),
        gain=C.resolve_gain(cfg, act),
        norm_spec=norm,
        fixup_p=p,
        fixup_scalars=scalars,
        head_init=C.check_init(cfg["head_init"], "head_init", conv=False),
        head_gain=C.check_float(cfg["head_gain"], "head_gain", positive=True),
    )
