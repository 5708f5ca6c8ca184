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

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNet, ConvNormAct

DEFAULTS = C.family_defaults(
    growth_rate=12,
    block_sizes=(8, 8, 8),
    bottleneck_width=4,
    reduction=0.5,
    transition_padding=1,
    num_classes=10,
    normalization="batchnorm",
)


class PreActivationUnit(nn.Module):
    """Base of the DenseNet modules: layers norm → act → conv with the model's specs.

    The spec fields are keyword-only, so subclasses put their own fields first.
    """

    _: dataclasses.KW_ONLY
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    train: bool = False


def pre_activation_layer(unit: PreActivationUnit, features: int, kernel_size: int, **fields):
    """(norm, act, conv) of one norm → act → conv layer of ``unit`` (assign them in setup);
    the conv has a bias only without a normalization layer."""
    conv = ConvNormAct(
        features,
        kernel_size,
        None,
        unit.norm_spec,
        unit.init_name,
        unit.gain,
        use_norm=False,
        **fields,
    )
    return unit.norm_spec.norm(unit.train), unit.act_spec.make(), conv


def apply_pre_activation(h, norm, act, conv):
    return conv(act(C.maybe(norm, h)))


class DenseBottleneck(PreActivationUnit):
    """``h ↦ concat([f(h), h])`` on the channel axis (new channels first, as in the code)."""

    growth: int
    bottleneck: int

    def setup(self):
        self.norm1, self.act1, self.conv1 = pre_activation_layer(self, self.bottleneck, 1)
        self.norm2, self.act2, self.conv2 = pre_activation_layer(self, self.growth, 3)

    def new_features(self, h):
        h = apply_pre_activation(h, self.norm1, self.act1, self.conv1)
        return apply_pre_activation(h, self.norm2, self.act2, self.conv2)

    def branch(self, h):
        return jnp.pad(self.new_features(h), ((0, 0), (0, 0), (0, 0), (0, h.shape[-1])))

    def shortcut(self, h):
        return jnp.pad(h, ((0, 0), (0, 0), (0, 0), (self.growth, 0)))

    def __call__(self, h):
        return jnp.concatenate([self.new_features(h), h], axis=-1)


class Transition(PreActivationUnit):
    """norm → act → conv1×1 with stride 2 (and the reference's padding)."""

    features: int
    padding: int

    def setup(self):
        layer = pre_activation_layer(self, self.features, 1, strides=2, padding=self.padding)
        self.norm, self.act, self.conv = layer

    def __call__(self, h):
        return apply_pre_activation(h, self.norm, self.act, self.conv)


class DenseNetBC(ConvNet):
    """DenseNet-BC (see the module docstring)."""

    growth_rate: int = 12
    block_sizes: tuple[int, ...] = (8, 8, 8)
    bottleneck_width: int = 4
    reduction: float = 0.5
    transition_padding: int = 1

    def layout(self):
        k = self.growth_rate
        channels = 2 * k
        stem = self.conv_layer(channels, act_spec=None, use_norm=False)
        stages = [C.Stage("stem", ("stem",), stem)]
        common = dict(
            act_spec=self.act_spec,
            norm_spec=self.norm_spec,
            init_name=self.init_name,
            gain=self.gain,
        )
        for s, n in enumerate(self.block_sizes, start=1):
            for i in range(1, n + 1):
                make = C.module_factory(DenseBottleneck, k, self.bottleneck_width * k, **common)
                name = f"stage{s}.block{i}"
                stages.append(C.Stage(f"stage{s}_block{i}", (name,), make, residual=True))
                channels += k
            if s < len(self.block_sizes):
                channels = max(1, int(channels * self.reduction))
                make = C.module_factory(Transition, channels, self.transition_padding, **common)
                stages.append(C.Stage(f"transition{s}", (f"transition{s}",), make))
        stages.append(self.head_stage(act_spec=self.act_spec, pre_norm=True))
        return stages


def from_config(cfg: dict) -> DenseNetBC:
    reduction = C.check_float(cfg["reduction"], "reduction", positive=True)
    if reduction > 1:
        raise ValueError(f"Config `reduction` must be in (0, 1]; got {reduction}.")
    return DenseNetBC(
        growth_rate=C.check_positive_int(cfg["growth_rate"], "growth_rate"),
        block_sizes=C.check_positive_ints(cfg["block_sizes"], "block_sizes"),
        bottleneck_width=C.check_positive_int(cfg["bottleneck_width"], "bottleneck_width"),
        reduction=reduction,
        transition_padding=C.check_positive_int(cfg["transition_padding"], "transition_padding", 0),
        **C.classifier_kwargs(cfg),
    )
