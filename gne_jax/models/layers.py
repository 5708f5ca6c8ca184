"""Pieces shared by the convolutional families: conv→norm→act, the head, the
:class:`ConvNet` base and the :class:`ResidualBlock` base of the ResNet blocks."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from gne_jax.models import common as C


class ConvNormAct(nn.Module):
    """``h ↦ act(norm(conv(h) [+ b]))``: one plain convolutional layer as a block.

    ``use_bias=None`` puts a conv bias only when there is no normalization layer
    (the paper's serial CNN). ``scalar_bias`` adds Fixup's scalar bias after the conv.
    ``act_spec=None`` leaves out the activation, ``use_norm=False`` the normalization
    layer; ``pool=True`` appends the ImageNet stem's 3×3/2 max-pool.
    """

    features: int
    kernel_size: int
    act_spec: C.ActivationSpec | None
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    strides: int = 1
    padding: int | None = None
    use_bias: bool | None = None
    scalar_bias: bool = False
    use_norm: bool = True
    pool: bool = False
    train: bool = False

    def setup(self):
        # the paper's rule: conv biases only in networks without normalization layers
        use_bias = (not self.norm_spec.has_norm_layer) if self.use_bias is None else self.use_bias
        self.conv = self.norm_spec.conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_init=C.kernel_init(self.init_name, self.gain),
            use_bias=use_bias,
            gain=self.gain,
        )
        self.norm = self.norm_spec.norm(self.train) if self.use_norm else None
        if self.scalar_bias:
            self.bias = self.param("bias", C.zeros_init, (), C.param_dtype())
        if self.act_spec is not None:
            self.act = self.act_spec.make()

    def __call__(self, h):
        h = self.conv(h)
        if self.scalar_bias:
            h = h + self.bias.astype(h.dtype)
        h = C.maybe(self.norm, h)
        h = h if self.act_spec is None else self.act(h)
        if self.pool:  # ImageNet stem: max-pool 3×3, stride 2, padding 1 (−inf padding)
            h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return h


class Head(nn.Module):
    """``h ↦ dense(mean_{H,W}(act(norm(h))) [+ b])``: the classifier of the conv nets.

    ``pre_norm``/``act_spec`` give DenseNet's final norm→act and the ResNets'
    post-addition activation; ``scalar_bias`` is Fixup's bias before the fc layer;
    ``zero`` initializes the fc weight and bias to 0 (Fixup).
    """

    num_classes: int
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    act_spec: C.ActivationSpec | None = None
    pre_norm: bool = False
    scalar_bias: bool = False
    zero: bool = False
    train: bool = False

    def setup(self):
        if self.pre_norm:
            self.norm = self.norm_spec.norm(self.train)
        if self.act_spec is not None:
            self.act = self.act_spec.make()
        if self.scalar_bias:
            self.bias = self.param("bias", C.zeros_init, (), C.param_dtype())
        self.dense = nn.Dense(
            self.num_classes,
            kernel_init=C.zeros_init if self.zero else C.kernel_init(self.init_name, self.gain),
            dtype=self.norm_spec.dtype,
            param_dtype=C.param_dtype(),
        )

    def __call__(self, h):
        if self.pre_norm:
            h = C.maybe(self.norm, h)
        if self.act_spec is not None:
            h = self.act(h)
        h = jnp.mean(h, axis=(1, 2))  # global average pooling (avg-pool 8 / 7 at full size)
        if self.scalar_bias:
            h = h + self.bias.astype(h.dtype)
        return self.dense(h)


class ConvNet(C.Classifier):
    """Base of the convolutional families (NHWC images): their conv layers and head."""

    norm_spec: C.NormSpec = C.NormSpec("batchnorm")

    def check_input(self, x):
        C.check_input(x, 4, f"{type(self).__name__} (NHWC images)")

    def conv_layer(self, features: int, strides: int = 1, kernel_size: int = 3, **fields):
        """``make(train, **kw)`` building a :class:`ConvNormAct` with this model's
        activation, normalization, init and gain; ``fields`` override or add
        ConvNormAct fields (e.g. ``act_spec=None``, ``pool=True``)."""
        fields = {
            "act_spec": self.act_spec,
            "norm_spec": self.norm_spec,
            "init_name": self.init_name,
            "gain": self.gain,
            "strides": strides,
            **fields,
        }
        return C.module_factory(ConvNormAct, features, kernel_size, **fields)

    def head_stage(self, **fields) -> C.Stage:
        """The ``head`` stage: a :class:`Head` with this model's classes and head init."""
        make = C.module_factory(
            Head, self.num_classes, self.norm_spec, self.head_init, self.head_gain, **fields
        )
        return C.Stage("head", ("head",), make)


def residual_stage(s: int, num_blocks: int, first, rest, **first_kw) -> list[C.Stage]:
    """Stage ``s`` of a ResNet: ``stage{s}.block1`` (``make`` ``first``) on its own,
    as it may change the shape, and blocks 2..n (``rest``) as one scanned group."""
    stages = [C.Stage(f"stage{s}_block1", (f"stage{s}.block1",), first, residual=True, **first_kw)]
    names = tuple(f"stage{s}.block{i}" for i in range(2, num_blocks + 1))
    if names:
        stages.append(C.Stage(f"stage{s}", names, rest, scanned=True, residual=True))
    return stages


class ResidualBlock(nn.Module):
    """Base of the ResNet blocks: ``shortcut(h) + branch(h)``, the activation in
    front and Fixup's scalars.

    The shared fields are keyword-only (subclasses put their own fields first).
    ``setup`` calls :meth:`setup_fixup`; a branch of m convs is
    :meth:`fixup_branch`: with ``scalars``, a bias before each conv (``bias{k}a``)
    and after each norm (``bias{k}b``), the multiplier ``scale`` (init 1) before the
    last bias; with ``act_first`` the input is ``act_in(h)`` (the previous block's
    post-addition activation, see :mod:`gne_jax.models.resnet_cifar`).
    """

    _: dataclasses.KW_ONLY
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    gain: float
    strides: int = 1
    act_first: bool = True
    scalars: bool = False
    train: bool = False

    def branch_conv(self, features: int, kernel_size: int, kernel_init, strides: int = 1):
        """A conv of the block: this scheme's conv, no bias, the block's gain."""
        return self.norm_spec.conv(
            features,
            kernel_size,
            strides=strides,
            kernel_init=kernel_init,
            use_bias=False,
            gain=self.gain,
        )

    def setup_fixup(self, num_convs: int) -> None:
        if self.act_first:
            self.act_in = self.act_spec.make()
        if self.scalars:
            pd = C.param_dtype()
            for k in range(1, num_convs + 1):
                for name in (f"bias{k}a", f"bias{k}b"):
                    setattr(self, name, self.param(name, C.zeros_init, (), pd))
            self.scale = self.param("scale", nn.initializers.ones, (), pd)

    def _input(self, h):
        return self.act_in(h) if self.act_first else h

    def _bias(self, h, name):
        return h + getattr(self, name).astype(h.dtype) if self.scalars else h

    def fixup_branch(self, h, convs, norms, acts):
        """act_in → bias1a → conv1 → norm1 → bias1b → act1 → bias2a → … → norm_m
        → ·scale → bias_mb; ``acts`` has one activation fewer than ``convs``."""
        h = self._input(h)
        for k, (conv, norm) in enumerate(zip(convs, norms, strict=True), start=1):
            h = C.maybe(norm, conv(self._bias(h, f"bias{k}a")))
            if k == len(convs):
                break
            h = acts[k - 1](self._bias(h, f"bias{k}b"))
        if self.scalars:
            h = h * self.scale.astype(h.dtype)
        return self._bias(h, f"bias{len(convs)}b")

    def __call__(self, h):
        return self.shortcut(h) + self.branch(h)
