"""Layer blocks shared by the convolutional families: conv→norm→act and the heads."""

from __future__ import annotations

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



def conv_layer_factory(model, features: int, strides: int = 1, kernel_size: int = 3):
    """``make(train, **kw)`` building a ``ConvNormAct`` with ``model``'s activation,
    normalization and init (the stage factory of the plain conv nets)."""

    def make(train, **kw):
        return ConvNormAct(features, kernel_size, model.act_spec, model.norm_spec,
                           model.init_name, model.gain, strides=strides, train=train, **kw)

    return make


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
