"""ImageNet ResNet-50 (torchvision layout, stride in the 3×3 conv) with BN, SMN or Fixup.

Stem conv7×7/2 (64) → norm → act → max-pool 3×3/2; stages of [3, 4, 6, 3]
bottlenecks conv1×1 (w) → norm → act → conv3×3 (w, stride) → norm → act →
conv1×1 (4w) → norm, with a conv1×1 (stride) → norm projection shortcut in the
first block of each stage; the activation after each addition; global average
pooling and fc 2048 → 1000. 25,557,032 parameters with BN.

Normalization: "batchnorm", "smn" / "smn_l1" (centred convs everywhere, as in
the reference ``resnet_mn.py``), and the other options of ``common.CONV_NORMALIZATIONS``.
With ``normalization="none"``, ``fixup`` selects the initialization of derivations §13
(L = 16 blocks, m = 3 convs per branch):

=============  ==============================  ==============================
layer          ``fixup="original"``            ``fixup="ours"`` (the paper's)
=============  ==============================  ==============================
conv1, conv2   √(2/fan_out)·L^(−1/4)           √(2/fan_in)·L^(−p/(2m)), p = ``fixup_p``
conv3          0                               0
projection     √(2/fan_out)                    √(1/fan_in)
fc             0 (weight and bias)             0 (weight and bias)
=============  ==============================  ==============================

(√2 is the activation gain ``gain``.) ``fixup_scalars`` adds Fixup's scalar
biases before each conv and activation, the branch-end multiplier and bias, a
bias after the stem conv and one before the fc layer.

Blocks, with the post-addition activation moved to the start of the next block
(see :mod:`gne_jax.models.resnet_cifar`): ``stem``; ``stage1.block1``
(``h ↦ P(h) + B(h)``, input already activated); ``stage{s}.block1`` for s ≥ 2
(``h ↦ P(act h) + B(act h)``); ``stage{s}.block2..n`` (one scanned group,
``h ↦ act h + B(act h)``); ``head`` (act → pool → fc).
"""

from __future__ import annotations

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNet, ResidualBlock, residual_stage

FIXUPS = ("none", "original", "ours")
DEFAULTS = C.family_defaults(
    stage_sizes=(3, 4, 6, 3),
    width=64,
    num_classes=1000,
    normalization="batchnorm",
    fixup="none",
    fixup_p=2.0,
    fixup_scalars=True,
)
EXPANSION = 4


class Bottleneck(ResidualBlock):
    """``shortcut(h) + branch(h)``; with ``act_first`` both act on ``act(h)``."""

    features: int
    init12: object  # kernel initializers of conv1/conv2, conv3, projection
    init3: object
    init_proj: object
    projection: bool = False

    def setup(self):
        out = EXPANSION * self.features
        self.conv1 = self.branch_conv(self.features, 1, self.init12)
        self.norm1 = self.norm_spec.norm(self.train)
        self.conv2 = self.branch_conv(self.features, 3, self.init12, self.strides)
        self.norm2 = self.norm_spec.norm(self.train)
        self.conv3 = self.branch_conv(out, 1, self.init3)
        self.norm3 = self.norm_spec.norm(self.train)
        self.act1 = self.act_spec.make()
        self.act2 = self.act_spec.make()
        if self.projection:
            self.proj = self.branch_conv(out, 1, self.init_proj, self.strides)
            self.proj_norm = self.norm_spec.norm(self.train)
        self.setup_fixup(3)

    def branch(self, h):
        convs = (self.conv1, self.conv2, self.conv3)
        norms = (self.norm1, self.norm2, self.norm3)
        return self.fixup_branch(h, convs, norms, (self.act1, self.act2))

    def shortcut(self, h):
        h = self._input(h)
        if not self.projection:
            return h
        return C.maybe(self.proj_norm, self.proj(self._bias(h, "bias1a")))


class ResNet50(ConvNet):
    """ImageNet bottleneck ResNet (see the module docstring); ResNet-50 by default."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000
    fixup: str = "none"
    fixup_p: float = 2.0
    fixup_scalars: bool = True

    @property
    def scalars(self) -> bool:
        return self.fixup != "none" and self.fixup_scalars

    def _inits(self):
        """(conv1/conv2, conv3, projection) initializers (derivations §13 table)."""
        L, m = sum(self.stage_sizes), 3
        kn = lambda g, mode: C.kernel_init("kaiming_normal", g, mode=mode)  # noqa: E731
        if self.fixup == "original":
            return (
                kn(self.gain * L ** (-1 / (2 * m - 2)), "fan_out"),
                C.zeros_init,
                kn(self.gain, "fan_out"),
            )
        if self.fixup == "ours":
            scale = C.fixup_scale(L, self.fixup_p, m)
            return kn(self.gain * scale, "fan_in"), C.zeros_init, kn(1.0, "fan_in")
        init = C.kernel_init(self.init_name, self.gain)
        return init, init, init

    def _block(self, features, strides, projection, act_first):
        return C.module_factory(
            Bottleneck,
            features,
            *self._inits(),
            projection=projection,
            act_spec=self.act_spec,
            norm_spec=self.norm_spec,
            gain=self.gain,
            strides=strides,
            act_first=act_first,
            scalars=self.scalars,
        )

    def layout(self):
        stem = self.conv_layer(
            self.width, 2, 7, use_bias=False, scalar_bias=self.scalars, pool=True
        )
        stages = [C.Stage("stem", ("stem",), stem)]
        for s, n in enumerate(self.stage_sizes, start=1):
            w = self.width * 2 ** (s - 1)
            first = self._block(w, 1 if s == 1 else 2, True, act_first=s > 1)
            stages += residual_stage(s, n, first, self._block(w, 1, False, True))
        head = self.head_stage(
            act_spec=self.act_spec, scalar_bias=self.scalars, zero=self.fixup != "none"
        )
        stages.append(head)
        return stages


def from_config(cfg: dict) -> ResNet50:
    kwargs = C.classifier_kwargs(cfg)
    fixup = C.check_choice(cfg["fixup"], "fixup", FIXUPS)
    if fixup != "none":
        C.check_fixup_normalization(f"`fixup`={fixup!r}", kwargs["norm_spec"].name)
        if kwargs["init_name"] != "kaiming_normal":
            raise ValueError(
                f"Fixup sets Gaussian inits (derivations §13): it needs init='kaiming_normal'; "
                f"got init={kwargs['init_name']!r}."
            )
    return ResNet50(
        stage_sizes=C.check_positive_ints(cfg["stage_sizes"], "stage_sizes"),
        width=C.check_positive_int(cfg["width"], "width"),
        fixup=fixup,
        fixup_p=C.check_float(cfg["fixup_p"], "fixup_p", positive=True),
        fixup_scalars=bool(cfg["fixup_scalars"]),
        **kwargs,
    )
