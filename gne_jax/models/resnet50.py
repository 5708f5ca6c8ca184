"""ImageNet ResNet-50 (torchvision layout, stride in the 3×3 conv) with BN, SMN or Fixup.

Stem conv7×7/2 (64) → norm → act → max-pool 3×3/2; stages of [3, 4, 6, 3]
bottlenecks conv1×1 (w) → norm → act → conv3×3 (w, stride) → norm → act →
conv1×1 (4w) → norm, with a conv1×1 (stride) → norm projection shortcut in the
first block of each stage; the activation after each addition; global average
pooling and fc 2048 → 1000. 25,557,032 parameters with BN.

Normalization: "batchnorm", "smn" / "smn_l1" (centred convs everywhere, as in
the reference ``resnet_mn.py``), and the other options of ``NORMALIZATIONS``.
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

import flax.linen as nn

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNormAct, Head

FIXUPS = ("none", "original", "ours")
DEFAULTS = {
    "stage_sizes": (3, 4, 6, 3),
    "width": 64,
    "num_classes": 1000,
    **C.ACTIVATION_DEFAULTS,
    "init": "kaiming_normal",
    "gain": None,
    "normalization": "batchnorm",
    "fixup": "none",
    "fixup_p": 2.0,
    "fixup_scalars": True,
    "head_init": "kaiming_normal",
    "head_gain": 1.0,
    "dtype": None,
}
NORMALIZATIONS = ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly")
EXPANSION = 4


class Bottleneck(nn.Module):
    """``shortcut(h) + branch(h)``; with ``act_first`` both act on ``act(h)``."""

    features: int
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init12: object  # kernel initializers of conv1/conv2, conv3, projection
    init3: object
    init_proj: object
    gain: float
    strides: int = 1
    projection: bool = False
    act_first: bool = True
    scalars: bool = False
    train: bool = False

    def setup(self):
        def conv(features, k, init, strides=1):
            return self.norm_spec.conv(
                features, k, strides=strides, kernel_init=init, use_bias=False, gain=self.gain
            )

        out = EXPANSION * self.features
        self.conv1 = conv(self.features, 1, self.init12)
        self.norm1 = self.norm_spec.norm(self.train)
        self.conv2 = conv(self.features, 3, self.init12, self.strides)
        self.norm2 = self.norm_spec.norm(self.train)
        self.conv3 = conv(out, 1, self.init3)
        self.norm3 = self.norm_spec.norm(self.train)
        self.act1 = self.act_spec.make()
        self.act2 = self.act_spec.make()
        if self.act_first:
            self.act_in = self.act_spec.make()
        if self.projection:
            self.proj = conv(out, 1, self.init_proj, self.strides)
            self.proj_norm = self.norm_spec.norm(self.train)
        if self.scalars:
            zeros, pd = C.zeros_init, C.param_dtype()
            for name in ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b"):
                setattr(self, name, self.param(name, zeros, (), pd))
            self.scale = self.param("scale", nn.initializers.ones, (), pd)

    def _input(self, h):
        h = self.act_in(h) if self.act_first else h
        return h

    def _bias(self, h, name):
        return h + getattr(self, name).astype(h.dtype) if self.scalars else h

    def branch(self, h):
        h = self._bias(self._input(h), "bias1a")
        h = self._bias(C.maybe(self.norm1, self.conv1(h)), "bias1b")
        h = self._bias(self.act1(h), "bias2a")
        h = self._bias(C.maybe(self.norm2, self.conv2(h)), "bias2b")
        h = self._bias(self.act2(h), "bias3a")
        h = C.maybe(self.norm3, self.conv3(h))
        if self.scalars:
            h = h * self.scale.astype(h.dtype)
        return self._bias(h, "bias3b")

    def shortcut(self, h):
        h = self._input(h)
        if not self.projection:
            return h
        return C.maybe(self.proj_norm, self.proj(self._bias(h, "bias1a")))

    def __call__(self, h):
        return self.shortcut(h) + self.branch(h)


class ResNet50(C.BlockModel):
    """ImageNet bottleneck ResNet (see the module docstring); ResNet-50 by default."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000
    act_spec: C.ActivationSpec = C.ActivationSpec()
    init_name: str = "kaiming_normal"
    gain: float = 2.0**0.5
    norm_spec: C.NormSpec = C.NormSpec("batchnorm")
    fixup: str = "none"
    fixup_p: float = 2.0
    fixup_scalars: bool = True
    head_init: str = "kaiming_normal"
    head_gain: float = 1.0

    def check_input(self, x):
        C.check_input(x, 4, "ResNet50 (NHWC images)")

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
            scale = L ** (-self.fixup_p / (2 * m))
            return kn(self.gain * scale, "fan_in"), C.zeros_init, kn(1.0, "fan_in")
        init = C.kernel_init(self.init_name, self.gain)
        return init, init, init

    def _block(self, features, strides, projection, act_first):
        init12, init3, init_proj = self._inits()

        def make(train, **kw):
            return Bottleneck(
                features,
                self.act_spec,
                self.norm_spec,
                init12,
                init3,
                init_proj,
                self.gain,
                strides=strides,
                projection=projection,
                act_first=act_first,
                scalars=self.scalars,
                train=train,
                **kw,
            )

        return make

    def layout(self):
        stem = lambda train, **kw: ConvNormAct(  # noqa: E731
            self.width,
            7,
            self.act_spec,
            self.norm_spec,
            self.init_name,
            self.gain,
            strides=2,
            use_bias=False,
            scalar_bias=self.scalars,
            pool=True,
            train=train,
            **kw,
        )
        stages = [C.Stage("stem", ("stem",), stem)]
        for s, n in enumerate(self.stage_sizes, start=1):
            w = self.width * 2 ** (s - 1)
            stages.append(
                C.Stage(
                    f"stage{s}_block1",
                    (f"stage{s}.block1",),
                    self._block(w, 1 if s == 1 else 2, True, act_first=s > 1),
                    residual=True,
                )
            )
            names = tuple(f"stage{s}.block{i}" for i in range(2, n + 1))
            if names:
                make = self._block(w, 1, False, True)
                stages.append(C.Stage(f"stage{s}", names, make, scanned=True, residual=True))
        head = lambda train, **kw: Head(  # noqa: E731
            self.num_classes,
            self.norm_spec,
            self.head_init,
            self.head_gain,
            act_spec=self.act_spec,
            scalar_bias=self.scalars,
            zero=self.fixup != "none",
            train=train,
            **kw,
        )
        stages.append(C.Stage("head", ("head",), head))
        return stages


def from_config(cfg: dict) -> ResNet50:
    act = C.activation_spec(cfg)
    norm = C.norm_spec(cfg, NORMALIZATIONS)
    fixup = C.check_choice(cfg["fixup"], "fixup", FIXUPS)
    init = C.check_init(cfg["init"])
    if fixup != "none":
        if norm.name != "none":
            raise ValueError(
                f"Fixup (`fixup`={fixup!r}) replaces normalization: it needs "
                f"normalization='none'; got normalization={norm.name!r}."
            )
        if init != "kaiming_normal":
            raise ValueError(
                f"Fixup sets Gaussian inits (derivations §13): it needs init='kaiming_normal'; "
                f"got init={init!r}."
            )
    p = C.check_float(cfg["fixup_p"], "fixup_p", positive=True)
    return ResNet50(
        stage_sizes=C.check_positive_ints(cfg["stage_sizes"], "stage_sizes"),
        width=C.check_positive_int(cfg["width"], "width"),
        num_classes=C.check_positive_int(cfg["num_classes"], "num_classes"),
        act_spec=act,
        init_name=init,
        gain=C.resolve_gain(cfg, act),
        norm_spec=norm,
        fixup=fixup,
        fixup_p=p,
        fixup_scalars=bool(cfg["fixup_scalars"]),
        head_init=C.check_init(cfg["head_init"], "head_init", conv=False),
        head_gain=C.check_float(cfg["head_gain"], "head_gain", positive=True),
    )
