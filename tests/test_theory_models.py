"""Predictions from model configs beside ensemble measurements with the library's probes.

The measurement is `gne_jax.probes.ensemble.ensemble_block_moments` (per-block Hutchinson
probes over several initializations) pooled with `pool_inits`; the tolerance is
4·SE plus a stated model allowance: 5% for the MLP family (finite width, Gaussian
approximation of Kaiming rows), 15% of φ for the small conv nets (few channels,
spatially correlated activations; the measured gaps are listed in docs/theory.md).
"""

import math

import jax
import numpy as np
import pytest

from gne_jax import iter_blocks
from gne_jax.models import create_model
from gne_jax.probes.ensemble import ensemble_block_moments
from gne_jax.theory import compare, pool_inits, predict_model


def _measure(cfg, shape, inits=3, probes=8, end_to_end=False):
    model = create_model(cfg)
    x = jax.random.normal(jax.random.key(100), shape)
    r = ensemble_block_moments(model, x, key=jax.random.key(0), num_inits=inits, train=True,
                               num_probes=probes, end_to_end=end_to_end)
    blocks = pool_inits(r.blocks.phi, r.blocks.phi2)
    e2e = None if not end_to_end else pool_inits(r.end_to_end.phi, r.end_to_end.phi2)
    return tuple(r.names), blocks, e2e


def _check(pred, names, meas, rel_phi, rel_varphi=None, skip=()):
    assert names == pred.names
    for i, name in enumerate(names):
        if name in skip:
            continue
        p, m, se = pred.phi[i], float(meas.phi[i]), float(meas.phi_sem[i])
        assert abs(m - p) <= 4 * se + rel_phi * abs(p), (name, "phi", m, se, p)
        if rel_varphi is not None:
            p, m, se = pred.varphi[i], float(meas.varphi[i]), float(meas.varphi_sem[i])
            assert abs(m - p) <= 4 * se + rel_varphi * abs(p), (name, "varphi", m, se, p)


CONFIGS = {
    "mlp": (dict(name="mlp", depth=2, width=128, num_classes=10), (32, 16)),
    "serial_cnn": (dict(name="serial_cnn", depth=8, widths=(8, 16, 16)), (2, 8, 8, 3)),
    "resnet_bn": (dict(name="resnet_cifar", depth=8, widths=(8, 16, 16)), (2, 8, 8, 3)),
    "resnet_smn": (dict(name="resnet_cifar", depth=8, widths=(8, 16, 16), normalization="smn"),
                   (2, 8, 8, 3)),
    "resnet_fixup": (dict(name="resnet_cifar", depth=8, widths=(8, 16, 16),
                          normalization="none", fixup_p=2.0, fixup_scalars=True), (2, 8, 8, 3)),
}


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_prediction_names_follow_the_model_blocks(which):
    cfg, shape = CONFIGS[which]
    model = create_model(cfg)
    # the block order of model.blocks(...) is its layout's (gne_jax.models.common)
    names = tuple(n for st in model.layout() for n in st.block_names)
    pred = predict_model(cfg, shape)
    assert pred.names == names
    assert np.all(np.isfinite(pred.phi)) and np.all(pred.phi > 0)
    # end to end = serial composition of the blocks
    assert float(pred.network.phi) == pytest.approx(float(np.prod(pred.phi)), rel=1e-4)


def test_prediction_names_equal_exposed_blocks():
    cfg, shape = CONFIGS["resnet_bn"]
    model = create_model(cfg)
    x = jax.numpy.ones(shape)
    variables = model.init(jax.random.key(0), x, train=False)
    names = tuple(b.name for b in iter_blocks(model.blocks(variables, x, train=True)))
    assert predict_model(cfg, shape).names == names


def test_closed_form_cases():
    # linear orthogonal MLP: every block is an isometry
    cfg = dict(name="mlp", depth=5, width=64, num_classes=None, activation="linear",
               init="orthogonal", gain=1.0)
    pred = predict_model(cfg, (8, 64))
    np.testing.assert_allclose(pred.phi, 1.0, rtol=1e-6)
    np.testing.assert_allclose(pred.varphi, 0.0, atol=1e-6)
    # ReLU + training-mode BN with Gaussian weights: π/(π−1)·(1 − 2/B) per hidden block,
    # times the channel-to-channel Jensen factor (r/n)(n−2)/(r−2), r = min(B − 1, n)
    B, w = 64, 256
    cfg = dict(name="mlp", depth=3, width=w, num_classes=None, normalization="batchnorm")
    pred = predict_model(cfg, (B, 32))
    r = min(B - 1, w)
    want = math.pi / (math.pi - 1) * (1 - 2 / B) * (r / w) * (w - 2) / (r - 2)
    np.testing.assert_allclose(pred.phi[2:], want, rtol=1e-4)
    # eval mode with the initial running statistics (mean 0, var 1): BN is diag 1/√(1+ε),
    # so a Kaiming ReLU block has φ = 2·½/(1 + ε)
    pred = predict_model(cfg, (B, 32), train=False)
    np.testing.assert_allclose(pred.phi[1:], 1 / (1 + 1e-5), rtol=1e-5)
    # Fixup p = 2 (derivations §13): branch φ ≈ 2·L^(−p) per block for conv·ReLU·conv
    cfg = dict(name="resnet_cifar", depth=56, normalization="none", fixup_p=2.0)
    pred = predict_model(cfg, (4, 32, 32, 3))
    L = 27
    inner = [i for i, n in enumerate(pred.names) if n.startswith("stage1.block") and n != (
        "stage1.block1")]
    # block = ReLU on the residual stream, then I + branch: φ ≈ p_relu·(1 + 2/L²)
    assert np.all(pred.phi[inner] < 1 + 4 / L**2)
    with pytest.raises(ValueError, match="supports"):
        predict_model(dict(name="densenet_bc"), (2, 32, 32, 3))
    with pytest.raises(ValueError, match="input_shape"):
        predict_model(dict(name="mlp"), (2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"input_shape for 'mlp' must be 2 positive integers"):
        predict_model(dict(name="mlp"), (16, -3))


def test_mlp_prediction_against_ensemble():
    cfg, shape = CONFIGS["mlp"]
    names, meas, _ = _measure(cfg, shape)
    pred = predict_model(cfg, shape)
    _check(pred, names, meas, 0.05, 0.1)
    table = compare(pred.rows(), [jax.tree.map(lambda a, i=i: a[i] if np.ndim(a) else a, meas)
                                  for i in range(len(names))])
    assert len(table.rows) == len(names)


def test_mlp_batchnorm_prediction_against_ensemble():
    cfg = dict(name="mlp", depth=2, width=128, num_classes=10, normalization="batchnorm")
    shape = (32, 16)
    names, meas, _ = _measure(cfg, shape)
    pred = predict_model(cfg, shape)
    # layer1 sees the input layer's output, of rank d_in = 16 < batch: its BN statistics
    # are far from the isotropic model (measured 0.65 vs 0.50; docs/theory.md)
    _check(pred, names, meas, 0.05, 0.25, skip=("layer1",))


@pytest.mark.slow
@pytest.mark.parametrize("which", [
    "serial_cnn",
    "resnet_fixup",
    # Known gap (docs/theory.md): with BN/SMN the predicted residual-block φ runs 14-35%
    # high at this tiny size (8×8 images, batch 8); kept as a record, not hidden.
    pytest.param("resnet_bn", marks=pytest.mark.xfail(strict=False, reason="documented gap")),
    pytest.param("resnet_smn", marks=pytest.mark.xfail(strict=False, reason="documented gap")),
])
def test_conv_net_predictions_against_ensemble(which):
    cfg, _ = CONFIGS[which]
    shape = (8, 8, 8, 3)
    names, meas, _ = _measure(cfg, shape, inits=4)
    pred = predict_model(cfg, shape)
    # the head sees the ReLU of the residual stream (p ≠ ½ from its mean): skip it here
    _check(pred, names, meas, 0.15, skip=("head",))


def test_meterez_normalization_is_refused_rather_than_mispredicted():
    with pytest.raises(ValueError, match="meterez"):
        predict_model({"name": "mlp", "width": 16, "depth": 3, "normalization": "meterez"},
                      (8, 16))


def test_delta_orthogonal_relu_serial_cnn_against_ensemble():
    """Delta-orthogonal kernels keep the full forward map: the output channel means are
    random with zero average (as for `orthogonal`), so every ReLU after the first sees a
    centred input, p = ½ and a block with gain √2 has φ = 1 (the centre-tap kernel has no
    border taps, so the measurement carries no padding effect)."""
    cfg = dict(name="serial_cnn", depth=8, widths=(8, 16, 16), init="delta_orthogonal",
               activation="relu")
    shape = (4, 8, 8, 3)
    pred = predict_model(cfg, shape)
    body = [i for i, n in enumerate(pred.names) if n not in ("stem", "head")]
    downsampling = ("stage2.layer1", "stage3.layer1")  # stride 2: a quarter of the positions
    stride1 = [i for i in body if pred.names[i] not in downsampling]
    # closed form: gain² · P(h > 0) = 2 · ½ at every stride-1 body block
    np.testing.assert_allclose(np.asarray(pred.phi)[stride1], 1.0, rtol=1e-5)
    names, meas, _ = _measure(cfg, shape, inits=4)
    _check(pred, names, meas, 0.10, skip=("stem", "head"))
