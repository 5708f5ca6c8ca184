"""Composition theorems and activation rows beside measurements with the library's probes.

Every prediction is compared with `gne_jax.jacobian_moments` pooled over
independent initializations (`pool_inits`: the SE includes init-to-init
variance). Tolerance = 4·SE + a finite-width allowance FW·|prediction| with
FW = Σ 1/widthᵢ over the free factors (derivations §3/§15: freeness and the
(m+1)/n-type corrections are O(1/width)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.nn.initializers import kaiming_normal, orthogonal
from gne_jax.probes.moments import jacobian_moments
from gne_jax.theory import compare, per_block, pool_inits, predict
from gne_jax.theory import components as C
from gne_jax.theory.compose import Parallel, Repeat, Residual, Serial


def _measure(build, n_in, *, seeds=16, probes=32, method="hutchinson", seed=0):
    """Pooled moments of fn = build(key) at a random unit-second-moment input, over seeds."""

    def one(key):
        kf, kx, kp = jax.random.split(key, 3)
        fn = build(kf)
        x = jax.random.normal(kx, (n_in,))
        m = jacobian_moments(fn, x, key=kp, num_probes=probes, method=method)
        return m.phi, m.phi2

    keys = jax.random.split(jax.random.key(seed), seeds)
    phi, phi2 = jax.lax.map(one, keys)
    return pool_inits(phi, phi2)


def _dense(key, n, m, gain):
    return kaiming_normal(gain)(key, (n, m))  # x @ W: W is (fan_in, fan_out)


def _ortho(key, n, m, gain=1.0):
    return orthogonal(gain)(key, (n, m))


def _assert_close(pred, meas, fw, what):
    for name, p, mv, se in (("phi", pred.phi, meas.phi, meas.phi_sem),
                            ("varphi", pred.varphi, meas.varphi, meas.varphi_sem)):
        tol = 4 * float(se) + fw * abs(float(p))
        assert abs(float(mv) - float(p)) <= tol, (
            f"{what} {name}: measured {float(mv):.5g} ± {float(se):.2g}, "
            f"predicted {float(p):.5g}, tolerance {tol:.3g}"
        )


WIDTHS = (500, 300, 700, 400)
PAIRS_A, PAIRS_B = WIDTHS[:-1], WIDTHS[1:]


def test_serial_theorem_relu_unequal_widths():
    widths = WIDTHS

    def build(key):
        ks = jax.random.split(key, 3)
        Ws = [_dense(k, a, b, np.sqrt(2.0)) for k, a, b in zip(ks, PAIRS_A, PAIRS_B, strict=True)]

        def fn(x):
            for W in Ws:
                x = jax.nn.relu(x @ W)
            return x

        return fn

    net = Serial(tuple(
        part for a, b in zip(PAIRS_A, PAIRS_B, strict=True)
        for part in (C.dense_gaussian(a, b, gain=np.sqrt(2.0)), C.relu())
    ))
    pred = predict(net)
    meas = _measure(build, widths[0], seeds=24, method="exact")
    fw = sum(1.0 / w for w in widths[1:])
    _assert_close(pred, meas, fw, "serial ReLU 500-300-700-400")
    # Normalized variance by hand: Σᵢ (m_L/mᵢ)·((mᵢ+1)/m_{i−1} + 1) (Gaussian + ReLU rows).
    by_hand = sum(widths[-1] / b * ((b + 1) / a + 1) for a, b in zip(PAIRS_A, PAIRS_B, strict=True))
    assert abs(float(pred.normalized_variance) - by_hand) < 1e-4 * by_hand


def test_parallel_theorem_gaussian_plus_orthogonal_relu_gaussian():
    n = 256

    def build(key):
        ka, kg, ko = jax.random.split(key, 3)
        A = _dense(ka, n, n, np.sqrt(0.5))
        G = _dense(kg, n, n, np.sqrt(2.0))
        O = _ortho(ko, n, n)
        return lambda x: x @ A + jax.nn.relu(x @ G) @ O

    net = Parallel((
        C.dense_gaussian(n, n, gain=np.sqrt(0.5)),
        Serial((C.dense_gaussian(n, n, gain=np.sqrt(2.0)), C.relu(), C.orthogonal(n, n))),
    ))
    pred = predict(net)
    meas = _measure(build, n, seeds=12, probes=32)
    _assert_close(pred, meas, 3.0 / n, "parallel")
    assert abs(float(pred.phi) - 1.5) < 1e-6


@pytest.mark.parametrize("zeta", [1.0, 0.3])
def test_residual_branch_scale(zeta):
    n = 256

    def build(key):
        W = _dense(key, n, n, 1.0)
        return lambda x: x + zeta * (x @ W)

    pred = predict(Residual(C.dense_gaussian(n, n, gain=1.0), scale=zeta))
    assert abs(float(pred.phi) - (1 + zeta**2)) < 1e-6
    meas = _measure(build, n, seeds=12, probes=32)
    _assert_close(pred, meas, 1.0 / n, f"residual zeta={zeta}")


NO = 256  # width of the orthogonal·activation blocks
NSEEDS = 8


@pytest.fixture(scope="module")
def haar_stack():
    """NSEEDS independent Haar-orthogonal NO×NO matrices (one QR batch, shared by the rows)."""
    keys = jax.random.split(jax.random.key(11), NSEEDS)
    return jax.vmap(lambda k: _ortho(k, NO, NO))(keys)


def _measure_act(haar_stack, gain, act, probes=32):
    """Pooled moments of x ↦ act(gain·x O) over the stacked O's."""

    def one(args):
        O, key = args
        kx, kp = jax.random.split(key)
        x = jax.random.normal(kx, (NO,))
        m = jacobian_moments(lambda v: act(gain * (v @ O)), x, key=kp, num_probes=probes)
        return m.phi, m.phi2

    keys = jax.random.split(jax.random.key(5), NSEEDS)
    return pool_inits(*jax.lax.map(one, (haar_stack, keys)))


def test_leaky_relu_rows(haar_stack):
    for slope in (0.18, 0.3, 0.5):
        gain = np.sqrt(2.0 / (1 + slope**2))  # derivations §9: the gain giving block φ = 1
        pred = predict(Serial((C.orthogonal(NO, NO, gain=gain), C.leaky_relu(slope))))
        assert abs(float(pred.phi) - 1.0) < 1e-5
        r_act = ((1 - slope**2) / (1 + slope**2)) ** 2
        assert abs(float(pred.normalized_variance) - r_act) < 1e-5
        meas = _measure_act(haar_stack, gain, lambda h, a=slope: jax.nn.leaky_relu(h, a))
        _assert_close(pred, meas, 2.0 / NO, f"leaky_relu({slope})")


def test_tanh_rows_at_input_variance(haar_stack):
    for q in (0.1, 1.0):
        pred = predict(Serial((C.orthogonal(NO, NO, gain=np.sqrt(q)), C.tanh())))
        # the activation is evaluated at the propagated pre-activation variance q
        assert abs(float(pred.blocks[1].q_in) - q) < 1e-6
        meas = _measure_act(haar_stack, np.sqrt(q), jnp.tanh)
        _assert_close(pred, meas, 2.0 / NO, f"tanh q={q}")


def test_q_map_deep_tanh_matches_forward_pass():
    """The forward q-map through 16 Gaussian·tanh layers vs the measured second moment."""
    from gne_jax.theory.compose import Repeat

    n, depth, q0 = 256, 16, 1.0
    pred = predict(Repeat(Serial((C.dense_gaussian(n, n, gain=1.0), C.tanh())), depth), q_in=q0)
    x = jax.random.normal(jax.random.key(4), (128, n))

    def one_net(key):
        Ws = jax.random.normal(key, (depth, n, n)) / np.sqrt(n)

        def step(h, W):
            h = jnp.tanh(h @ W)
            return h, jnp.mean(h**2)

        return jax.lax.scan(step, x, Ws)[1]

    qs = jax.lax.map(one_net, jax.random.split(jax.random.key(3), 6)).mean(0)
    pq = np.asarray(pred.blocks[0].q_out)
    # One network's q wanders by ~2-5% at layer 16 (the product of 16 random layers,
    # see docs/theory.md); the mean over 6 networks stays within 4%.
    np.testing.assert_allclose(np.asarray(qs), pq, rtol=0.04)
    # derivations §8.1: q_l ≈ 1/(2l) asymptotically
    assert abs(pq[-1] * 2 * depth - 1) < 0.3


def test_compare_table_and_plot():
    n = 300

    def build(key):
        W = _dense(key, n, n, np.sqrt(2.0))
        return lambda x: jax.nn.relu(x @ W)

    net = Serial((C.dense_gaussian(n, n, gain=np.sqrt(2.0)), C.relu()), name="block")
    meas = _measure(build, n, seeds=8, probes=16)
    table = compare(predict(net), meas)
    assert len(table.rows) == 1 and "φ pred" in str(table)
    r = table.rows[0]
    assert r.phi_z == pytest.approx((r.phi_meas - r.phi_pred) / r.phi_sem)
    rows = per_block(predict(net))
    assert [name for name, _, _ in rows] == ["dense_gaussian(300->300)", "relu"]
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    table2, fig = compare(rows, [meas, meas], plot=True)
    assert len(table2.rows) == 2 and fig is not None
    with pytest.raises(ValueError, match="rows"):
        compare(rows, [meas])


def test_prediction_is_a_pytree_usable_under_jit_and_vmap():
    net = Serial((C.dense_gaussian(16, 16, sigma2=2 / 16), C.relu(),
                  Repeat(Serial((C.dense_gaussian(16, 16, sigma2=2 / 16), C.tanh())), 4)))
    eager = predict(net, 1.0)
    jitted = jax.jit(lambda q: predict(net, q))(1.0)
    assert jitted.name == eager.name == "serial" and jitted.blocks[2].name == "repeat"
    np.testing.assert_allclose(jitted.phi, eager.phi, rtol=1e-6)
    np.testing.assert_allclose(jitted.varphi, eager.varphi, rtol=1e-6)
    batched = jax.vmap(lambda q: predict(net, q))(jnp.array([0.5, 1.0, 2.0]))
    assert batched.phi.shape == (3,) and batched.size_ratio == 1.0
    np.testing.assert_allclose(batched.phi[1], eager.phi, rtol=1e-6)
    mapped = jax.tree.map(lambda a: a, eager)
    assert mapped.name == "serial" and float(mapped.spread) == float(eager.spread)
