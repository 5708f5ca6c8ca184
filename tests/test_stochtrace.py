"""Hutchinson and Hutch++ over plain matvecs on pytrees, against exact traces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax import hutchinson, hutchpp

KEY = jax.random.key(0)


def spd(n, seed):
    A = np.random.default_rng(seed).normal(size=(n, n))
    return A @ A.T / n


def test_hutchinson_on_pytree_matvec():
    A = spd(30, 0)
    # the vector space is a dict {"a": (10,), "b": (4, 5)}; A acts on its flattening
    like = {"a": jnp.zeros(10), "b": jnp.zeros((4, 5))}

    def matvec(v):
        flat = jnp.concatenate([v["a"], v["b"].ravel()])
        out = jnp.asarray(A, jnp.float32) @ flat
        return {"a": out[:10], "b": out[10:].reshape(4, 5)}

    for dist in ("rademacher", "normal"):
        est = jax.jit(lambda k, dist=dist: hutchinson(200, dist=dist)(matvec, like, key=k))(KEY)
        assert abs(float(est.value) - np.trace(A)) < 4 * float(est.sem)
        np.testing.assert_allclose(np.mean(est.samples), est.value, rtol=1e-5)
        assert est.num_matvecs == 200


def test_chunked_equals_vmapped():
    A = jnp.asarray(spd(16, 1), jnp.float32)
    mv = lambda v: A @ v
    a = hutchinson(12)(mv, jnp.zeros(16), key=KEY)
    b = hutchinson(12, probe_chunk=5)(mv, jnp.zeros(16), key=KEY)
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-6)


def test_hutchpp_exact_on_low_rank_and_within_se_otherwise():
    rng = np.random.default_rng(2)
    U = rng.normal(size=(50, 3))
    low = jnp.asarray(U @ U.T, jnp.float32)  # rank 3 ≤ sketch size 4: Hutch++ is exact
    est = hutchpp(12)(lambda v: low @ v, jnp.zeros(50), key=KEY)
    np.testing.assert_allclose(est.value, np.trace(U @ U.T), rtol=1e-4)
    np.testing.assert_allclose(est.sem, 0.0, atol=1e-3 * np.trace(U @ U.T))
    A = spd(40, 3)
    est = hutchpp(60)(lambda v: jnp.asarray(A, jnp.float32) @ v, jnp.zeros(40), key=KEY)
    assert abs(float(est.value) - np.trace(A)) < 4 * float(est.sem) + 1e-4 * np.trace(A)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson(1)
    with pytest.raises(ValueError, match="num_probes"):
        hutchpp(3)
    with pytest.raises(ValueError, match="dist"):
        hutchinson(8, dist="cauchy")
    with pytest.raises(ValueError, match="dimension"):
        hutchpp(30)(lambda v: v, jnp.zeros(5), key=KEY)
    for estimator in (hutchinson(4), hutchpp(6)):
        with pytest.raises(ValueError, match=r"`matvec` must map .* \[\(5,\)\] to \[\(4,\)\]"):
            estimator(lambda v: v[:4], jnp.zeros(5), key=KEY)
        with pytest.raises(ValueError, match=r"`matvec` rejected the input `like`.*\(7,\)"):
            estimator(lambda v: jnp.ones((6, 6)) @ v, jnp.zeros(7), key=KEY)
        with pytest.raises(ValueError, match="`like` has no elements"):
            estimator(lambda v: v, jnp.zeros(0), key=KEY)
        with pytest.raises(TypeError, match="`like` must hold real floating-point"):
            estimator(lambda v: v, jnp.zeros(5, jnp.int32), key=KEY)
