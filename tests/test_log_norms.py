"""Per-probe log-norms ln(‖Jv‖²/‖v‖²) vs exact Jacobians and the closed-form log-norm laws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.probes.log_norms import log_norms
from gne_jax.theory import log_norms as law


def chain(Ws, x):
    return jax.lax.scan(lambda h, W: (W @ h, None), x, Ws)[0]


def relu_chain(Ws, x):
    return jax.lax.scan(lambda h, W: (jax.nn.relu(W @ h), None), x, Ws)[0]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_matches_exact_jacobian(direction):
    """Each per-probe value equals ln(‖Jv‖²/‖v‖²) (or with Jᵀ) of the dense jacfwd Jacobian."""
    d, L = 12, 5
    Ws = jax.random.normal(jax.random.key(0), (L, d, d)) / math.sqrt(d)
    x = jax.random.normal(jax.random.key(1), (d,))
    v = jax.random.normal(jax.random.key(2), (7, d))
    r = log_norms(relu_chain, x, params=Ws, probes=v, direction=direction)
    J = np.asarray(jax.jacfwd(lambda z: relu_chain(Ws, z))(x), np.float64)
    vv = np.asarray(v, np.float64)
    Jv = vv @ (J.T if direction == "forward" else J)
    want = np.log((Jv**2).sum(1) / (vv**2).sum(1))
    np.testing.assert_allclose(np.asarray(r.log_ratio), want, rtol=1e-5, atol=1e-5)
    assert float(r.mean) == pytest.approx(want.mean(), abs=1e-5)
    assert float(r.median) == pytest.approx(np.median(want), abs=1e-5)
    assert float(r.mean_ratio) == pytest.approx(np.exp(want).mean(), rel=1e-5)
    assert r.direction == direction


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_chain_law(direction):
    """Gaussian chain N(0, 1/d), one Gaussian probe per init, vmapped over 2000 inits: the mean
    of the log is L[ψ(d/2) − ln(d/2)] (tolerance 4 SE; the law is exact at any width) and the
    variance Lψ'(d/2) (relative SE of a sample variance ≈ √(2/(S−1)), tolerance 4 of them)."""
    d, L, S = 16, 8, 2000

    def one(k):
        kw, kp = jax.random.split(k)
        Ws = jax.random.normal(kw, (L, d, d)) / math.sqrt(d)
        return log_norms(chain, jnp.ones(d), params=Ws, key=kp, num_probes=1,
                         direction=direction).log_ratio[0]

    logs = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(3), S)), np.float64)
    pred = law.log_norm_law(d, L)
    se = logs.std(ddof=1) / math.sqrt(S)
    assert abs(logs.mean() - float(pred.mean_log)) < 4 * se, (logs.mean(), float(pred.mean_log))
    assert logs.var(ddof=1) == pytest.approx(float(pred.var_log), rel=4 * math.sqrt(2 / (S - 1)))


def test_scalar_chain_constants():
    """d = 1 chain of N(0, 1) weights: ln w² has mean 2E ln|w| and variance 4 Var ln|w|."""
    L, S = 4, 4000

    def one(k):
        w = jax.random.normal(k, (L, 1, 1))
        return log_norms(chain, jnp.ones(1), params=w, key=k, num_probes=1).log_ratio[0]

    logs = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(4), S)), np.float64)
    se = logs.std(ddof=1) / math.sqrt(S)
    assert abs(logs.mean() - 2 * L * law.CHAIN_MEAN_LOG_ABS_W) < 4 * se
    assert logs.var(ddof=1) == pytest.approx(4 * L * law.CHAIN_VAR_LOG_ABS_W, rel=0.15)


def test_compiles_once_per_structure():
    """New weight states, passed as ``params`` or closed over, reuse one compiled program
    per form (compilations counted with JAX's monitoring events); the values are the
    exact Jacobian's."""
    from gne_jax.probes import compiled

    d, L = 8, 3
    x = jnp.linspace(-1.0, 1.0, d)
    v = jax.random.normal(jax.random.key(9), (4, d))
    events = []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    compiled.clear_programs()
    states = [jax.random.normal(jax.random.key(s), (L, d, d)) / math.sqrt(d) for s in range(4)]
    forms = [lambda Ws: dict(fn=relu_chain, params=Ws),
             lambda Ws: dict(fn=lambda z: relu_chain(Ws, z))]
    for form in forms:
        log_norms(x=x, probes=v, **form(states[0]))  # compiles this form's program
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            results = [log_norms(x=x, probes=v, **form(Ws)) for Ws in states[1:]]
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert not events, f"{len(events)} compilations over 3 new weight states"
        for Ws, r in zip(states[1:], results, strict=True):
            J = np.asarray(jax.jacfwd(lambda z, Ws=Ws: relu_chain(Ws, z))(x), np.float64)
            vv = np.asarray(v, np.float64)
            want = np.log(((vv @ J.T) ** 2).sum(1) / (vv**2).sum(1))
            np.testing.assert_allclose(np.asarray(r.log_ratio), want, rtol=1e-5, atol=1e-5)


def test_results_pass_through_jit_and_vmap_with_the_finite_flag():
    Ws = jax.random.normal(jax.random.key(0), (3, 6, 6)) / math.sqrt(6)
    key = jax.random.key(1)
    eager = log_norms(chain, jnp.ones(6), params=Ws, key=key, num_probes=8)
    jitted = jax.jit(lambda W: log_norms(chain, jnp.ones(6), params=W, key=key,
                                         num_probes=8))(Ws)
    np.testing.assert_allclose(np.asarray(jitted.log_ratio), np.asarray(eager.log_ratio),
                               rtol=1e-5)
    assert bool(eager.finite) and jitted.direction == "forward"
    bad = jax.jit(lambda z: log_norms(jnp.tanh, z, key=key, num_probes=4))(
        jnp.array([jnp.inf, 1.0]))
    assert not bool(bad.finite)


def test_bad_arguments():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="direction"):
        log_norms(jnp.sin, jnp.ones(3), key=key, direction="sideways")
    with pytest.raises(TypeError, match="key"):
        log_norms(jnp.sin, jnp.ones(3))
    with pytest.raises(TypeError, match="x"):
        log_norms(jnp.sin, jnp.ones(3, jnp.int32), key=key)
    with pytest.raises(ValueError, match="num_probes"):
        log_norms(jnp.sin, jnp.ones(3), key=key, num_probes=0)
    with pytest.raises(ValueError, match="`x` is empty"):
        log_norms(lambda z: 2 * z, jnp.zeros(0), key=key)
    with pytest.raises(FloatingPointError, match="`x` contains non-finite"):
        log_norms(jnp.tanh, jnp.array([jnp.inf, 1.0, 2.0]), key=key)
    with pytest.raises(ValueError, match=r"`probes` holds probes of 4 elements.*size, 3"):
        log_norms(jnp.sin, jnp.ones(3), probes=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"fn\(x\)'s size, 2"):
        log_norms(lambda z: z[:2], jnp.ones(3), probes=jnp.ones((2, 3)), direction="backward")
    with pytest.raises(ValueError, match="dist"):
        log_norms(jnp.sin, jnp.ones(3), key=key, dist="uniform")
    with pytest.raises(ValueError, match=r"`probes`\[1\] has norm 0"):
        log_norms(jnp.sin, jnp.ones(3), probes=jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"`probes`\[0\] has norm nan"):
        log_norms(jnp.sin, jnp.ones(3), probes=jnp.array([[jnp.nan, 0.0, 0.0]]))


def test_the_former_distribution_name_still_works_with_a_warning():
    x = jnp.linspace(-1.0, 1.0, 5)
    with pytest.warns(DeprecationWarning, match="dist='normal'"):
        old = log_norms(jnp.tanh, x, key=jax.random.key(0), dist="gaussian")
    new = log_norms(jnp.tanh, x, key=jax.random.key(0), dist="normal")
    np.testing.assert_array_equal(np.asarray(old.log_ratio), np.asarray(new.log_ratio))
