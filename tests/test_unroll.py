"""unroll_scans: the same values and gradients as the scanned program, with no loop left."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.training.unroll import should_unroll, unroll_scans

jax.config.update("jax_disable_most_optimizations", True)


def _fn(w, x, reverse=False):
    """A scan with consts, a carry, xs and ys, inside a nested jit."""

    @jax.jit
    def inner(w, x):
        def body(h, wi):
            h = jnp.tanh(wi @ h + 0.1 * x)
            return h, jnp.sum(h**2)

        return jax.lax.scan(body, x, w, reverse=reverse)

    h, ys = inner(w, x)
    return jnp.sum(h) + jnp.sum(ys * jnp.arange(1, len(ys) + 1))


@pytest.mark.parametrize("reverse", [False, True])
def test_values_and_gradients_match_the_scan(reverse):
    w = jax.random.normal(jax.random.key(0), (5, 6, 6)) / 3
    x = jax.random.normal(jax.random.key(1), (6,))
    f = lambda w, x: _fn(w, x, reverse)
    g = unroll_scans(f)
    np.testing.assert_allclose(jax.jit(g)(w, x), jax.jit(f)(w, x), rtol=1e-6)
    grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1)))(w, x)
    for a, b in zip(grad(g), grad(f), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hlo = jax.jit(jax.grad(g)).lower(w, x).as_text()
    assert "while" not in hlo
    assert "while" in jax.jit(jax.grad(f)).lower(w, x).as_text()


def test_flax_model_with_scanned_stages_and_batch_stats():
    from gne_jax.models import create_model, default_config

    cfg = default_config("serial_cnn")
    cfg.update(depth=8, widths=(4, 4, 4), normalization="batchnorm")
    model = create_model(cfg)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    v = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
    kw = dict(train=True, mutable=["batch_stats"])
    a, sa = jax.jit(lambda v, x: model.apply(v, x, **kw))(v, x)
    b, sb = jax.jit(lambda v, x: unroll_scans(model.apply)(v, x, **kw))(v, x)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for p, q in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
        np.testing.assert_allclose(q, p, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)


def test_should_unroll():
    assert should_unroll("auto", "cpu") and not should_unroll("auto", "gpu")
    assert should_unroll("true") and not should_unroll("false") and should_unroll(True)
    with pytest.raises(ValueError, match="unroll_scans='maybe'"):
        should_unroll("maybe")
