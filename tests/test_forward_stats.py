"""Per-block forward statistics vs direct numpy computations and the arc-cosine closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gne_jax
from gne_jax.probes import forward_stats as fs
from gne_jax.theory import sample_variance


def _mlp(width=32, depth=4):
    model = gne_jax.create_model({"name": "mlp", "width": width, "depth": depth,
                                  "num_classes": None, "activation": "relu"})
    x = jax.random.normal(jax.random.key(0), (16, width))
    return model, model.init(jax.random.key(1), x), x


def test_matches_numpy_on_an_mlp():
    """α_in, α_out and the within-sample fraction of every block, recomputed in numpy from the
    kernels (input projection, then relu(h W) per hidden layer)."""
    model, v, x = _mlp()
    r = fs.forward_stats(model, v, x, train=False)
    p = v["params"]
    hs = [np.asarray(x, np.float64)]
    hs.append(hs[-1] @ np.asarray(p["input"]["dense"]["kernel"], np.float64))
    for W in np.asarray(p["hidden"]["dense"]["kernel"], np.float64):
        hs.append(np.maximum(hs[-1] @ W, 0.0))
    alpha = [np.mean(h**2) for h in hs]
    frac = [1 - np.mean(h.mean(0) ** 2) / np.mean(h**2) for h in hs[1:]]
    assert r.names == ("input", "layer1", "layer2", "layer3", "layer4")
    np.testing.assert_allclose(np.asarray(r.alpha_in), alpha[:-1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.alpha_out), alpha[1:], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.within_fraction), frac, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.alpha_ratio), np.divide(alpha[1:], alpha[:-1]),
                               rtol=1e-5)


def _relu_chain(key, N, S, K, bn=False):
    """White-noise batch, input projection, then K blocks h ↦ (BN)(relu(h) W) (pre-activations)."""
    ks = jax.random.split(key, 3)
    h0 = jax.random.normal(ks[0], (S, N)) @ (jax.random.normal(ks[1], (N, N)) / math.sqrt(N))
    Ws = jax.random.normal(ks[2], (K, N, N)) * math.sqrt(2.0 / N)

    def block(W, h):
        z = jax.nn.relu(h) @ W
        if bn:
            z = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)
        return z

    return [fs.scan_group("layer", block, Ws, h0)]


def test_luther_fractions_vmapped_over_inits():
    """Within-sample fraction of the pre-activation after k ReLU Kaiming layers vs 1 − ρ_k
    (arc-cosine map), width 384, 128 white-noise samples, 6 nets vmapped; tolerance 4 SE
    across nets plus the finite-width allowance k/N (derivations §14.4)."""
    N, S, K, nets = 384, 128, 4, 6
    stats = jax.jit(jax.vmap(lambda k: fs.groups_forward_stats(_relu_chain(k, N, S, K))))(
        jax.random.split(jax.random.key(7), nets))
    frac = np.asarray(stats.within_fraction, np.float64)
    assert frac.shape == (nets, K)
    mean, se = frac.mean(0), frac.std(0, ddof=1) / math.sqrt(nets)
    pred = np.asarray(sample_variance.sample_variance_fractions(K))
    for k in range(1, K + 1):
        assert abs(mean[k - 1] - pred[k - 1]) < 4 * se[k - 1] + k / N, (k, mean, pred)
    # Kaiming keeps the second moment: α_out/α_in ≈ 1 per block (within a few/N·√… noise)
    assert np.all(np.abs(np.asarray(stats.alpha_ratio).mean(0) - 1) < 0.05)


def test_batch_norm_keeps_the_fraction_at_one():
    stats = fs.groups_forward_stats(_relu_chain(jax.random.key(3), 64, 32, 4, bn=True))
    np.testing.assert_allclose(np.asarray(stats.within_fraction), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.alpha_out), 1.0, rtol=1e-3)


def test_compiles_once_per_structure():
    model, v, x = _mlp(width=16, depth=3)
    jitted = fs._measure_jit()
    before = jitted._cache_size()
    for s in range(3):
        v = model.init(jax.random.key(10 + s), x)
        fs.forward_stats(model, v, x, train=False)
    assert jitted._cache_size() == before + 1


def test_helpers_and_bad_input():
    h = jnp.asarray([[1.0, 2.0], [3.0, 2.0]])
    assert float(fs.second_moment(h)) == pytest.approx((1 + 4 + 9 + 4) / 4)
    # unit 1: mean 2, E h² = 5; unit 2: mean 2, E h² = 4 → 1 − (4 + 4)/2 / 4.5
    assert float(fs.within_sample_fraction(h)) == pytest.approx(1 - 4.0 / 4.5)
    with pytest.raises(ValueError, match="batch axis"):
        fs.within_sample_fraction(jnp.ones(3))
    with pytest.raises(ValueError, match="`batch_axis`=3 is not an axis"):
        fs.within_sample_fraction(jnp.ones((2, 3, 4)), batch_axis=3)
    with pytest.raises(TypeError, match="blocks"):
        fs.forward_stats(object(), {}, jnp.ones((2, 2)), train=False)
    model, v, x = _mlp(width=4, depth=2)
    with pytest.raises(TypeError, match="'train'"):  # never eval mode by default
        fs.forward_stats(model, v, x)
    with pytest.raises(FloatingPointError, match="`x` contains NaN"):
        fs.forward_stats(model, v, x.at[0, 0].set(jnp.nan), train=False)
    with pytest.raises(ValueError, match="empty"):
        fs.groups_forward_stats([])
