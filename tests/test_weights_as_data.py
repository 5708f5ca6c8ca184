"""Weights as data: every entry point compiles once per structure, eagerly as under jit.

Compilations are counted with JAX's monitoring events (one backend compilation per
program); a new closure over new arrays of the same architecture must compile nothing.
"""

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys
import types
import typing
import weakref

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax import (
    block_moments,
    eigh_extreme,
    ensemble_block_moments,
    group_traces,
    groups_moments,
    hessian_density,
    hessian_eigenpairs,
    hessian_group_traces,
    hessian_trace,
    hutchinson,
    hutchpp,
    jacobian_moments,
    jacobian_spectral_density,
    lanczos_tridiag,
    spectral_density,
)
from gne_jax.probes import compiled
from gne_jax.probes.blocks import single_block

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def traces(monkeypatch):
    """A list that gets one entry per trace of a user function (``compiled.hoist``), with
    the program cache cleared first."""
    compiled.clear_programs()
    traced = []
    hoist = compiled.hoist
    monkeypatch.setattr(compiled, "hoist", lambda *a, **k: traced.append(1) or hoist(*a, **k))
    return traced


@contextlib.contextmanager
def count_compilations():
    """Yields a list that collects one entry per backend compilation inside the block."""
    events = []

    def listener(name, duration, **kwargs):
        if name == COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def mlp_apply(params, x):
    h = x
    for w in params:
        h = jnp.tanh(h @ w)
    return h


def random_params(seed, widths):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32)
            for a, b in zip(widths[:-1], widths[1:], strict=True)]


def test_new_closures_at_new_weights_compile_once_and_match_a_jitted_reference():
    compiled.clear_programs()
    widths = (12, 20, 20, 7)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 12)), jnp.float32)
    key = jax.random.key(1)
    states = [random_params(s, widths) for s in range(6)]
    # the statistics over the probe samples are one small program shared by every structure
    # (per number of probes and dtype): compile it first with another function
    jacobian_moments(lambda z: 2.0 * z, x, key=key, num_probes=8)
    results = []
    with count_compilations() as events:
        for i, p in enumerate(states):
            if i % 3 == 0:
                fn = lambda z, p=p: mlp_apply(p, z)  # noqa: E731
                results.append(jacobian_moments(fn, x, key=key, num_probes=8))
            elif i % 3 == 1:
                results.append(jacobian_moments(functools.partial(mlp_apply, p), x, key=key,
                                                num_probes=8))
            else:
                results.append(jacobian_moments(mlp_apply, x, params=p, key=key, num_probes=8))
    assert len(events) == 1, f"{len(events)} compilations for 6 weight states"
    reference = jax.jit(lambda p, z, k: jacobian_moments(lambda h: mlp_apply(p, h), z, key=k,
                                                         num_probes=8))
    for p, r in zip(states, results, strict=True):
        ref = reference(p, x, key)
        for field in ("phi", "phi2", "varphi", "phi_sem", "varphi_sem"):
            np.testing.assert_allclose(getattr(r, field), getattr(ref, field), rtol=2e-6,
                                       err_msg=field)
        assert (r.size, r.out_size, r.in_size, r.num_matvecs) == (21, 21, 36, 8)
    # different weights, different answers (the weights are not baked in)
    assert len({float(r.phi) for r in results}) == len(results)


def _probe_and_forget():
    """Probes through closures and returns only weak references to them and their arrays."""
    p = random_params(3, (12, 9))
    fn = lambda z: mlp_apply(p, z)  # noqa: E731
    jacobian_moments(fn, jnp.ones((2, 12)), key=jax.random.key(0), num_probes=4)
    a = jnp.asarray(np.diag(np.arange(1.0, 9.0)), jnp.float32)
    mv = lambda v: a @ v  # noqa: E731
    spectral_density(mv, jnp.zeros(8), key=jax.random.key(0), num_steps=4, num_probes=2)
    return [weakref.ref(fn), weakref.ref(p[0]), weakref.ref(mv), weakref.ref(a)]


def test_the_cache_keeps_no_closure_or_weight_alive():
    refs = _probe_and_forget()
    gc.collect()
    assert all(r() is None for r in refs)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _memory_growth_mb(n: int, calls: int) -> float:
    """RSS growth over ``calls`` probes, each at a new n×n float32 weight (closure)."""
    w0 = jax.random.normal(jax.random.key(0), (n, n)) / n
    x = jnp.ones((n,))
    key = jax.random.key(1)

    def probe(i):
        w = w0 * (1.0 + 1e-3 * i)  # a new 64 MiB array each time
        return jacobian_moments(lambda z: z @ w, x, key=key, num_probes=2).phi

    for i in range(3):
        probe(i).block_until_ready()
    gc.collect()
    before = _rss_mb()
    with count_compilations() as events:
        for i in range(3, 3 + calls):
            probe(i).block_until_ready()
    gc.collect()
    assert not events
    return _rss_mb() - before


def test_resident_memory_is_flat_over_new_weight_states():
    grown = _memory_growth_mb(2048, 20)  # 16 MiB per weight: 320 MiB if they were kept
    assert grown < 100, f"resident memory grew by {grown:.0f} MiB over 20 calls"


def test_resident_memory_is_flat_over_100_weight_states_of_64_mb():
    grown = _memory_growth_mb(4096, 100)  # 64 MiB per weight: 6.4 GiB if they were kept
    assert grown < 200, f"resident memory grew by {grown:.0f} MiB over 100 calls"


def _quadratic_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"]) @ params["w2"]
    return 0.5 * jnp.mean((h - y) ** 2)


def _loss_setup(seed):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 6)) / 2, jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((6, 2)) / 2, jnp.float32)}
    x = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)
    return params, (lambda p: _quadratic_loss(p, x, y))


def _sym(seed, n=12):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    return jnp.asarray(a + a.T, jnp.float32)


def _sym_matvec(seed):
    a = _sym(seed)
    return lambda v: a @ v


def _dict_matvec(seed):
    a = _sym(seed)[:6, :6]
    return lambda v: {"u": a @ v["u"], "w": v["w"]}


def _block_group(seed):
    w = random_params(seed, (6, 6))[0]
    return single_block("a", lambda p, z: jnp.tanh(z @ w), {}, jnp.ones((2, 6)))


def _tiny_model():
    from gne_jax.models import create_model

    return create_model({"name": "mlp", "width": 8, "depth": 3, "num_classes": 4})


@functools.cache
def _tiny_init_fn():
    return jax.jit(lambda k: _tiny_model().init(k, jnp.ones((4, 6))))


def _tiny_init(key):
    return _tiny_init_fn()(key)


ENTRY_POINTS = {
    "spectral_density": lambda s: spectral_density(
        _sym_matvec(s), jnp.zeros(12), key=jax.random.key(s), num_steps=5,
        num_probes=2),
    "jacobian_spectral_density": lambda s: jacobian_spectral_density(
        functools.partial(mlp_apply, random_params(s, (6, 5))), jnp.ones((2, 6)),
        key=jax.random.key(s), num_steps=4, num_probes=2),
    "lanczos_tridiag": lambda s: lanczos_tridiag(5)(_sym_matvec(s), jnp.ones(12)),
    "eigh_extreme": lambda s: eigh_extreme(6, 2)(_sym_matvec(s), jnp.zeros(12),
                                                 key=jax.random.key(s)),
    "hutchinson": lambda s: hutchinson(4)(_sym_matvec(s), jnp.zeros(12), key=jax.random.key(s)),
    "hutchpp": lambda s: hutchpp(6)(_dict_matvec(s), {"u": jnp.zeros(6), "w": jnp.zeros(3)},
                                    key=jax.random.key(s)),
    "group_traces": lambda s: group_traces(
        _dict_matvec(s),
        {"u": jnp.zeros(6), "w": jnp.zeros(3)}, key=jax.random.key(s), num_probes=4),
    "hessian_trace": lambda s: hessian_trace(_loss_setup(s)[1], _loss_setup(s)[0],
                                             key=jax.random.key(s), num_probes=4),
    "hessian_group_traces": lambda s: hessian_group_traces(
        _loss_setup(s)[1], _loss_setup(s)[0], key=jax.random.key(s), num_probes=4),
    "hessian_eigenpairs": lambda s: hessian_eigenpairs(
        _loss_setup(s)[1], _loss_setup(s)[0], key=jax.random.key(s), num_eigs=1, num_steps=6),
    "hessian_density": lambda s: hessian_density(
        _loss_setup(s)[1], _loss_setup(s)[0], key=jax.random.key(s), num_steps=5, num_probes=2),
    "groups_moments": lambda s: groups_moments(
        [_block_group(s)],
        jnp.ones((2, 6)), key=jax.random.key(s), num_probes=4),
    "block_moments": lambda s: block_moments(
        _tiny_model(), _tiny_init(jax.random.key(s)), jnp.ones((4, 6)),
        key=jax.random.key(s), num_probes=4, train=False),
    "ensemble_block_moments": lambda s: ensemble_block_moments(
        _tiny_model(), jnp.ones((4, 6)), key=jax.random.key(s), num_inits=2, num_probes=4,
        train=False),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_eager_second_call_with_new_arrays_compiles_nothing(name):
    call = ENTRY_POINTS[name]
    jax.block_until_ready(call(0))
    jax.block_until_ready(call(1))  # eager helpers (key splits...) warmed at this seed too
    with count_compilations() as events:
        jax.block_until_ready(call(2))
    assert not events, f"{name}: {len(events)} compilations on a call with new arrays"


def test_training_moments_hook_compiles_once_per_run():
    """The training loop's moments hook at new weights (custom model without blocks, and a
    library model with blocks) reuses the program compiled at its first call."""
    import flax.linen as nn
    import ml_collections

    from gne_jax.models import create_model
    from gne_jax.training.train import _moments_hook

    class Linear(nn.Module):  # a custom model: the loop calls every model with `train`
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(5)(x)

    config = ml_collections.ConfigDict(
        {"moments_every_steps": 1, "moments_batch": 4, "moments_num_probes": 4})
    x = jax.random.normal(jax.random.key(0), (4, 6))
    models = [Linear(), create_model({"name": "mlp", "depth": 3, "width": 8,
                                          "num_classes": 5})]
    for model in models:
        hook = _moments_hook(config, model, x)
        state = types.SimpleNamespace()
        out = []
        for i in range(3):
            variables = model.init(jax.random.key(10 + i), x)
            state.params, state.batch_stats = variables["params"], variables.get("batch_stats", {})
            if i == 1:
                with count_compilations() as events:
                    out.append(hook(state, jax.random.key(i)))
                assert events == [], type(model).__name__
            else:
                out.append(hook(state, jax.random.key(i)))
        assert all(np.isfinite(o["phi"]) for o in out)
        exact = np.linalg.norm(np.asarray(variables["params"]["Dense_0"]["kernel"]))**2 / 5 if (
            isinstance(model, Linear)) else None
        if exact is not None:  # a linear map on a batch of 4: φ = 4‖W‖²_F / (4·5)
            assert abs(out[-1]["phi"] - exact) <= 4 * out[-1]["phi_sem"] + 1e-6


@pytest.mark.parametrize("make,unbiased_check", [(lambda: hutchinson(6), True),
                                                 (lambda: hutchpp(6), False)],
                         ids=["hutchinson", "hutchpp"])
def test_trace_estimator_closures_compile_once_per_structure(make, unbiased_check):
    """New matvec closures over new matrices reuse one program, and give what the same
    estimator gives under jit (the estimator's own reference: same key, same probes)."""
    estimate = make()
    like = jnp.zeros(12)
    mats = [_sym(s) for s in range(4)]
    estimate(lambda v: mats[0] @ v, like, key=jax.random.key(0))  # compiles its program
    with count_compilations() as events:
        out = [estimate(lambda v, a=a: a @ v, like, key=jax.random.key(i))
               for i, a in enumerate(mats)]
    assert not events, f"{len(events)} compilations for {len(mats)} new matvecs"
    jitted = jax.jit(lambda a, k: estimate(lambda v: a @ v, like, key=k))
    for i, (a, r) in enumerate(zip(mats, out, strict=True)):
        ref = jitted(a, jax.random.key(i))
        np.testing.assert_allclose(r.samples, ref.samples, rtol=1e-5, atol=1e-5)
        assert r.num_matvecs == 6
    if not unbiased_check:
        return  # Hutch++'s SE is conditional on its 2-column sketch: not a fair check here
    # the estimates are unbiased for tr A: within 4 SE of the exact trace
    exact = np.array([float(jnp.trace(a)) for a in mats])
    values = np.array([float(r.value) for r in out])
    sems = np.array([float(r.sem) for r in out])
    assert np.all(np.abs(values - exact) <= 4 * sems + 1e-4), (values, exact, sems)


def _exact_phi(fn, x):
    """φ = ‖J‖²_F / m from the materialized Jacobian (independent of the probes)."""
    jac = np.asarray(jax.jacfwd(fn)(x)).reshape(-1, x.size)
    return float(np.sum(jac**2) / jac.shape[0])


def _phi(fn, x):
    return float(jacobian_moments(fn, x, method="exact").phi)


def test_fast_path_reads_closures_without_tracing(traces):
    """After the first call of each form and one check at its first new weights, new
    closures over new weights are not traced."""
    traced = traces
    x = jnp.ones((2, 12))
    states = [random_params(s, (12, 9, 5)) for s in range(4)]
    forms = [lambda p: (lambda z: mlp_apply(p, z)), lambda p: functools.partial(mlp_apply, p)]
    for make in forms:
        jacobian_moments(make(states[0]), x, key=jax.random.key(0), num_probes=4)
        traced.clear()
        for p in states[1:]:
            r = jacobian_moments(make(p), x, key=jax.random.key(0), num_probes=4)
            assert abs(float(r.phi) - _exact_phi(make(p), x)) <= 4 * float(r.phi_sem) + 1e-6
        assert len(traced) == 1, f"{len(traced)} traces over 3 new closures (1 check)"


def test_library_wrappers_are_fixed_and_wrappers_of_user_code_are_not():
    """A decorator's wrapper inside a library (``Module.apply``, ``Dense.__call__``) whose
    closure holds only library functions is compared by identity; one over user code is
    read through its closure."""
    import flax.linen as nn

    def user(z):
        return 2.0 * z

    assert compiled._fixed_library_function(nn.Module.apply)
    assert compiled._fixed_library_function(nn.Dense.__call__)
    assert compiled._fixed_library_function(jax.nn.gelu)  # no closure
    assert not compiled._fixed_library_function(jax.checkpoint(user))
    assert not compiled._fixed_library_function(user)


def test_a_trace_that_reads_the_weights_values_is_traced_at_every_call(traces):
    """A function that reads its arrays' values while tracing (a NumPy norm of the weight)
    bakes them into the jaxpr: the check at its first new weights finds it, and from then
    on each call is traced; a function that does not is traced no more."""
    traced = traces
    x = jnp.linspace(-1.0, 1.0, 5)
    ws = [jnp.asarray(np.random.default_rng(s).standard_normal((5, 5)), jnp.float32)
          for s in range(4)]
    forms = {"value-dependent": lambda w: (lambda z: w @ z / float(np.linalg.norm(w))),
             "plain": lambda w: (lambda z: jnp.tanh(w @ z))}
    for name, make in forms.items():
        traced.clear()
        for w in ws:
            f = make(w)
            np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5, err_msg=name)
        assert len(traced) == (4 if name == "value-dependent" else 2), (name, len(traced))


def test_the_same_function_sees_reassigned_globals():
    """One function object probed again after the globals it reads were reassigned (a
    weight ``W = ...``, an activation, a helper redefined in a notebook cell): each call
    equals the exact φ of what the function computes now, not a trace from before."""
    compiled.clear_programs()
    ns = {"__name__": "notebook", "jnp": jnp, "jax": jax}
    exec("W = jnp.eye(4)\n"
         "ACT = jnp.tanh\n"
         "def helper(u):\n    return u\n"
         "def f(z):\n    return helper(ACT(W @ z + 0.5))\n", ns)
    f, x = ns["f"], jnp.linspace(-0.5, 0.5, 4)
    seen = []
    for edit in ("", "W = 3.0 * jnp.eye(4)", "ACT = jax.nn.relu",
                 "def helper(u):\n    return 2.0 * u\n"):
        exec(edit, ns)
        exact = _exact_phi(f, x)
        np.testing.assert_allclose(_phi(f, x), exact, rtol=1e-5, err_msg=edit)
        assert all(abs(exact - e) > 1e-2 * exact for e in seen), edit  # each edit matters
        seen.append(exact)


USER_LINEN_MODEL = """
import jax.numpy as jnp
import flax.linen as nn

ACT = jnp.tanh

class Block(nn.Module):
    width: int = 6
    scale = 1.0

    def setup(self):
        self.d = nn.Dense(self.width)

    def __call__(self, z):
        return self.scale * ACT(self.d(z))

class Base(nn.Module):
    def finish(self, z):
        return z

class Net(Base):
    depth: int = 2

    @nn.compact
    def __call__(self, z):
        for _ in range(self.depth):
            z = Block()(z)
        return super().finish(z)
"""


def test_a_users_module_classes_are_read_with_what_their_methods_read(traces):
    """A Linen model defined by the user: new weights reuse the program without a trace;
    editing a global its methods read, a class attribute (a number, an array) or a
    base-class method is seen by the next closure (as a new ``jax.jit`` of a new closure
    would see it)."""
    traced = traces
    ns = {"__name__": "user_model"}
    exec(USER_LINEN_MODEL, ns)
    ns["d"] = jnp.ones((6, 6))  # a global array named like the attribute ``self.d``
    net = ns["Net"]()
    x = jnp.linspace(-1.0, 1.0, 6)
    states = [net.init(jax.random.key(s), x) for s in range(3)]
    forms = [lambda p: (lambda z: net.apply(p, z)), lambda p: functools.partial(net.apply, p)]
    for make in forms:
        _phi(make(states[0]), x)
        traced.clear()
        for p in states[1:]:
            np.testing.assert_allclose(_phi(make(p), x), _exact_phi(make(p), x), rtol=1e-5)
        assert len(traced) == 1, f"{len(traced)} traces over 2 new weight states (1 check)"
    for edit in ("ACT = jnp.sin", "Block.scale = 2.0", "Block.scale = jnp.asarray(3.0)",
                 "Block.scale = jnp.asarray(4.0)", "Base.finish = lambda self, z: 3.0 * z"):
        before = _exact_phi(forms[0](states[1]), x)
        exec(edit, ns)
        for make in forms:
            f = make(states[1])
            exact = _exact_phi(f, x)
            assert abs(exact - before) > 1e-2 * before, edit  # the edit changes the function
            np.testing.assert_allclose(_phi(f, x), exact, rtol=1e-5, err_msg=edit)


USER_NNX_MODEL = """
import jax.numpy as jnp
from flax import nnx

ACT = jnp.tanh

class Net(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs) for _ in range(2)])

    def __call__(self, z):
        for layer in self.layers:
            z = ACT(layer(z))
        return z
"""


def test_an_nnx_module_is_read_without_tracing_and_with_its_classes(traces):
    """An NNX module passed as ``fn`` (or closed over): new weights are not traced after
    the first call and its check, and φ is the exact one; editing a global that the
    module's ``__call__`` reads is seen."""
    traced = traces
    ns = {"__name__": "user_nnx_model"}
    exec(USER_NNX_MODEL, ns)
    from flax import nnx

    models = [ns["Net"](nnx.Rngs(s)) for s in range(4)]
    x = jnp.linspace(-1.0, 1.0, 6)
    for make in (lambda m: m, lambda m: (lambda z: m(z))):
        traced.clear()
        for m in models:
            np.testing.assert_allclose(_phi(make(m), x), _exact_phi(make(m), x), rtol=1e-5)
        assert len(traced) == 2, f"{len(traced)} traces over 4 models (first call + check)"
    before = _exact_phi(models[1], x)
    exec("ACT = jnp.sin", ns)
    for make in (lambda m: m, lambda m: (lambda z: m(z))):
        exact = _exact_phi(make(models[1]), x)
        assert abs(exact - before) > 1e-2 * before
        np.testing.assert_allclose(_phi(make(models[1]), x), exact, rtol=1e-5)


class _Params(typing.NamedTuple):
    w: jax.Array
    b: jax.Array


def test_named_tuple_and_frozen_dataclass_weights_are_data(traces):
    """Weights in a NamedTuple or a frozen dataclass (whose methods read globals) are read
    without a trace after the first call and its check, and φ is exact."""
    traced = traces
    ns = {"__name__": "user_layers", "jnp": jnp, "dataclasses": dataclasses, "jax": jax}
    exec("ACT = jnp.tanh\n"
         "@dataclasses.dataclass(frozen=True)\n"
         "class Layer:\n"
         "    w: jax.Array\n"
         "    def __call__(self, z):\n"
         "        return ACT(self.w @ z)\n", ns)
    x = jnp.linspace(-1.0, 1.0, 5)
    ws = [jnp.asarray(np.random.default_rng(s).standard_normal((5, 5)) / 2, jnp.float32)
          for s in range(4)]
    forms = {"namedtuple": lambda w: (lambda z: jnp.tanh(_Params(w, w[0]).w @ z)),
             "namedtuple closure": (lambda w: (lambda p: (lambda z: jnp.tanh(p.w @ z + p.b)))(
                 _Params(w, w[0]))),
             "frozen dataclass": lambda w: (lambda layer: (lambda z: layer(z)))(ns["Layer"](w))}
    for name, make in forms.items():
        traced.clear()
        for w in ws:
            np.testing.assert_allclose(_phi(make(w), x), _exact_phi(make(w), x), rtol=1e-5,
                                       err_msg=name)
        assert len(traced) == 2, (name, len(traced))
    exec("ACT = jnp.sin", ns)  # read by the dataclass's __call__
    f = forms["frozen dataclass"](ws[1])
    np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)


def test_functions_differing_only_in_a_custom_rule_or_callback_never_share_a_program():
    """Two functions whose jaxprs print alike but whose custom JVP rule or host callback
    differ (a rule over another scale, a callback over another factor, a global the rule
    reads): each probe is its own function's exact φ; a library rule (relu) and the same
    user rule at new weights compile nothing new."""
    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 4)

    def with_rule(s):
        @jax.custom_jvp
        def f(z):
            return jnp.sin(z)

        @f.defjvp
        def f_jvp(primals, tangents):
            return f(primals[0]), s * jnp.cos(primals[0]) * tangents[0]

        return f

    def with_callback(s):
        def host(a):
            return np.asarray(a) * s

        def f(z):
            return jax.pure_callback(host, jax.ShapeDtypeStruct(z.shape, z.dtype), z)

        f = jax.custom_jvp(f)
        f.defjvp(lambda p, t: (f(p[0]), jnp.asarray(s, t[0].dtype) * t[0]))
        return f

    for make, exact in [(with_rule, lambda s: s**2 * np.mean(np.cos(np.asarray(x)) ** 2)),
                        (with_callback, lambda s: s**2)]:
        for s_ in (1.0, 3.0):
            np.testing.assert_allclose(_phi(make(s_), x), exact(s_), rtol=1e-5)
    ns = {"__name__": "notebook", "jax": jax, "jnp": jnp, "S": 1.0}
    exec("@jax.custom_jvp\n"
         "def g(z):\n    return jnp.sin(z)\n"
         "@g.defjvp\n"
         "def g_jvp(p, t):\n    return g(p[0]), S * jnp.cos(p[0]) * t[0]\n", ns)
    for s_ in (1.0, 3.0):
        ns["S"] = s_
        np.testing.assert_allclose(_phi(ns["g"], x), _exact_phi(ns["g"], x), rtol=1e-5)
    for act in (jax.nn.relu, ns["g"]):
        ws = [jnp.asarray(np.random.default_rng(k).standard_normal((4, 4)), jnp.float32)
              for k in range(3)]
        _phi(lambda z, w=ws[0]: act(w @ z), x)
        with count_compilations() as events:
            for w in ws[1:]:
                _phi(lambda z, w=w: act(w @ z), x)
        assert not events, f"{len(events)} compilations at new weights"


def test_jitted_closures_config_objects_and_static_callables_are_read_now(monkeypatch):
    """From a second adversarial review: each probe equals the exact φ of what the function
    computes now. A jitted closure keeps its weights as hidden constants (never shared),
    a config object (SimpleNamespace, a plain object, a set) is read through its state, a
    partial, bound method or custom_jvp in a pytree's static data is read through its code,
    a user metaclass is read with its class, and the matmul precision is in the key."""
    import types as pytypes

    from flax import struct

    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 4)
    ws = [jnp.asarray(np.random.default_rng(k).standard_normal((4, 4)) / 2, jnp.float32)
          for k in range(3)]
    cases = []
    for w in ws:  # a jitted closure over each weight
        cases.append(jax.jit(lambda z, w=w: jnp.tanh(w @ z)))
    cfg = pytypes.SimpleNamespace(scale=1.0)
    obj_fn = lambda w: (lambda z: cfg.scale * jnp.tanh(w @ z))  # noqa: E731
    cases.append(obj_fn(ws[0]))
    ns = {"__name__": "user_static", "jnp": jnp, "jax": jax, "G": 1.0}
    exec("def act(z, k=1.0):\n    return G * k * jnp.tanh(z)\n"
         "class Meta(type):\n    scale = 1.0\n"
         "class Scaled(metaclass=Meta):\n"
         "    @classmethod\n    def apply(cls, z):\n        return type(cls).scale * z\n", ns)

    @struct.dataclass
    class Layer:
        w: jax.Array
        act: object = struct.field(pytree_node=False)

        def __call__(self, z):
            return self.act(self.w @ z)

    static = Layer(ws[0], functools.partial(ns["act"], k=2.0))
    for f in cases:
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)
    for edit in ("cfg", "G", "Meta", "partial"):
        if edit == "cfg":
            cfg.scale = 3.0
            f = obj_fn(ws[1])
        elif edit == "G":
            ns["G"] = 2.0
            f = (lambda layer: (lambda z: layer(z)))(Layer(ws[1], static.act))
        elif edit == "Meta":
            _phi(lambda z: ns["Scaled"].apply(ws[1] @ z), x)
            ns["Meta"].scale = 4.0
            f = lambda z: ns["Scaled"].apply(ws[1] @ z)  # noqa: E731
        else:
            static.act.keywords["k"] = 5.0  # in place
            f = (lambda layer: (lambda z: layer(z)))(Layer(ws[2], static.act))
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5, err_msg=edit)
    # a jitted closure's weights are not kept alive by the caches
    big = jnp.ones((4, 4))
    ref = weakref.ref(big)
    _phi(jax.jit(lambda z, w=big: jnp.tanh(w @ z)), x)
    del big
    gc.collect()
    assert ref() is None
    # the matmul precision shapes the trace: a structure traced at another is not served
    f = obj_fn(ws[2])
    _phi(f, x)
    st_default, _ = compiled.hoist_fast(f, x)
    with jax.default_matmul_precision("highest"):
        st_high, _ = compiled.hoist_fast(obj_fn(ws[1]), x)
    assert st_default != st_high


def test_subclasses_of_builtins_and_odd_objects_are_read_now(monkeypatch):
    """From a third review: a user subclass of list, dict, float, functools.partial or
    jax.custom_jvp is read with its contents and state; static pytree floats are told apart
    (-0.0, 1 vs 1.0); a dict containing itself does not break the process; a callable
    object passed as ``fn`` is read without tracing after its first call and check."""
    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 4)
    ns = {"__name__": "user_odd", "jax": jax, "jnp": jnp, "functools": functools}
    exec("class L(list):\n    pass\n"
         "class Meters(float):\n    def __repr__(self):\n        return f'{float(self):.0f} m'\n"
         "class P(functools.partial):\n    scale = 1.0\n"
         "    def __call__(self, *a):\n        return self.scale * super().__call__(*a)\n"
         "class CJ(jax.custom_jvp):\n"
         "    def __call__(self, *a):\n        return self.scale * super().__call__(*a)\n"
         "class Model:\n    def __init__(self, w):\n        self.w = w\n"
         "    def __call__(self, z):\n        return jnp.tanh(self.w @ z)\n", ns)
    lst = ns["L"]([2.0])
    part = ns["P"](jnp.multiply, 2.0)
    cj = ns["CJ"](jax.nn.relu.fun)
    cj.defjvp(jax.nn.relu.jvp)
    cj.scale = 2.0
    cfg = {"scale": 2.0}
    cfg["self"] = cfg
    checks = [
        (lambda: lst.__setitem__(0, 5.0), lambda: (lambda z: lst[0] * jnp.sin(z))),
        (lambda: None, lambda: (lambda m: (lambda z: m * jnp.sin(z)))(ns["Meters"](1.2))),
        (lambda: None, lambda: (lambda m: (lambda z: m * jnp.sin(z)))(ns["Meters"](1.4))),
        (lambda: setattr(part, "scale", 3.0), lambda: (lambda z: part(jnp.sin(z)))),
        (lambda: setattr(cj, "scale", 5.0), lambda: (lambda z: cj(z))),
        (lambda: None, lambda: (lambda z: cfg["scale"] * jnp.sin(z))),
    ]
    for edit, make in checks:
        _phi(make(), x)  # before the edit
        edit()
        f = make()
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)
    from flax import struct

    @struct.dataclass
    class Static:
        w: jax.Array
        c: float = struct.field(pytree_node=False)

    ws = [jnp.asarray(np.random.default_rng(k).standard_normal((4, 4)), jnp.float32)
          for k in range(3)]
    for c, w in zip((0.0, 0.0, -0.0), ws, strict=True):
        f = (lambda p: (lambda z: p.w @ z * (jnp.arctan2(p.c, -1.0) + 4.0)))(Static(w, c))
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)
    traced = []
    hoist = compiled.hoist
    monkeypatch.setattr(compiled, "hoist", lambda *a, **k: traced.append(1) or hoist(*a, **k))
    for w in ws + [2 * w for w in ws]:
        m = ns["Model"](w)
        np.testing.assert_allclose(_phi(m, x), _exact_phi(m, x), rtol=1e-5)
    assert len(traced) == 2, len(traced)  # the first call and its check
    assert float(jnp.sum(jax.jacfwd(jnp.sin)(x))) > 0  # the process still runs JAX


USER_CONSTRUCTORS = """
import dataclasses, functools
import jax.numpy as jnp
import flax.linen as nn

SCALE = 1.0

def helper(self, z, k):
    return SCALE * k * z

class Scaled:
    def __init__(self, w):
        self.w = w * SCALE

@dataclasses.dataclass
class Cfg:
    s: float = dataclasses.field(default_factory=lambda: SCALE)

class PM:
    fwd = functools.partialmethod(helper, k=1.0)

class Dn(nn.Module):
    @nn.compact
    def __call__(self, z):
        return jnp.tanh(SCALE * nn.Dense(4)(z))
"""


def test_constructors_descriptors_and_flax_transformed_classes_are_read(tmp_path):
    """From a fourth review: what a constructor, a dataclass default factory, a
    partialmethod or the user's class inside a Flax transform (nn.vmap / nn.remat) reads
    is part of the description: after ``SCALE = 3`` the same function gives the new φ."""
    compiled.clear_programs()
    path = tmp_path / "user_ctor.py"  # a real file: constructors written there are read
    path.write_text(USER_CONSTRUCTORS)
    spec = importlib.util.spec_from_file_location("user_ctor", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["user_ctor"] = mod
    try:
        spec.loader.exec_module(mod)
        import flax.linen as nn

        x = jnp.linspace(-1.0, 1.0, 4)
        w = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)) / 2, jnp.float32)
        vm = nn.vmap(mod.Dn, variable_axes={"params": None}, split_rngs={"params": False})()
        rm = nn.remat(mod.Dn)()
        pv, pr = vm.init(jax.random.key(0), x[None]), rm.init(jax.random.key(1), x)
        fns = [lambda z: jnp.tanh(mod.Scaled(w).w @ z),
               lambda z: jnp.tanh(mod.Cfg().s * (w @ z)),
               lambda z: jnp.tanh(mod.PM().fwd(w @ z)),
               lambda z: vm.apply(pv, z[None])[0],
               lambda z: rm.apply(pr, z)]
        for f in fns:
            _phi(f, x)
        mod.SCALE = 3.0
        for i, f in enumerate(fns):
            np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5, err_msg=str(i))
    finally:
        sys.modules.pop("user_ctor", None)


def test_fast_path_never_shares_a_program_between_different_functions():
    """Same code with different static values, a redefined global helper, repeated arrays:
    each probe equals the exact φ of its own function."""
    compiled.clear_programs()
    x = jnp.asarray(np.random.default_rng(1).standard_normal(6), jnp.float32)
    w1, w2 = (jnp.asarray(np.random.default_rng(s).standard_normal((6, 6)) / 3, jnp.float32)
              for s in (2, 3))

    def scaled(c):
        return lambda z: c * jnp.tanh(z @ w1)

    def default_scaled(c):
        return lambda z, c=c: c * jnp.tanh(z @ w1)

    ns = {"jnp": jnp}
    exec("def helper(z):\n    return jnp.sin(z)\n"
         "def make(w):\n    return lambda z: helper(z @ w)\n", ns)
    sin_fn = ns["make"](w1)
    sin_phi = _phi(sin_fn, x)
    exec("def helper(z):\n    return jnp.cos(z)\n", ns)  # redefined: make's lambda changes
    cos_fn = ns["make"](w1)

    def chain(ws):
        return lambda z: mlp_apply(ws, z)

    w_np = np.asarray(w2)
    cases = [scaled(2.0), scaled(3.0), scaled(-0.0), default_scaled(2.0), default_scaled(0.5),
             cos_fn, chain([w1, w1]), chain([w1, w2]), chain([w2, w2]),
             lambda z: jnp.tanh(z @ w_np)]  # a NumPy array: traced every time
    phis = [_phi(f, x) for f in cases]
    for f, phi in zip(cases, phis, strict=True):
        np.testing.assert_allclose(phi, _exact_phi(f, x), rtol=1e-5)
    assert abs(sin_phi - _exact_phi(lambda z: jnp.sin(z @ w1), x)) <= 1e-5 * sin_phi
    assert abs(phis[5] - sin_phi) > 1e-3  # the redefined helper was not served the old program
    # a library decorator's wrapper over a user function (jax.checkpoint) is read through
    # its closure, not by the wrapper's code: a new wrapper sees the redefined helper
    # (the same wrapper object keeps its first trace, in JAX as here)
    exec("def helper(z):\n    return jnp.sin(z)\n", ns)
    np.testing.assert_allclose(_phi(jax.checkpoint(ns["make"](w1)), x), sin_phi, rtol=1e-5)
    exec("def helper(z):\n    return jnp.cos(z)\n", ns)
    np.testing.assert_allclose(_phi(jax.checkpoint(ns["make"](w1)), x), phis[5], rtol=1e-5)
    # a user's module whose attribute is reassigned between calls (same identity)
    cfg = types.ModuleType("user_config")
    cfg.scale = 2.0
    ns = {"jnp": jnp, "cfg": cfg}
    exec("def make(w):\n    return lambda z: cfg.scale * jnp.tanh(z @ w)\n", ns)
    for scale in (2.0, 3.0):
        cfg.scale = scale
        f = ns["make"](w1)
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)


SHARDED_CLOSURES = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gne_jax import jacobian_moments
from gne_jax.probes import compiled

mesh = Mesh(np.array(jax.devices()), ("d",))
rows = NamedSharding(mesh, P("d"))
traced = []
hoist = compiled.hoist
compiled.hoist = lambda *a, **k: traced.append(1) or hoist(*a, **k)
x = jnp.linspace(-1.0, 1.0, 8)
make = lambda w: (lambda z: jnp.tanh(w @ z))
out = []
for seed, sharded in [(0, True), (1, True), (2, False), (3, False), (4, True), (5, False)]:
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((8, 8)) / 3, jnp.float32)
    w = jax.device_put(w, rows) if sharded else w
    r = jacobian_moments(make(w), x, method="exact")
    jac = np.asarray(jax.jacfwd(make(np.asarray(w)))(x))
    out.append([float(r.phi), float(np.sum(jac**2) / 8), len(traced)])
print(json.dumps(out))
"""


def test_closures_over_differently_sharded_weights_are_probed_correctly():
    """Closures over sharded and single-device weights of one shape: each probe is its
    own function's φ, and new weights in a sharding already seen (and checked) are not
    traced again."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_CLOSURES], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for phi, exact, _ in res:
        np.testing.assert_allclose(phi, exact, rtol=1e-5)
    # each sharding: a trace at its first call, one check at its second (other arrays),
    # then the closure is read untraced (calls 5 and 6)
    traces = [t for _, _, t in res]
    assert traces == [1, 2, 3, 4, 4, 4], traces


def test_python_scalars_are_structure_and_array_scalars_are_data():
    """A closed-over Python float is a constant of the program (as under jax.jit): a new value
    compiles a new program; the same sweep over array scalars compiles once. Both are exact:
    φ of z ↦ c·z is c²."""
    compiled.clear_programs()
    x = jnp.ones(5)
    jacobian_moments(jnp.sin, x, method="exact")  # the shared statistics program
    for wrap, expected_compiles in [(float, 3), (jnp.float32, 1)]:
        with count_compilations() as events:
            for c in (1.5, 2.0, 3.0):
                scale = wrap(c)
                r = jacobian_moments(lambda z, s=scale: s * z, x, method="exact")
                np.testing.assert_allclose(float(r.phi), c**2, rtol=1e-6)
        assert len(events) == expected_compiles, (wrap, len(events))


def test_fifth_review_sequences_are_read_now(tmp_path, monkeypatch):
    """From a fifth adversarial review: each probe equals the exact φ of what its function
    computes now. Dicts whose keys differ only in insertion order (a loop over
    ``.values()``), a value that chooses which array a trace reads, a module imported in the
    body or reached through ``sys.modules``, a host callback whose object changed state, and
    NumPy scalars in a pytree's static data."""
    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 8)

    def w(seed, scale=1.0):
        return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((8, 8)) / 3,
                           jnp.float32)

    def net(ws, z):
        for v in ws.values():  # insertion order
            z = jnp.tanh(v @ z)
        return z

    def net_kw(z, **ws):
        return net(ws, z)

    def check(f, probe=None):
        got = _phi(f, x) if probe is None else probe()
        np.testing.assert_allclose(got, _exact_phi(f, x), rtol=1e-5)

    from flax import nnx, struct
    from flax.core import FrozenDict

    @struct.dataclass
    class Holder:
        d: dict

    class Net(nnx.Module):
        def __init__(self, d, kind):
            self.d = nnx.Dict(d) if kind == "nnx.Dict" else nnx.data(d)

        def __call__(self, z):
            return net(self.d, z)

    # the second call checks the trace at new arrays in the same order; the third is read
    # without tracing, so only the description tells its order from the first's
    for i, order in enumerate(["ab", "ab", "ba", "ba", "ab"]):
        d = {c: w(10 * i + n, 1.0 if c == "a" else 3.0) for n, c in enumerate(order)}
        frozen, holder = FrozenDict(d), Holder(d)
        check(lambda z, d=d: net(d, z))
        check(lambda z, d=d: net(d, z),
              lambda d=d: float(jacobian_moments(net, x, params=d, method="exact").phi))
        check(functools.partial(net_kw, **d))
        check(lambda z, h={"x": (1, d)}: net(h["x"][1], z))  # noqa: B006 - nested in a nest
        check(lambda z, d=frozen: net(d, z))  # mappings that are other pytree nodes,
        check(lambda z, h=holder: net(h.d, z))  # or dicts below one
        check(Net(d, "nnx.Dict"))
        check(Net(d, "nnx.data"))

    def choose(i, use_a):  # a traced value picks the array: the same jaxpr, other constants
        a, b, sel = w(2 * i), w(2 * i + 1, 3.0), jnp.array(use_a)
        return lambda z: jnp.tanh((a if bool(sel) else b) @ z)

    for i, use_a in enumerate([True, False, False, True]):
        check(choose(i, use_a))

    (tmp_path / "gnecfg_review5.py").write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = importlib.import_module("gnecfg_review5")
    w0 = w(0)

    def imported(z):
        import gnecfg_review5  # noqa: PLC0415 - the form under test
        return jnp.tanh(gnecfg_review5.SCALE * (w0 @ z))

    def through_sys(z):
        return jnp.tanh(sys.modules["gnecfg_review5"].SCALE * (w0 @ z))

    def through_importlib(z):
        return jnp.tanh(importlib.import_module("gnecfg_review5").SCALE * (w0 @ z))

    for scale in (1.0, 3.0):
        cfg.SCALE = scale
        for f in (imported, through_sys, through_importlib):
            check(f)

    class Cfg:
        def __init__(self, s):
            self.s = s

    def with_host(c):
        host = lambda: np.float32(c.s)  # noqa: E731
        return lambda z: jnp.tanh(
            jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32)) * (w0 @ z))

    c1 = Cfg(1.0)
    f1 = with_host(c1)
    check(f1)
    c1.s = 3.0
    check(f1)
    check(with_host(Cfg(1.0)))  # described as f1 was at first, but f1's host now says 3

    @functools.partial(jax.tree_util.register_dataclass, data_fields=["w"], meta_fields=["s"])
    @dataclasses.dataclass
    class Layer:
        w: jax.Array
        s: typing.Any

    def signed(layer):
        return lambda z: jnp.where(jnp.signbit(layer.s), 2.0, 1.0) * jnp.tanh(layer.w @ z)

    check(signed(Layer(w0, np.float32(0.0))))
    check(signed(Layer(w(1), np.float32(-0.0))))
    d16, d32 = (compiled._Describer().callable(signed(Layer(w0, np.dtype(t).type(2.0))))
                for t in ("float16", "float32"))
    assert d16 != d32  # np.float16(2) == np.float32(2), but they promote differently


def test_bound_linen_modules_are_traced_and_not_kept_alive():
    """``model.bind(variables)`` passed as ``fn``: its scope holds the variables, so it is
    traced (each call its exact φ) and the caches keep none of its weights alive."""
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, z):
            return jnp.tanh(nn.Dense(8)(z))

    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 8)
    model, refs = M(), []
    for i in range(3):
        v = model.init(jax.random.key(i), x)
        bound = model.bind(v)
        np.testing.assert_allclose(_phi(bound, x), _exact_phi(lambda z, v=v: model.apply(v, z), x),
                                   rtol=1e-5)
        refs.append(weakref.ref(v["params"]["Dense_0"]["kernel"]))
        del v, bound
    gc.collect()
    assert not any(r() is not None for r in refs)


def test_static_pytrees_deep_sequentials_and_hessian_losses_are_not_traced(traces,
                                                                          monkeypatch):
    """Forms the fast path reads without tracing after its check call: a closure over a
    ``register_static`` config (its own static data), a 70-layer ``nn.Sequential`` (four
    described objects per layer), and the loss of an eager ``hessian_trace`` (whose
    scalar check reads the first trace's output shape instead of tracing again)."""
    import flax.linen as nn

    traced = traces

    @dataclasses.dataclass(frozen=True)
    class StaticCfg:
        scale: float

    jax.tree_util.register_static(StaticCfg)
    x = jnp.linspace(-1.0, 1.0, 8)
    ws = [jnp.asarray(np.random.default_rng(s).standard_normal((8, 8)) / 3, jnp.float32)
          for s in range(4)]
    for scale in (2.0, 3.0):
        traced.clear()
        for v in ws:
            f = lambda z, v=v: jnp.tanh(StaticCfg(scale).scale * (v @ z))  # noqa: E731
            g = lambda z, v=v, c=StaticCfg(scale): jnp.tanh(c.scale * (v @ z))  # noqa: E731
            np.testing.assert_allclose(_phi(g, x), _exact_phi(f, x), rtol=1e-5)
        assert len(traced) == 2, len(traced)

    model = nn.Sequential([layer for _ in range(70) for layer in (nn.Dense(8), nn.tanh)])
    traced.clear()
    for i in range(3):
        v = model.init(jax.random.key(i), x)
        f = functools.partial(model.apply, v)
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-4)
    assert len(traced) == 2, len(traced)

    def make_loss(v):
        return lambda p: jnp.sum(jnp.tanh(v @ p) ** 2)

    p0 = jnp.linspace(-1.0, 1.0, 8)
    shapes = []
    eval_shape = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: shapes.append(1) or eval_shape(*a, **k))
    for i, v in enumerate(ws):
        if i == 2:  # after the first call and the check call
            traced.clear()
            shapes.clear()
        est = hessian_trace(make_loss(v), p0, key=jax.random.key(0), num_probes=4)
        assert i < 2 or not (traced or shapes), (len(traced), len(shapes))
        exact = float(jnp.trace(jax.hessian(make_loss(v))(p0)))
        assert abs(float(est.value) - exact) <= 5 * float(est.sem) + 1e-4


def test_sixth_review_sequences_are_read_now():
    """From a sixth adversarial review: each probe equals the exact φ of what its function
    computes now, at the third call (the first two: a trace and the check trace). A Flax
    interceptor active at the call, a PRNG flag, a defaultdict's default factory, a
    FrozenDict in a pytree's static data, subclasses of ndarray/deque (contents in C) or
    of list with their own __iter__, and dict keys that compare equal but differ."""
    import collections
    import math

    import flax.linen as nn
    from flax import struct
    from flax.core import FrozenDict

    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 8)

    def w(seed, scale=1.0):
        return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((8, 8)) / 3,
                           jnp.float32)

    def check(f):
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)

    def third_call_differs(make, same, other):
        for seed, arg in ((0, same), (1, same), (2, other)):
            check(make(seed, arg))

    class M(nn.Module):
        @nn.compact
        def __call__(self, z):
            return jnp.tanh(nn.Dense(8)(z))

    m = M()
    vs = [m.init(jax.random.key(i), x) for i in range(3)]

    def triple_dense(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return 3.0 * out if isinstance(context.module, nn.Dense) else out

    check(functools.partial(m.apply, vs[0]))
    check(functools.partial(m.apply, vs[1]))
    with nn.intercept_methods(triple_dense):
        got = _phi(functools.partial(m.apply, vs[2]), x)
        np.testing.assert_allclose(got, _exact_phi(functools.partial(m.apply, vs[2]), x),
                                   rtol=1e-5)

    def masked(seed, _):
        v, k = w(seed), jax.random.key(0)
        return lambda z: jnp.tanh(v @ z) * jax.random.uniform(k, (8,))

    check(masked(0, None))
    check(masked(1, None))
    jax.config.update("jax_threefry_partitionable", not jax.config.jax_threefry_partitionable)
    try:
        check(masked(2, None))
    finally:
        jax.config.update("jax_threefry_partitionable",
                          not jax.config.jax_threefry_partitionable)

    def with_factory(seed, scale):
        d = collections.defaultdict(lambda s=scale: s)  # the factory holds the scale
        d["w"] = w(seed)
        return lambda z: d.default_factory() * jnp.tanh(d["w"] @ z)

    third_call_differs(with_factory, 1.0, 3.0)

    @struct.dataclass
    class Layer:
        w: jax.Array
        cfg: FrozenDict = struct.field(pytree_node=False)

    def static_frozen(seed, s):
        layer = Layer(w(seed), FrozenDict(s=s))
        return lambda z: jnp.tanh(layer.w @ z + 0.3 * math.atan2(layer.cfg["s"], -1.0))

    third_call_differs(static_frozen, 0.0, -0.0)

    class Vec(np.ndarray):
        pass

    class Hist(collections.deque):
        pass

    class Hidden(list):  # its own __iter__ skips the last item, which the body reads
        def __iter__(self):
            return iter(list.__getitem__(self, slice(0, len(self) - 1)))

    def ndarray_sub(seed, s):
        v, a = w(seed), np.array([s], np.float32).view(Vec)
        return lambda z: float(a[0]) * jnp.tanh(v @ z)

    def deque_sub(seed, s):
        v, h = w(seed), Hist([s])
        return lambda z: h[0] * jnp.tanh(v @ z)

    def list_sub(seed, s):
        h = Hidden([w(seed), s])
        return lambda z: h[-1] * jnp.tanh(h[0] @ z)

    def float_key(seed, k):
        d = {k: w(seed)}
        return lambda z: sum(jnp.tanh(v @ z + 0.3 * math.atan2(kk, -1.0))
                             for kk, v in d.items())

    for make, same, other in ((ndarray_sub, 1.0, 3.0), (deque_sub, 1.0, 3.0),
                              (list_sub, 1.0, 3.0), (float_key, 0.0, -0.0)):
        third_call_differs(make, same, other)


def test_a_jitted_apply_with_its_variables_is_read_without_tracing(traces):
    """``functools.partial(jax.jit(model.apply), variables)`` (the form the docs suggest for
    a jitted model) is read through the function it wraps: traced twice, then only read."""
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, z):
            return jnp.tanh(nn.Dense(8)(jnp.tanh(nn.Dense(8)(z))))

    traced = traces
    x = jnp.linspace(-1.0, 1.0, 8)
    m = M()
    jitted = jax.jit(m.apply)
    for i in range(4):
        f = functools.partial(jitted, m.init(jax.random.key(i), x))
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)
    assert len(traced) == 2, len(traced)


def test_rules_and_callbacks_holding_arrays_or_objects_are_private():
    """From a seventh review: a custom JVP rule given as ``partial(rule, array)``, a host
    callback ``partial(np.multiply, array)`` over 2000 elements (the printed jaxpr
    abbreviates it), a JAX array in such a partial (was a TypeError), and a Linen module's
    rule that reads ``self`` (its variables were kept alive by the program cache): each
    probe is its own function's exact φ and no weight outlives its call."""
    import flax.linen as nn

    compiled.clear_programs()
    x = jnp.ones((4,))

    def my_jvp(scale, primals, tangents):
        (z,), (dz,) = primals, tangents
        return z, scale * dz

    for make_scale in (lambda s: np.full((4,), s, np.float32), lambda s: jnp.full((4,), s)):
        for s in (1.0, 2.0, 3.0):
            f = jax.custom_jvp(lambda z: z)
            f.defjvp(functools.partial(my_jvp, make_scale(s)))
            np.testing.assert_allclose(_phi(lambda z, f=f: f(z), x), s**2, rtol=1e-6)

    n = 2000
    xn = jnp.ones((n,))
    for mid in (1.0, 1000.0):
        wn = np.ones((n,), np.float32)
        wn[n // 2] = mid
        cb = functools.partial(np.multiply, wn)
        fn = lambda z, cb=cb: z * jax.pure_callback(  # noqa: E731
            cb, jax.ShapeDtypeStruct((n,), jnp.float32), jnp.ones(n, jnp.float32))
        np.testing.assert_allclose(_phi(fn, xn), (n - 1 + mid**2) / n, rtol=1e-5)

    class Block(nn.Module):
        scale: float = 1.0

        @nn.compact
        def __call__(self, z):
            @jax.custom_jvp
            def act(h):
                return jnp.tanh(h)

            @act.defjvp
            def act_jvp(p, t):
                (h,), (dh,) = p, t
                return jnp.tanh(h), self.scale * dh * (1 - jnp.tanh(h) ** 2)

            return act(nn.Dense(4)(z))

    m, refs = Block(), []
    for i in range(3):
        v = m.init(jax.random.key(i), x)
        f = functools.partial(m.apply, v)
        np.testing.assert_allclose(_phi(f, x), _exact_phi(f, x), rtol=1e-5)
        refs.append(weakref.ref(v["params"]["Dense_0"]["kernel"]))
        del v, f
    gc.collect()
    assert not any(r() is not None for r in refs)


def test_a_custom_jvp_static_argument_is_part_of_the_structure():
    """From an eighth review: a ``custom_jvp`` whose ``nondiff_argnums`` value changes only
    its rule traces to the same jaxpr text; the value (bound by JAX inside its wrappers) is
    part of the structure, so each probe is its own φ, and a new weight state at the same
    value compiles nothing."""
    compiled.clear_programs()
    x = jnp.linspace(-1.0, 1.0, 8)
    ws = [jnp.asarray(np.random.default_rng(s).standard_normal((8, 8)) / 3, jnp.float32)
          for s in range(3)]

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def f(c, z):
        return jnp.tanh(z)

    @f.defjvp
    def f_jvp(c, primals, tangents):
        (z,), (dz,) = primals, tangents
        return jnp.tanh(z), c * dz * (1 - jnp.tanh(z) ** 2)

    for c in (1.0, 3.0, 2.0):
        fn = lambda z, c=c: f(c, ws[0] @ z)  # noqa: E731
        np.testing.assert_allclose(_phi(fn, x), _exact_phi(fn, x), rtol=1e-5)
    _phi(lambda z: f(3.0, ws[1] @ z), x)
    with count_compilations() as events:
        np.testing.assert_allclose(_phi(lambda z: f(3.0, ws[2] @ z), x),
                                   _exact_phi(lambda z: f(3.0, ws[2] @ z), x), rtol=1e-5)
    assert not events, f"{len(events)} compilations at new weights"
