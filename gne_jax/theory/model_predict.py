"""Predictions for the library's own models, read from their configs.

`predict_model(config, input_shape)` builds the component tree of an MLP, the
serial CNN or a CIFAR ResNet from the same config `gne_jax.models.create_model`
takes and returns the predicted φ(JJᵀ), ϕ(JJᵀ) of every block the model exposes
(`model.blocks`, same names, same order) and end to end. Batch-coupled layers use
the batch convention of derivations §1.4: in training mode a BN/SMN channel shares its
statistics over M = batch·H·W values.

Modelling choices (see docs/theory.md for their measured accuracy):
* inputs are N(0, q_in) entries; the forward map tracks the second moment, the
  within-channel batch variance and the mean of every activation;
* Kaiming/Xavier weights are treated as Gaussian with their variance; orthogonal
  dense weights are Haar; conv borders (zero padding) are modelled for φ;
* ResNet blocks are ``(S + B)∘act`` (the post-addition ReLU moved to the start
  of the next block, as `gne_jax.models.resnet_cifar` exposes them), with the
  zero-padded down-sampling shortcut as its own component;
* eval mode uses the initial running statistics (mean 0, var/RMS 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gne_jax.theory import components as C
from gne_jax.theory.components import Signal, as_signal
from gne_jax.theory.compose import Prediction, Repeat, Residual, Serial, predict

__all__ = ["ModelPrediction", "model_network", "predict_model", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = ("mlp", "serial_cnn", "resnet_cifar")
NORM_EPS = 1e-5
# Normalizations whose per-block moments the component library does not capture (measured
# against block_moments), refused rather than predicted wrongly.
UNMODELLED_NORMALIZATIONS = {
    "meterez": "the component prediction of its per-block φ is 15-40% off the measured one "
               "with ReLU.",
}


class ModelPrediction(NamedTuple):
    """Predicted moments of a model: one entry per exposed block, and end to end.

    ``names``/``phi``/``varphi``/``q_in`` are aligned with the flattened blocks of
    ``model.blocks(...)`` (`gne_jax.iter_blocks` order); ``network`` is the whole
    prediction tree (end-to-end φ, ϕ in ``network.phi``, ``network.varphi``).
    """

    names: tuple[str, ...]
    phi: np.ndarray
    varphi: np.ndarray
    q_in: np.ndarray
    network: Prediction

    @property
    def end_to_end(self):
        return C.Moments(self.network.phi, self.network.varphi)

    def rows(self) -> list[tuple[str, float, float]]:
        """``(name, φ, ϕ)`` per block, the form `compare` takes."""
        return [(n, float(p), float(v)) for n, p, v in
                zip(self.names, self.phi, self.varphi, strict=True)]


# ---------------------------------------------------------------------------
# Layer builders from the model's resolved options
# ---------------------------------------------------------------------------


def _activation(spec, layer_index=None):
    name = spec.name
    if name == "relu":
        return C.relu()
    if name == "leaky_relu":
        return C.leaky_relu(spec.negative_slope)
    if name == "prelu":
        return C.prelu(0.25)
    if name == "sprelu":
        return C.sprelu(0.25)
    if name == "tanh":
        return C.tanh()
    if name == "sigmoid":
        return C.sigmoid()
    if name == "selu":
        return C.selu()
    if name == "selu_depth_aware":
        from gne_jax.nn.activations import selu_coefficients

        lam, alpha = selu_coefficients(spec.selu_epsilon, spec.selu_gamma0)
        return C.selu(lam, alpha)
    if name == "linear":
        return C.identity()
    if name in ("shaped_tanh", "shaped_sin"):
        g = float(layer_index) ** (-spec.shaped_exponent)
        f = jnp.tanh if name == "shaped_tanh" else jnp.sin
        return C.smooth_activation(lambda h, g=g, f=f: f(g * h), f"{name}(α={g:.3g})")
    raise ValueError(f"no component for activation {name!r}")


def _dense_weight(init, gain, n, m):
    if init in ("kaiming_normal", "kaiming_uniform"):
        return C.dense_gaussian(n, m, sigma2=gain**2 / n)
    if init in ("xavier_normal", "xavier_uniform"):
        return C.dense_gaussian(n, m, sigma2=gain**2 * 2.0 / (n + m))
    if init == "orthogonal":
        return C.orthogonal(n, m, gain=gain)
    raise ValueError(f"no dense component for init {init!r}")


def _dense(norm, init, gain, n, m):
    """The hidden dense layer of an MLP with normalization scheme ``norm``."""
    if norm in ("smn", "smn_l1"):
        if init == "orthogonal":  # centred Haar rows: approximately φ = gain²(1 − 1/n)
            base = C.orthogonal(n, m, gain=gain)
            mom = base.moments(1.0)
            return C._linear(f"orthogonal_centred({n}->{m})", mom.phi * (1 - 1 / n), mom.varphi,
                             m / n, centred=True)
        w = _dense_weight(init, gain, n, m).moments(1.0)
        return C.dense_centred(n, m, sigma2=float(w.phi) / n)
    if norm == "sws":
        return C.dense_standardized(n, m, gain=gain)
    if norm == "weightnorm":
        return C.weightnorm_dense(n, m, gain=gain)
    return _dense_weight(init, gain, n, m)


def _conv(norm, init, gain, c_in, c_out, stride, hw):
    """The 3×3 convolution of a conv net (PyTorch padding 1) with scheme ``norm``."""
    kw = dict(stride=stride, input_hw=hw, padding=1)
    fan_in = c_in * 9
    if norm == "sws":
        return C.sws_conv(c_in, c_out, 3, gain=gain, **kw)
    if norm == "weightnorm":  # rows of squared norm gain²
        return C.conv_gaussian(c_in, c_out, 3, sigma2=gain**2 / fan_in, **kw)
    centred = norm in ("smn", "smn_l1")
    if init in ("kaiming_normal", "kaiming_uniform"):
        return C.conv_gaussian(c_in, c_out, 3, sigma2=gain**2 / fan_in, centred=centred, **kw)
    if init in ("xavier_normal", "xavier_uniform"):
        s2 = gain**2 * 2.0 / (fan_in + c_out * 9)
        return C.conv_gaussian(c_in, c_out, 3, sigma2=s2, centred=centred, **kw)
    if init == "orthogonal":
        return C.conv_orthogonal_flat(c_in, c_out, 3, gain=gain, stride=stride, input_hw=hw,
                                      padding=1)
    if init == "delta_orthogonal":
        return C.delta_orthogonal(c_in, c_out, gain=gain, stride=stride)
    raise ValueError(f"no conv component for init {init!r}")


def _norm(norm, M, train, fan_in=None):
    """The normalization layer (γ = 1, β = 0 at init), or None.

    ``fan_in`` of the preceding layer sets the rank min(M − 1, fan_in) of the
    channel-to-channel Jensen correction (see `components.batchnorm_train`).
    """
    r = None if fan_in is None else min(M - 1, fan_in)
    r = r if r is not None and r >= 5 else None
    jw = dict(rank=r, fan_in=fan_in)
    if norm == "batchnorm":
        return (C.batchnorm_train(M, eps=NORM_EPS, **jw) if train
                else C.batchnorm_eval(eps=NORM_EPS))
    if norm == "smn":
        return C.smn_train(M, eps=NORM_EPS, **jw) if train else C.smn_eval(eps=NORM_EPS)
    if norm == "smn_l1":  # divide by E|x| ≈ √(2q/π) for Gaussian input: γ_eff = √(π/2)
        g = math.sqrt(math.pi / 2)
        return (C.smn_train(M, gamma=g, eps=NORM_EPS, **jw) if train
                else C.smn_eval(eps=NORM_EPS))
    if norm in ("meanonly", "weightnorm"):
        return C.meanonly_train(M) if train else C.identity()
    if norm == "meterez":
        return C.smn_train(M, gamma=1.0 / math.sqrt(M)) if train else C.identity()
    return None


def _chain(*parts, name):
    return Serial(tuple(p for p in parts if p is not None), name=name)


def _out_hw(hw, stride):
    return (hw + 2 - 3) // stride + 1


# ---------------------------------------------------------------------------
# Families: a list of (block names, node) groups
# ---------------------------------------------------------------------------


def _mlp_groups(model, input_shape, train):
    B, d_in = input_shape
    w = model.width
    norm = model.norm_spec.name
    act = model.act_spec
    groups = []
    if model.input_layer:
        groups.append((("input",), _dense_weight(model.init_name, 1.0, d_in, w)))

    def hidden(idx=None):
        a = _activation(act, idx)
        W = _dense(norm, model.init_name, model.gain, w, w)
        N = _norm(norm, B, train, None if model.residual == "pre" else w)
        if model.residual == "pre":
            return Residual(_chain(N, a, W, name="branch"), scale=model.residual_scale)
        body = _chain(W, N, a, name="block")
        if model.residual == "post":
            return Residual(body, scale=model.residual_scale)
        return body

    names = tuple(f"layer{i}" for i in range(1, model.depth + 1))
    if act.name in ("shaped_tanh", "shaped_sin"):
        groups.append((names, Serial(tuple(hidden(i) for i in range(1, model.depth + 1)))))
    else:
        groups.append((names, Repeat(hidden(), model.depth, name="hidden")))
    if model.num_classes is not None:
        groups.append((("head",), _dense_weight(model.head_init, model.head_gain, w,
                                                model.num_classes)))
    return groups


def _conv_layer(model, c_in, c_out, stride, hw, B, train, act=True):
    norm = model.norm_spec.name
    out = _out_hw(hw, stride)
    return _chain(
        _conv(norm, model.init_name, model.gain, c_in, c_out, stride, hw),
        _norm(norm, B * out * out, train, c_in * 9),
        _activation(model.act_spec) if act else None,
        name="layer",
    ), out


def _head(model, c, hw, act):
    return _chain(
        _activation(model.act_spec) if act else None,
        C.global_avg_pool(hw * hw),
        _dense_weight(model.head_init, model.head_gain, c, model.num_classes),
        name="head",
    )


def _serial_cnn_groups(model, input_shape, train):
    B, H, W, c0 = input_shape
    if H != W:
        raise ValueError(f"predict_model needs square images; got input_shape {input_shape}")
    n = (model.depth - 2) // 6
    groups, hw, c = [], H, c0
    node, hw = _conv_layer(model, c, model.widths[0], 1, hw, B, train)
    groups.append((("stem",), node))
    c = model.widths[0]
    for s, w in enumerate(model.widths, start=1):
        first = 1
        if s > 1:
            node, hw = _conv_layer(model, c, w, 2, hw, B, train)
            groups.append(((f"stage{s}.layer1",), node))
            c, first = w, 2
        names = tuple(f"stage{s}.layer{i}" for i in range(first, 2 * n + 1))
        if names:
            node, _ = _conv_layer(model, c, c, 1, hw, B, train)
            groups.append((names, Repeat(node, len(names), name=f"stage{s}")))
    groups.append((("head",), _head(model, c, hw, act=False)))
    return groups


def _resnet_groups(model, input_shape, train):
    B, H, W, c0 = input_shape
    if H != W:
        raise ValueError(f"predict_model needs square images; got input_shape {input_shape}")
    from gne_jax.models.resnet_cifar import fixup_scale

    n = (model.depth - 2) // 6
    norm = model.norm_spec.name
    bgain = model.gain * fixup_scale(3 * n, model.fixup_p, 2)
    groups, hw = [], H
    stem = _chain(
        _conv(norm, model.init_name, model.gain, c0, model.widths[0], 1, hw),
        _norm(norm, B * hw * hw, train, c0 * 9),
        _activation(model.act_spec),
        name="stem",
    )
    groups.append((("stem",), stem))
    c = model.widths[0]

    def block(c_in, c_out, stride, hw, act_first):
        out = _out_hw(hw, stride)
        branch = _chain(
            _conv(norm, model.init_name, bgain, c_in, c_out, stride, hw),
            _norm(norm, B * out * out, train, c_in * 9),
            _activation(model.act_spec),
            _conv(norm, model.init_name, bgain, c_out, c_out, 1, out),
            _norm(norm, B * out * out, train, c_out * 9),
            name="branch",
        )
        shortcut = None if stride == 1 and c_in == c_out else C.subsample_pad(c_in, c_out, stride)
        res = Residual(branch, 1.0, shortcut)
        node = Serial((_activation(model.act_spec), res), name="block") if act_first else res
        return node, out

    for s, w in enumerate(model.widths, start=1):
        stride = 1 if s == 1 else 2
        node, hw2 = block(c, w, stride, hw, act_first=s > 1)
        groups.append(((f"stage{s}.block1",), node))
        c, hw = w, hw2
        names = tuple(f"stage{s}.block{i}" for i in range(2, n + 1))
        if names:
            node, _ = block(c, c, 1, hw, act_first=True)
            groups.append((names, Repeat(node, len(names), name=f"stage{s}")))
    groups.append((("head",), _head(model, c, hw, act=True)))
    return groups


_BUILDERS = {"mlp": _mlp_groups, "serial_cnn": _serial_cnn_groups, "resnet_cifar": _resnet_groups}


def _model_and_name(config):
    from gne_jax.models import create_model  # lazy: flax

    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"config must be a model config with a `name` in {SUPPORTED_MODELS}")
    name = config["name"]
    if name not in SUPPORTED_MODELS:
        raise ValueError(f"predict_model supports {list(SUPPORTED_MODELS)}; got {name!r}")
    return create_model(config), name


def model_network(config: Mapping[str, Any], input_shape, *, train: bool = True):
    """The component tree of a model: ``[(block names, node), ...]`` in block order."""
    model, name = _model_and_name(config)
    norm = model.norm_spec.name
    if norm in UNMODELLED_NORMALIZATIONS:
        raise ValueError(
            f"predict_model does not model normalization={norm!r}: "
            f"{UNMODELLED_NORMALIZATIONS[norm]} Measure it with gne_jax.block_moments instead."
        )
    want = 2 if name == "mlp" else 4
    layout = "(batch, features)" if want == 2 else "(batch, H, W, C)"
    shape = tuple(input_shape)
    if len(shape) != want or any(isinstance(s, bool) or int(s) != s or s < 1 for s in shape):
        raise ValueError(f"input_shape for {name!r} must be {want} positive integers "
                         f"{layout}; got {input_shape!r}")
    input_shape = tuple(int(s) for s in shape)
    return _BUILDERS[name](model, input_shape, bool(train))


def predict_model(config: Mapping[str, Any], input_shape, *, train: bool = True,
                  q_in=1.0) -> ModelPrediction:
    """Predicted per-block and end-to-end φ(JJᵀ), ϕ(JJᵀ) of a model from its config.

    Args:
      config: a config accepted by `gne_jax.models.create_model` with name in
        ``SUPPORTED_MODELS`` (missing keys take the family defaults).
      input_shape: ``(batch, features)`` for the MLP, ``(batch, H, W, C)`` otherwise;
        the batch sets M for batch-coupled normalization in training mode.
      train: training mode (batch statistics) or eval mode (initial running stats).
      q_in: the input's per-entry second moment (a float, centred) or a `Signal`.
    """
    groups = model_network(config, input_shape, train=train)
    net = Serial(tuple(node for _, node in groups), name="network")
    pred = predict(net, as_signal(q_in) if not isinstance(q_in, Signal) else q_in)
    names, phis, varphis, qs = [], [], [], []
    for (gnames, node), child in zip(groups, pred.blocks, strict=True):
        names.extend(gnames)
        if isinstance(node, Repeat):  # stacked per-repetition results
            st = child.blocks[0]
            phis.extend(np.asarray(st.phi, dtype=float).tolist())
            varphis.extend(np.asarray(st.varphi, dtype=float).tolist())
            qs.extend(np.asarray(st.q_in, dtype=float).tolist())
        elif len(gnames) > 1:  # a Serial with one child per block (shaped activations)
            for c in child.blocks:
                phis.append(float(c.phi))
                varphis.append(float(c.varphi))
                qs.append(float(c.q_in))
        else:
            phis.append(float(child.phi))
            varphis.append(float(child.varphi))
            qs.append(float(child.q_in))
    return ModelPrediction(tuple(names), np.asarray(phis), np.asarray(varphis), np.asarray(qs),
                           pred)
