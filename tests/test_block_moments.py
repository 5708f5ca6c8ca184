"""Per-block moments: serial and residual theorems, ensembles vs loops, sharding, any model."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gne_jax
from gne_jax.models import create_model
from gne_jax.probes.block_moments import block_moments, chain_blocks, groups_moments
from gne_jax.probes.ensemble import ensemble_block_moments, ensemble_summary, plan_ensemble
from gne_jax.probes.sweep import compile_plans, run_sweep

KEY = jax.random.key(0)


def test_serial_theorem_deep_orthogonal_tanh_mlp():
    """Composing per-block φ reproduces the end-to-end φ (derivations §3) within error bars."""
    model = create_model({"name": "mlp", "depth": 12, "width": 128, "activation": "tanh",
                          "init": "orthogonal", "num_classes": None})
    x = 0.5 * jax.random.normal(jax.random.key(1), (2, 128))
    v = model.init(jax.random.key(2), x, train=False)
    r = block_moments(model, v, x, key=KEY, num_probes=64, train=False)
    assert r.names[0] == "input" and len(r.names) == 13
    phi = np.asarray(r.blocks.phi, np.float64)
    rel_se = np.asarray(r.blocks.phi_sem) / phi
    prod = float(np.prod(phi))
    # SE of the product: relative SEs add in quadrature; plus the end-to-end SE
    se = np.sqrt((prod * np.sqrt(np.sum(rel_se**2))) ** 2 + float(r.end_to_end.phi_sem) ** 2)
    # freeness holds up to O(1/width) at finite width (derivations §3): allow 2% besides 4 SE
    assert abs(prod - float(r.end_to_end.phi)) <= 4 * se + 0.02 * prod, (prod, r.end_to_end.phi)
    # the exact per-block moments agree with the estimates
    e = block_moments(model, v, x, key=KEY, method="exact", train=False)
    z = np.abs(np.asarray(r.blocks.phi) - np.asarray(e.blocks.phi)) / np.maximum(
        np.asarray(r.blocks.phi_sem), 1e-6)
    assert np.all(z < 4.5), z


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_residual_block_phi_is_one_plus_branch(scale):
    """x + a·W f(x): φ = 1 + φ(branch), ϕ = ϕ_b + 2φ_b (derivations §4.3), exact moments."""
    model = create_model({"name": "mlp", "depth": 3, "width": 200, "activation": "relu",
                          "residual": "pre", "residual_scale": scale, "num_classes": None,
                          "input_layer": False})
    x = jax.random.normal(jax.random.key(3), (1, 200))
    v = model.init(jax.random.key(4), x, train=False)
    r = block_moments(model, v, x, key=KEY, method="exact", end_to_end=False, train=False)
    res = [r.names[i] for i in r.branch_of]
    assert res == ["layer1", "layer2", "layer3"]
    phi_b = np.asarray(r.branch.phi)
    phi = np.asarray(r.blocks.phi)[list(r.branch_of)]
    # the cross term 2·Tr(J_b)/m is zero in expectation; its std for a Gaussian branch is
    # ≈ 2√(φ_b)/m (Σ_i J_ii² ≈ φ_b): the tolerance is 4 of those
    tol = 4 * 2 * np.sqrt(phi_b) / 200
    np.testing.assert_allclose(phi, 1 + phi_b, atol=tol.max())
    np.testing.assert_allclose(phi_b, scale**2 * 1.0, rtol=0.25)  # Kaiming·ReLU branch: φ≈a²
    varphi = np.asarray(r.blocks.varphi)[list(r.branch_of)]
    pred = np.asarray(r.branch.varphi) + 2 * phi_b
    np.testing.assert_allclose(varphi, pred, rtol=0.1, atol=0.05 * scale**2)


def test_ensemble_equals_python_loop_over_the_same_keys():
    model = create_model({"name": "mlp", "depth": 3, "width": 16, "activation": "tanh",
                          "num_classes": 4, "normalization": "batchnorm"})
    x = jax.random.normal(jax.random.key(5), (8, 16))
    ens = ensemble_block_moments(model, x, key=KEY, num_inits=4, train=True, num_probes=8)
    single = jax.jit(lambda v, k: block_moments(model, v, x, key=k, train=True, num_probes=8))
    for i, k in enumerate(jax.random.split(KEY, 4)):
        k_init, k_probe = jax.random.split(k)
        v = model.init(k_init, x, train=False)
        one = single(v, k_probe)
        np.testing.assert_allclose(ens.blocks.phi[i], one.blocks.phi, rtol=2e-5)
        np.testing.assert_allclose(ens.blocks.varphi[i], one.blocks.varphi, rtol=2e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(ens.end_to_end.phi[i], one.end_to_end.phi, rtol=2e-5)
    # chunking the ensemble does not change the result
    chunked = ensemble_block_moments(model, x, key=KEY, num_inits=4, train=True, num_probes=8,
                                     init_chunk=3)
    np.testing.assert_allclose(chunked.blocks.phi, ens.blocks.phi, rtol=2e-5)
    every = ensemble_block_moments(model, x, key=KEY, num_inits=4, train=True, num_probes=8,
                                   init_chunk=None)  # all inits vmapped at once
    np.testing.assert_allclose(every.blocks.phi, ens.blocks.phi, rtol=2e-5)
    # XLA's default options (not the CPU -O1 of the probe programs) give the same moments
    plain = ensemble_block_moments(model, x, key=KEY, num_inits=4, train=True, num_probes=8,
                                   compiler_options=None)
    np.testing.assert_allclose(plain.blocks.phi, ens.blocks.phi, rtol=2e-5)
    with pytest.raises(TypeError, match="compiler_options"):
        ensemble_block_moments(model, x, key=KEY, num_inits=4, compiler_options="fast",
                               train=False)
    s = ensemble_summary(ens.blocks)
    np.testing.assert_allclose(s["phi"]["mean"], np.mean(ens.blocks.phi, 0), rtol=1e-6)
    np.testing.assert_allclose(s["phi"]["median"], np.median(ens.blocks.phi, 0), rtol=1e-6)
    pooled = np.mean(ens.blocks.phi2, 0) - np.mean(ens.blocks.phi, 0) ** 2
    np.testing.assert_allclose(s["varphi_pooled"]["mean"], pooled, rtol=1e-5)


def test_sweep_over_initializers_compiles_the_measurement_once():
    base = {"name": "mlp", "depth": 3, "width": 16, "activation": "tanh", "num_classes": 4,
            "normalization": "batchnorm"}
    x = jax.random.normal(jax.random.key(5), (8, 16))
    inits = ["orthogonal", "kaiming_normal"]
    models = [create_model({**base, "init": i}) for i in inits]
    kw = dict(key=KEY, num_inits=3, train=True, num_probes=8)
    plans = [plan_ensemble(m, x, **kw) for m in models]
    (init_a, measure_a), (init_b, measure_b) = compile_plans(plans)
    assert measure_a is measure_b  # one executable: the measurement ignores the initializer
    assert init_a is not init_b
    points = run_sweep(base, {"init": inits}, x, **kw)
    for m, p in zip(models, points, strict=True):
        alone = ensemble_block_moments(m, x, **kw)
        np.testing.assert_allclose(p.result.blocks.phi, alone.blocks.phi, rtol=1e-6)
        np.testing.assert_allclose(p.result.end_to_end.phi, alone.end_to_end.phi, rtol=1e-6)
    # different initializers do give different moments
    assert not np.allclose(points[0].result.blocks.phi, points[1].result.blocks.phi)


SHARDED = textwrap.dedent("""
    import json, jax, numpy as np
    from gne_jax.probes.ensemble import ensemble_block_moments, plan_ensemble, run_plan
    from gne_jax.models import create_model
    from gne_jax.probes.sweep import compile_plans
    assert jax.device_count() == 4
    model = create_model({"name": "mlp", "depth": 2, "width": 8, "activation": "tanh",
                          "num_classes": 4, "normalization": "batchnorm"})
    x = jax.random.normal(jax.random.key(5), (4, 8))
    kw = dict(key=jax.random.key(0), num_inits=6, train=True, num_probes=4)
    sharded = ensemble_block_moments(model, x, **kw)           # 6 inits over 4 devices
    single = ensemble_block_moments(model, x, mesh=None, **kw)
    plan = plan_ensemble(model, x, init_chunk=1, **kw)           # chunks of 4, compiled AOT
    aot = run_plan(plan, compile_plans([plan])[0])
    print(json.dumps({"sharded": np.asarray(sharded.blocks.phi).tolist(),
                      "aot": np.asarray(aot.blocks.phi).tolist(),
                      "single": np.asarray(single.blocks.phi).tolist(),
                      "e2e_sharded": np.asarray(sharded.end_to_end.phi).tolist(),
                      "e2e_single": np.asarray(single.end_to_end.phi).tolist()}))
""")


def test_sharded_over_four_devices_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.asarray(res["sharded"]).shape == (6, 4)
    np.testing.assert_allclose(res["sharded"], res["single"], rtol=2e-5)
    np.testing.assert_allclose(res["aot"], res["single"], rtol=2e-5)
    np.testing.assert_allclose(res["e2e_sharded"], res["e2e_single"], rtol=2e-5)


def test_nnx_model_and_plain_functions():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(24, 24, rngs=rngs)
            self.l2 = nnx.Linear(24, 24, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.l2(jnp.tanh(self.l1(x))))

    net = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    fn = lambda x: nnx.merge(graphdef, state)(x)  # pure function of x
    x = jax.random.normal(jax.random.key(6), (3, 24))
    m = gne_jax.jacobian_moments(fn, x, key=KEY, num_probes=64)
    J = jax.jacfwd(lambda z: fn(z.reshape(3, 24)).ravel())(x.ravel())
    ev = np.linalg.eigvalsh(np.asarray(J @ J.T, np.float64))
    assert abs(float(m.phi) - ev.mean()) < 4 * float(m.phi_sem) + 1e-6
    # per block through plain functions of its sub-modules
    layers = [("l1", lambda h: jnp.tanh(nnx.merge(graphdef, state).l1(h))),
              ("l2", lambda h: jnp.tanh(nnx.merge(graphdef, state).l2(h)))]
    r = groups_moments(chain_blocks(layers, x), x, key=KEY, method="exact")
    assert r.names == ("l1", "l2")
    np.testing.assert_allclose(r.end_to_end.phi, ev.mean(), rtol=1e-4)
    h1 = layers[0][1](x)
    J2 = jax.jacfwd(lambda z: layers[1][1](z.reshape(3, 24)).ravel())(h1.ravel())
    np.testing.assert_allclose(r.blocks.phi[1], float(jnp.sum(J2**2)) / J2.shape[0], rtol=1e-4)


def test_any_model_example_matches_exact_jacobians():
    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "probe_any_model.py"
    spec = importlib.util.spec_from_file_location("probe_any_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.run(width=16, depth=3, batch=2, probes=32)
    assert [r["function"] for r in rows] == ["nnx layer1", "nnx layer2", "nnx layer3",
                                             "nnx whole model", "plain scanned function"]
    for r in rows:  # every estimate within 4 SE of the exact Jacobian's (jacfwd + eigvalsh)
        assert example.within(r, "phi") == "yes", r
        assert example.within(r, "varphi") == "yes", r
    assert rows[-2]["phi_sem"] > 0 and rows[-1]["phi_sem"] > 0  # random, not trivially exact


def test_bad_input_names_expected_shape():
    model = create_model({"name": "serial_cnn", "depth": 8})
    x = jnp.ones((2, 8, 8, 3))
    v = model.init(KEY, x, train=False)
    with pytest.raises(ValueError, match=r"rejected the input `x` of shape \(2, 8, 3\)"):
        block_moments(model, v, jnp.ones((2, 8, 3)), key=KEY, train=False)
    mlp = create_model({"name": "mlp", "depth": 2, "width": 8, "num_classes": 4})
    vm = mlp.init(KEY, jnp.ones((2, 12)), train=False)
    with pytest.raises(ValueError, match=r"rejected the input `x` of shape \(2, 10\)"):
        block_moments(mlp, vm, jnp.ones((2, 10)), key=KEY, train=False)  # 10 features, not 12
    with pytest.raises(TypeError, match="does not expose blocks"):
        block_moments(lambda z: z, v, x, key=KEY, train=False)
    with pytest.raises(ValueError, match="num_inits"):
        ensemble_block_moments(model, x, key=KEY, num_inits=0, train=False)
    # the mode of batch-coupled layers is never chosen silently
    with pytest.raises(TypeError, match="'train'"):
        block_moments(model, v, x, key=KEY)
    with pytest.raises(TypeError, match="'train'"):
        ensemble_block_moments(model, x, key=KEY, num_inits=2)


def test_ensemble_under_outer_jit_and_non_finite_input():
    model = create_model({"name": "mlp", "depth": 2, "width": 8, "num_classes": None})
    x = jnp.ones((2, 8))
    f = jax.jit(lambda k: ensemble_block_moments(model, x, key=k, num_inits=2, num_probes=2,
                                                train=False))
    r = f(KEY)
    eager = ensemble_block_moments(model, x, key=KEY, num_inits=2, num_probes=2, train=False)
    np.testing.assert_allclose(r.blocks.phi, eager.blocks.phi, rtol=1e-6)
    with pytest.raises(FloatingPointError, match=r"non-finite Jacobian moments in block.*"
                                                 r"`x` \(the input\) contains NaN"):
        ensemble_block_moments(model, x * jnp.nan, key=KEY, num_inits=2, num_probes=2, train=False)
    # a model without blocks (a Linen layer, an NNX module) is named before any work
    import flax.linen as nn
    from flax import nnx
    for bad in (nn.Dense(4), nnx.Linear(8, 4, rngs=nnx.Rngs(0))):
        with pytest.raises(TypeError, match="does not expose blocks"):
            ensemble_block_moments(bad, x, key=KEY, num_inits=2, train=False)
