"""Multilayer perceptron: plain, residual ("pre"/"post") and the Meterez construction.

Blocks (names in ``model.blocks``):

* ``input``: linear projection ``x ↦ W₀x`` to the width (absent with
  ``input_layer=False``, then the input must already have ``width`` features);
* ``layer1 … layer{depth}``: one scanned group of identical hidden blocks,
  - ``residual="none"``: ``h ↦ f(N(Wh))``,
  - ``residual="post"``: ``h ↦ h + a·f(N(Wh))``  (f(Wx) + x for a = 1),
  - ``residual="pre"``:  ``h ↦ h + a·W f(N(h))``,
  with N the normalization (identity for "none") and a = ``residual_scale``;
* ``head``: linear readout to ``num_classes`` (absent when ``num_classes`` is None).

The Meterez et al. construction (derivations §14.2) is ``init="orthogonal"``,
``normalization="meterez"``, ``activation`` one of linear / shaped_tanh /
shaped_sin (gain α_ℓ = ℓ^(−shaped_exponent) at hidden layer ℓ = 1..depth) and a
batch equal to the width.
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from gne_jax.models import common as C
from gne_jax.nn import activations as _act

RESIDUALS = ("none", "pre", "post")

DEFAULTS = C.family_defaults(
    depth=10,
    width=256,
    input_layer=True,
    shaped_exponent=0.4,
    residual="none",
    residual_scale=1.0,
    use_bias=False,
    num_classes=10,
    normalization="none",
)


class MLPBlock(nn.Module):
    """One hidden block (see the module docstring for the three forms)."""

    width: int
    act_spec: C.ActivationSpec
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    residual: str = "none"
    residual_scale: float = 1.0
    use_bias: bool = False
    train: bool = False

    def setup(self):
        self.dense = self.norm_spec.dense(
            self.width,
            kernel_init=C.kernel_init(self.init_name, self.gain),
            use_bias=self.use_bias,
            gain=self.gain,
        )
        self.norm = self.norm_spec.norm(self.train)
        if self.act_spec.name not in C.SHAPED:
            self.act = self.act_spec.make()

    def _activation(self, h, xs):
        if self.act_spec.name in C.SHAPED:  # the layer index ℓ arrives as xs (traced)
            return _act.get_activation(self.act_spec.name, **self.act_spec.kwargs(xs))(h)
        return self.act(h)

    def branch(self, h, xs=None):
        if self.residual == "pre":
            out = self.dense(self._activation(C.maybe(self.norm, h), xs))
        else:
            out = self._activation(C.maybe(self.norm, self.dense(h)), xs)
        return out if self.residual == "none" else self.residual_scale * out

    def shortcut(self, h, xs=None):
        return h

    def __call__(self, h, xs=None):
        out = self.branch(h, xs)
        return out if self.residual == "none" else self.shortcut(h, xs) + out


class Linear(nn.Module):
    """A dense layer as a block (input projection or readout)."""

    features: int
    norm_spec: C.NormSpec
    init_name: str
    gain: float
    use_bias: bool = False
    zero: bool = False
    train: bool = False

    @nn.compact
    def __call__(self, h):
        init = C.zeros_init if self.zero else C.kernel_init(self.init_name, self.gain)
        dense = nn.Dense(
            self.features,
            use_bias=self.use_bias,
            kernel_init=init,
            dtype=self.norm_spec.dtype,
            param_dtype=C.param_dtype(),
            name="dense",
        )
        return dense(h)


class MLP(C.Classifier):
    """MLP with the blocks ``input``, ``layer1..layer{depth}`` (scanned), ``head``."""

    depth: int = 10
    width: int = 256
    input_layer: bool = True
    residual: str = "none"
    residual_scale: float = 1.0
    use_bias: bool = False

    def check_input(self, x):
        C.check_input(x, 2, "MLP", None if self.input_layer else self.width)

    def _linear(self, name, features, init_name, gain) -> C.Stage:
        """The input projection or the readout as a one-block stage."""
        make = C.module_factory(Linear, features, self.norm_spec, init_name, gain, self.use_bias)
        return C.Stage(name, (name,), make)

    def layout(self):
        stages = []
        if self.input_layer:
            stages.append(self._linear("input", self.width, self.init_name, 1.0))
        shaped = self.act_spec.name in C.SHAPED
        hidden = C.module_factory(
            MLPBlock,
            self.width,
            self.act_spec,
            self.norm_spec,
            self.init_name,
            self.gain,
            self.residual,
            self.residual_scale,
            self.use_bias,
        )
        stages.append(
            C.Stage(
                "hidden",
                tuple(f"layer{i}" for i in range(1, self.depth + 1)),
                hidden,
                scanned=True,
                xs=np.arange(1, self.depth + 1, dtype=np.float32) if shaped else None,
                residual=self.residual != "none",
                identity_shortcut=True,
            )
        )
        if self.num_classes is not None:
            stages.append(self._linear("head", self.num_classes, self.head_init, self.head_gain))
        return stages


def from_config(cfg: dict) -> MLP:
    """Validated :class:`MLP` from a merged config dict (see ``DEFAULTS``)."""
    kwargs = C.classifier_kwargs(cfg, C.NORMALIZATIONS, conv=False)
    return MLP(
        depth=C.check_positive_int(cfg["depth"], "depth"),
        width=C.check_positive_int(cfg["width"], "width"),
        input_layer=bool(cfg["input_layer"]),
        residual=C.check_choice(cfg["residual"], "residual", RESIDUALS),
        residual_scale=C.check_float(cfg["residual_scale"], "residual_scale"),
        use_bias=bool(cfg["use_bias"]),
        **kwargs,
    )
