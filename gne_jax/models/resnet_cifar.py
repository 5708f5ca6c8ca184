"""CIFAR ResNets of depth 6n + 2 (ResNet-56: n = 9), setups §1.3 and §1.7.

BasicBlocks [n, n, n] with widths 16/32/64; branch conv3×3 → norm → act →
conv3×3 → norm; the activation after the addition; down-sampling shortcut
AvgPool(kernel 1, stride 2) = ``h[:, ::2, ::2]`` plus zero channels; global
average pooling and a linear layer.

Normalization: "batchnorm", "smn" / "smn_l1" (with centred convs), "none" and the
others of ``common.CONV_NORMALIZATIONS``. With ``normalization="none"``, ``fixup_p=p`` gives
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

import jax.numpy as jnp

from gne_jax.models import common as C
from gne_jax.models.common import fixup_scale  # also imported from here by gne_jax.theory
from gne_jax.models.layers import ConvNet, ResidualBlock, residual_stage

DEFAULTS = C.family_defaults(
    depth=56,
    widths=(16, 32, 64),
    num_classes=10,
    normalization="batchnorm",
    fixup_p=None,
    fixup_scalars=False,
)


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


class BasicBlock(ResidualBlock):
    """``shortcut(h) + branch(h)``; with ``act_first`` both act on ``act(h)``."""

    features: int
    init_name: str

    def setup(self):
        init = C.kernel_init(self.init_name, self.gain)
        self.conv1 = self.branch_conv(self.features, 3, init, self.strides)
        self.norm1 = self.norm_spec.norm(self.train)
        self.conv2 = self.branch_conv(self.features, 3, init)
        self.norm2 = self.norm_spec.norm(self.train)
        self.act_mid = self.act_spec.make()
        self.setup_fixup(2)

    def branch(self, h):
        return self.fixup_branch(
            h, (self.conv1, self.conv2), (self.norm1, self.norm2), (self.act_mid,)
        )

    def shortcut(self, h):
        return subsample_pad(self._input(h), self.strides, self.features)


class ResNetCIFAR(ConvNet):
    """CIFAR ResNet with 6n + 2 layers (see the module docstring)."""

    depth: int = 56
    widths: tuple[int, ...] = (16, 32, 64)
    fixup_p: float | None = None
    fixup_scalars: bool = False

    def _block(self, features, strides, act_first):
        n = (self.depth - 2) // 6
        return C.module_factory(
            BasicBlock,
            features,
            self.init_name,
            act_spec=self.act_spec,
            norm_spec=self.norm_spec,
            gain=self.gain * fixup_scale(3 * n, self.fixup_p, 2),
            strides=strides,
            act_first=act_first,
            scalars=self.fixup_scalars,
        )

    def layout(self):
        n = (self.depth - 2) // 6
        stem = self.conv_layer(self.widths[0], use_bias=False, scalar_bias=self.fixup_scalars)
        stages = [C.Stage("stem", ("stem",), stem)]
        for s, w in enumerate(self.widths, start=1):
            first = self._block(w, 1 if s == 1 else 2, act_first=s > 1)
            rest = self._block(w, 1, True)
            stages += residual_stage(s, n, first, rest, identity_shortcut=s == 1)
        stages.append(self.head_stage(act_spec=self.act_spec, scalar_bias=self.fixup_scalars))
        return stages


def from_config(cfg: dict) -> ResNetCIFAR:
    kwargs = C.classifier_kwargs(cfg)
    p = C.check_float(cfg["fixup_p"], "fixup_p", positive=True, allow_none=True)
    scalars = bool(cfg["fixup_scalars"])
    if p is not None or scalars:
        C.check_fixup_normalization("`fixup_p`, `fixup_scalars`", kwargs["norm_spec"].name)
    widths = C.check_positive_ints(cfg["widths"], "widths", 3)
    if any(b < a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(
            f"Config `widths` must be non-decreasing (the zero-padded shortcut only adds "
            f"channels); got {widths}."
        )
    return ResNetCIFAR(
        depth=C.check_depth(cfg["depth"]),
        widths=widths,
        fixup_p=p,
        fixup_scalars=scalars,
        **kwargs,
    )
