"""Optimizer tests against a hand-written numpy re-implementation of torch.optim.SGD
(clip_grad_value_ → coupled weight decay → momentum buffer → lr step) and closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gne_jax.training import optim
from gne_jax.training.config import base_config


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        x = x * self.param("fixup_scale", nn.initializers.ones, (1,))
        x = x.mean((1, 2))
        return nn.Dense(3, name="fc")(x)


@pytest.fixture(scope="module")
def params():
    return Net().init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 2)))["params"]


def test_weight_decay_masks(params):
    got = {m: optim.weight_decay_mask(params, m) for m in optim.WEIGHT_DECAY_MASKS}
    assert got["kernels"]["conv"]["kernel"] and got["kernels"]["fc"]["kernel"]
    assert not got["kernels"]["conv"]["bias"] and not got["kernels"]["bn"]["scale"]
    assert not got["kernels"]["fixup_scale"]
    # The paper's CIFAR mask: conv/linear weights and their biases, not BN affine parameters.
    assert got["conv_dense"]["conv"]["bias"] and got["conv_dense"]["fc"]["bias"]
    assert not got["conv_dense"]["bn"]["bias"] and not got["conv_dense"]["fixup_scale"]
    assert all(jax.tree.leaves(got["all"]))
    assert not any(jax.tree.leaves(got["none"]))
    with pytest.raises(ValueError, match="weight_decay_mask.*expected one of"):
        optim.weight_decay_mask(params, "biases")


def _config(**opt):
    c = base_config()
    c.num_epochs = 10
    for k, v in opt.items():
        c.optimizer[k] = v
    return c


def _torch_sgd(params, grads_seq, *, lr_fn, momentum, nesterov, wd, wd_mask, clip, lr_factor):
    """numpy torch.optim.SGD with clip_grad_value_, as the paper's training loop."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads_seq):
        for k in p:
            d = np.clip(g[k], -clip, clip) + (wd * p[k] if wd_mask[k] else 0.0)
            buf[k] = momentum * buf[k] + d
            step = d + momentum * buf[k] if nesterov else buf[k]
            p[k] = p[k] - lr_fn(t) * lr_factor[k] * step
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_reference(nesterov):
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
                       "bias": rng.normal(size=(4,)).astype(np.float32)},
              "fixup_scale": np.ones((1,), np.float32)}
    grads = [jax.tree.map(lambda a: (3 * rng.normal(size=a.shape)).astype(np.float32), params)
             for _ in range(4)]
    c = _config(learning_rate=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4,
                weight_decay_mask="conv_dense", clip="value", clip_value=2.0, schedule="step",
                lr_boundaries_epochs=(1,), lr_decay_factor=0.1, scalar_pattern="fixup",
                scalar_lr_factor=0.1)
    tx, schedule = optim.make_optimizer(c, params, steps_per_epoch=2)
    state, p = tx.init(params), params
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = optax.apply_updates(p, upd)
    flat = lambda t: {"k": t["conv"]["kernel"], "b": t["conv"]["bias"], "s": t["fixup_scale"]}
    ref = _torch_sgd(flat(params), [flat(g) for g in grads],
                     lr_fn=lambda t: 0.1 if t < 2 else 0.01, momentum=0.9, nesterov=nesterov,
                     wd=5e-4, wd_mask={"k": True, "b": True, "s": False}, clip=2.0,
                     lr_factor={"k": 1.0, "b": 1.0, "s": 0.1})
    for k, v in flat(p).items():
        np.testing.assert_allclose(v, ref[k], rtol=2e-6, atol=2e-7)


def test_clip_by_norm_is_global():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
    g = {"a": jnp.full(3, 2.0), "b": jnp.full(4, 2.0)}  # global norm 2*sqrt(7)
    c = _config(learning_rate=1.0, momentum=0.0, weight_decay=0.0, clip="norm", clip_value=1.0,
                schedule="constant")
    tx, _ = optim.make_optimizer(c, params, steps_per_epoch=1)
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(upd), 1.0, rtol=1e-6)
    np.testing.assert_allclose(upd["a"], -2.0 / (2 * np.sqrt(7)) * np.ones(3), rtol=1e-6)


def test_adam_first_step_is_signed_lr():
    # Adam's first bias-corrected step is -lr * g / (|g| + eps) = -lr * sign(g).
    params = {"w": jnp.zeros(5)}
    g = {"w": jnp.array([3.0, -0.5, 1e-2, -7.0, 2.0])}
    c = _config(name="adam", learning_rate=0.01, weight_decay=0.0, clip="none",
                schedule="constant")
    tx, _ = optim.make_optimizer(c, params, steps_per_epoch=1)
    upd, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.01 * np.sign(g["w"]), rtol=1e-4)


def test_schedules_closed_forms():
    spe = 10
    c = _config(learning_rate=0.1, schedule="step", lr_boundaries_epochs=(2, 4),
                lr_decay_factor=0.1)
    s = optim.make_schedule(c, spe)
    np.testing.assert_allclose([s(0), s(19), s(20), s(39), s(40)],
                               [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)
    c = _config(learning_rate=0.2, schedule="cosine", warmup_epochs=1.0)
    s = optim.make_schedule(c, spe)
    total, warm = 10 * spe, spe
    np.testing.assert_allclose(s(5), 0.2 * 5 / warm, rtol=1e-6)  # linear warm-up from 0
    t = 37
    np.testing.assert_allclose(
        s(t), 0.2 * 0.5 * (1 + np.cos(np.pi * (t - warm) / (total - warm))), rtol=1e-5)
    with pytest.raises(ValueError, match="schedule.*expected one of"):
        optim.make_schedule(_config(schedule="linear"), spe)


def test_bad_optimizer_names():
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="optimizer.name.*expected one of"):
        optim.make_optimizer(_config(name="lamb"), params, 1)
    with pytest.raises(ValueError, match="optimizer.clip.*expected one of"):
        optim.make_optimizer(_config(clip="sometimes"), params, 1)


def test_fixup_scalar_pattern_selects_the_fixup_scalars():
    from gne_jax.models import create_model, default_config

    c = default_config("resnet_cifar")
    c.update(depth=14, widths=(4, 8, 8), normalization="none", fixup_p=2.0, fixup_scalars=True)
    model = create_model(c)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))["params"]
    labels = optim.scalar_labels(params, optim.FIXUP_SCALAR_PATTERN)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = {jax.tree_util.keystr(p): lab for (p, _), lab in
           zip(flat, jax.tree.leaves(labels), strict=True)}
    # Independent description: Fixup scalars are the parameters held directly by a block
    # (not inside a conv/dense submodule), one number per block; a scanned stage stacks
    # its blocks on the leading axis of its 5-D conv kernels.
    want = {}
    for p, leaf in flat:
        keys = [k.key for k in p]
        conv = params[keys[0]].get("conv1", params[keys[0]].get("conv", {})).get("kernel")
        n = conv.shape[0] if conv is not None and conv.ndim == 5 else 1
        direct = len(keys) == 2 and leaf.size == n and leaf.ndim <= 1
        want[jax.tree_util.keystr(p)] = "scalar" if direct else "default"
    assert got == want
    assert sum(v == "scalar" for v in got.values()) >= 5
