"""DenseNet-BC for CIFAR as in the GNE paper's code (setups §1.3).

Stem conv3×3 (3 → 2k); three dense blocks of 8 bottlenecks
``h ↦ [f(h), h]`` with f = norm → act → conv1×1 (4k) → norm → act → conv3×3 (k),
growth k = 12; transitions norm → act → conv1×1 (⌊c·reduction⌋ channels) with
stride 2 and padding 1, as the reference code passes them to the 1×1 conv
(``transition_padding=0`` gives the usual unpadded variant); final
norm → act → global average pooling → linear. Conv biases only without a
normalization layer.

Blocks: ``stem``; ``stage{s}.block{i}``; ``transition{s}``; ``head``. The
bottlenecks change the channel count, so each is its own group. A bottleneck
sets ``branch(h) = [f(h), 0]`` and ``shortcut(h) = [0, h]``: the concatenation
written as a sum of zero-padded parts, whose Jacobian blocks are orthogonal
(derivations §8, concatenation row).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNormAct, Head

DEFAULTS = {
    "growth_rate": 12,
    "block_sizes": (8, 8, 8),
    "bottleneck_width": 4,
    "reduction": 0.5,
    "transition_padding": 1,
    "num_classes": 10,
    **C.ACTIVATION_DEFAULTS,
    "init": "kaiming_normal",
    "gain": None,
    "normalization": "batchnorm",
    "head_init": "kaiming_normal",
    "head_gain": 1.0,
    "dtype": None,
}
NORMALIZATIONS = ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly")


class DenseBottleneck(nn.Module):
    """``h ↦ concat([f(h), h])`` on the channel axis (new channels first, as in the code)."""

    growth: int
    bottleneck: int
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    train: bool = False

    def setup(self):
        def layer(features, k):
            return ConvNormAct(
                features,
                k,
                None,
                self.norm_spec,
                self.init_name,
                self.gain,
                use_norm=False,
            )

        self.norm1 = self.norm_spec.norm(self.train)
        self.act1 = self.act_spec.make()
        self.conv1 = layer(self.bottleneck, 1)
        self.norm2 = self.norm_spec.norm(self.train)
        self.act2 = self.act_spec.make()
        self.conv2 = layer(self.growth, 3)

    def new_features(self, h):
        h = self.conv1(self.act1(C.maybe(self.norm1, h)))
        return self.conv2(self.act2(C.maybe(self.norm2, h)))

    def branch(self, h):
        return jnp.pad(self.new_features(h), ((0, 0), (0, 0), (0, 0), (0, h.shape[-1])))

    def shortcut(self, h):
        return jnp.pad(h, ((0, 0), (0, 0), (0, 0), (self.growth, 0)))

    def __call__(self, h):
        return jnp.concatenate([self.new_features(h), h], axis=-1)


class Transition(nn.Module):
    """norm → act → conv1×1 with stride 2 (and the reference's padding)."""

    features: int
    padding: int
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    train: bool = False

    def setup(self):
        self.norm = self.norm_spec.norm(self.train)
        self.act = self.act_spec.make()
        self.conv = ConvNormAct(
            self.features,
            1,
            None,
            self.norm_spec,
            self.init_name,
            self.gain,
            strides=2,
            padding=self.padding,
            use_norm=False,
        )

    def __call__(self, h):
        return self.conv(self.act(C.maybe(self.norm, h)))


class DenseNetBC(C.BlockModel):
    """DenseNet-BC (see the module docstring)."""

    growth_rate: int = 12
    block_sizes: tuple[int, ...] = (8, 8, 8)
    bottleneck_width: int = 4
    reduction: float = 0.5
    transition_padding: int = 1
    num_classes: int = 10
    act_spec: C.ActivationSpec = C.ActivationSpec()
    init_name: str = "kaiming_normal"
    gain: float = 2.0**0.5
    norm_spec: C.NormSpec = C.NormSpec("batchnorm")
    head_init: str = "kaiming_normal"
    head_gain: float = 1.0

    def check_input(self, x):
        C.check_input(x, 4, "DenseNetBC (NHWC images)")

    def layout(self):
        k = self.growth_rate
        channels = 2 * k
        stem = lambda train, c=channels, **kw: ConvNormAct(  # noqa: E731
            c, 3, None, self.norm_spec, self.init_name, self.gain, use_norm=False, **kw
        )
        stages = [C.Stage("stem", ("stem",), stem)]
        common = (self.act_spec, self.norm_spec, self.init_name, self.gain)
        for s, n in enumerate(self.block_sizes, start=1):
            for i in range(1, n + 1):
                make = lambda train, **kw: DenseBottleneck(  # noqa: E731
                    k, self.bottleneck_width * k, *common, train=train, **kw
                )
                name = f"stage{s}.block{i}"
                stages.append(C.Stage(f"stage{s}_block{i}", (name,), make, residual=True))
                channels += k
            if s < len(self.block_sizes):
                channels = max(1, int(channels * self.reduction))
                make = lambda train, c=channels, **kw: Transition(  # noqa: E731
                    c, self.transition_padding, *common, train=train, **kw
                )
                stages.append(C.Stage(f"transition{s}", (f"transition{s}",), make))
        head = lambda train, **kw: Head(  # noqa: E731
            self.num_classes,
            self.norm_spec,
            self.head_init,
            self.head_gain,
            act_spec=self.act_spec,
            pre_norm=True,
            train=train,
            **kw,
        )
        stages.append(C.Stage("head", ("head",), head))
        return stages


def from_config(cfg: dict) -> DenseNetBC:
    act = C.activation_spec(cfg)
    reduction = C.check_float(cfg["reduction"], "reduction", positive=True)
    if reduction > 1:
        raise ValueError(f"Config `reduction` must be in (0, 1]; got {reduction}.")
    return DenseNetBC(
        growth_rate=C.check_positive_int(cfg["growth_rate"], "growth_rate"),
        block_sizes=C.check_positive_ints(cfg["block_sizes"], "block_sizes"),
        bottleneck_width=C.check_positive_int(cfg["bottleneck_width"], "bottleneck_width"),
        reduction=reduction,
        transition_padding=C.check_positive_int(cfg["transition_padding"], "transition_padding", 0),
        num_classes=C.check_positive_int(cfg["num_classes"], "num_classes"),
        act_spec=act,
        init_name=C.check_init(cfg["init"]),
        gain=C.resolve_gain(cfg, act),
        norm_spec=C.norm_spec(cfg, NORMALIZATIONS),
        head_init=C.check_init(cfg["head_init"], "head_init", conv=False),
        head_gain=C.check_float(cfg["head_gain"], "head_gain", positive=True),
    )
