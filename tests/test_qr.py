"""gne_jax.linalg.qr: the batched QR equals LAPACK's, and GPU programs carry no orgqr loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gne_jax.linalg.qr import householder_qr, qr
from gne_jax.nn.initializers import orthogonal
from gne_jax.probes.stochtrace import hutchpp

KEY = jax.random.key(0)


@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (7, 3), (1, 1), (5, 16, 16)])
def test_householder_qr_is_lapacks_qr(shape):
    # Q is unique up to the signs fixed by diag(R), which geqrf shares: the two agree
    # to float32 rounding (eps·n), and Q is orthonormal with QR = A.
    a = jax.random.normal(KEY, shape)
    q, r = jax.jit(householder_qr)(a)
    q0, r0 = jnp.linalg.qr(a)
    n = shape[-1]
    tol = 10 * n * np.finfo(np.float32).eps
    np.testing.assert_allclose(q, q0, atol=tol)
    np.testing.assert_allclose(r, r0, atol=tol * float(jnp.abs(r0).max()))
    gram = np.asarray(jnp.swapaxes(q, -1, -2) @ q, np.float64)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(n), gram.shape), atol=tol)
    np.testing.assert_allclose(q @ r, a, atol=tol * float(jnp.abs(a).max()))


def test_householder_qr_float64_and_identity_reflectors():
    # an upper-triangular input makes geqrf return τ = 0 (H = I) for columns already
    # reduced; in float64 the agreement with LAPACK is at 1e-13.
    with jax.enable_x64(True):
        a = jnp.triu(jax.random.normal(KEY, (6, 4), jnp.float64)).at[5, 1].set(0.7)
        q, r = householder_qr(a)
        q0, r0 = jnp.linalg.qr(a)
        assert q.dtype == jnp.float64
        np.testing.assert_allclose(q, q0, atol=1e-13)
        np.testing.assert_allclose(r, r0, atol=1e-13)


def test_householder_qr_rejects_a_wide_matrix():
    with pytest.raises(ValueError, match="`a` must be tall"):
        householder_qr(jnp.ones((3, 5)))


def test_qr_off_gpu_is_lapacks_bit_for_bit():
    a = jax.random.normal(KEY, (4, 32, 16))
    q, r = jax.jit(qr)(a)
    q0, r0 = jnp.linalg.qr(a)
    assert np.array_equal(q, q0) and np.array_equal(r, r0)


def _custom_calls(fn, *args):
    text = export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    return set(re.findall(r"custom_call @(\w+)", text))


def test_gpu_programs_form_q_without_a_per_matrix_loop():
    # jaxlib's GPU orgqr runs one solver call per matrix of a batch; lowered for CUDA,
    # a vmapped orthogonal init and a vmapped Hutch++ keep geqrf (batched) and no orgqr.
    keys = jax.random.split(KEY, 8)
    init = jax.vmap(lambda k: orthogonal()(k, (64, 64)))
    calls = _custom_calls(init, keys)
    assert "cusolver_geqrf_ffi" in calls and not any("orgqr" in c for c in calls), calls

    est = hutchpp(12)
    mats = jax.random.normal(KEY, (8, 16, 16))
    trace = jax.vmap(lambda m, k: est(lambda v: m @ v, jnp.zeros(16), key=k).value)
    calls = _custom_calls(trace, mats, keys)
    assert not any("orgqr" in c for c in calls), calls


@pytest.mark.parametrize("shape", [(64, 64), (100, 30), (30, 100), (3, 3, 16, 32)])
def test_initializers_draw_the_same_kernels_with_the_gpu_route(shape, monkeypatch):
    # the GPU route (householder_qr) run on the CPU: the same Haar kernel as LAPACK's,
    # through the sign fix and the wide-matrix transpose, vmapped over keys
    from gne_jax.nn import initializers

    keys = jax.random.split(KEY, 3)
    draw = jax.vmap(lambda k: initializers.orthogonal(1.5)(k, shape))
    lapack = draw(keys)
    calls = []
    monkeypatch.setattr(initializers, "qr", lambda a: calls.append(1) or householder_qr(a))
    gpu_route = draw(keys)  # an eager vmap traces again, through the patched qr
    assert calls, "the GPU route was not taken"
    np.testing.assert_allclose(gpu_route, lapack, atol=1.5 * 10 * max(shape) * 1.2e-7)


def test_hutchpp_gives_the_same_estimate_with_the_gpu_route(monkeypatch):
    from gne_jax.probes import stochtrace

    a = jax.random.normal(KEY, (40, 40))
    mat = a @ a.T
    # under an outer jit nothing is taken from the library's program cache: each jit
    # below traces orthonormal_sketch afresh
    est = lambda: jax.jit(lambda m: hutchpp(24)(lambda v: m @ v, jnp.zeros(40),
                                                key=jax.random.key(3)).value)(mat)
    lapack = est()
    calls = []
    monkeypatch.setattr(stochtrace, "qr", lambda a: calls.append(1) or householder_qr(a))
    np.testing.assert_allclose(est(), lapack, rtol=1e-5)
    assert calls, "the GPU route was not taken"
