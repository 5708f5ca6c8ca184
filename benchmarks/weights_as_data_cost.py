"""Weights as data: what an eager call at a new weight state costs, measured in one run.

Prints, for a tanh MLP (depth × width, one input vector, K Rademacher probes):

* compile time of ``jacobian_moments`` over that of the raw jitted program that draws the
  probes and computes ‖Jᵀv‖², ‖JJᵀv‖² by vmap(VJP; JVP): first call minus a warm call, and
  the XLA backend compile durations (JAX monitoring events) of each program;
* a call at a new weight state over the raw jitted probe called with the new parameters
  as arguments (medians of 3 rounds over N states, the two timed alternately), for each
  form the weights come in (``--forms``): a new closure ``lambda x: apply(new_params, x)``,
  ``functools.partial(model.apply, variables)`` of a Flax Linen MLP, an NNX MLP module
  passed as the function (the same weights, transposed into the layers' kernels);
* how many programs N such calls compiled (JAX monitoring events);
* eager ``hessian_eigenpairs`` top-1 against a PyHessian-style power iteration in plain
  JAX (a jitted HVP called from a Python loop until the Rayleigh quotient changes by less
  than 1e-3 relative), first call (with compilation) and a second call at new weights.

    python benchmarks/weights_as_data_cost.py [--depth 16 --width 1024 --probes 64]
        [--forms closure,linen-partial,nnx]
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
from timing import elapsed

from gne_jax import hessian_eigenpairs, jacobian_moments
from gne_jax.probes import compiled
from gne_jax.probes.stochtrace import rademacher

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def apply(params, x):
    for w in params:
        x = jnp.tanh(w @ x)
    return x


def init(seed, depth, width):
    keys = jax.random.split(jax.random.key(seed), depth)
    return [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys]


def closure_form(depth, width):
    """``(make, apply, args)``: ``make(params)`` is what the user passes (a new closure);
    the raw program runs ``apply(args(params), x)``, the same computation."""
    return (lambda p: (lambda z: apply(p, z))), apply, (lambda p: p)


def linen_form(depth, width):
    """``partial(model.apply, variables)`` of a Linen MLP computing ``apply`` (the weights
    transposed into the Dense kernels); the raw program runs ``model.apply``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(depth):
                x = jnp.tanh(nn.Dense(width, use_bias=False)(x))
            return x

    model = MLP()

    def variables(params):
        return {"params": {f"Dense_{i}": {"kernel": w.T} for i, w in enumerate(params)}}

    return (lambda p: functools.partial(model.apply, variables(p))), model.apply, variables


def nnx_form(depth, width):
    """An NNX MLP module computing ``apply``, passed as the function; the raw program runs
    ``nnx.merge(graphdef, state)(x)`` with the state as its argument."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(width, width, use_bias=False, rngs=rngs)
                                    for _ in range(depth)])

        def __call__(self, x):
            for layer in self.layers:
                x = jnp.tanh(layer(x))
            return x

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    treedef = jax.tree.structure(state)

    def state_of(params):
        return jax.tree.unflatten(treedef, [w.T for w in params])

    return (lambda p: nnx.merge(graphdef, state_of(p)),
            lambda st, x: nnx.merge(graphdef, st)(x), state_of)


FORMS = {"closure": closure_form, "linen-partial": linen_form, "nnx": nnx_form}


def raw_probe(num_probes, apply_fn=apply):
    """The autodiff floor: Σ‖Jᵀv‖², Σ‖JJᵀv‖² over hashed Rademacher probes, jitted."""

    @jax.jit
    def run(params, x, key):
        out, jvp = jax.linearize(lambda z: apply_fn(params, z), x)
        vjp = jax.linear_transpose(jvp, x)

        def one(k):
            u = vjp(rademacher(k, out.shape, out.dtype))[0]
            return jnp.sum(u**2), jnp.sum(jvp(u) ** 2)

        a, b = jax.vmap(one)(jax.random.split(key, num_probes))
        return jnp.mean(a) / out.size, jnp.mean(b) / out.size

    return run


def first_minus_warm(fn):
    """(compile-ish time, warm time): the first call minus a second identical call."""
    first = elapsed(fn)
    warm = min(elapsed(fn) for _ in range(3))
    return first - warm, warm


def power_iteration(loss, params, key, tol=1e-3, max_iter=100):
    """PyHessian's top eigenvalue: v ← Hv/‖Hv‖ until |Δλ| < tol·|λ|; jitted HVP, Python loop."""
    hvp = _HVP.setdefault(loss, jax.jit(
        lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1]))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape)
                                  for k, a in zip(keys, leaves, strict=True)])
    lam = None
    for _ in range(max_iter):
        norm = jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(v)))
        v = jax.tree.map(lambda a: a / norm, v)
        hv = hvp(params, v)
        new = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v),
                                                        jax.tree.leaves(hv), strict=True)))
        if lam is not None and abs(new - lam) < tol * (abs(lam) + 1e-6):
            return new
        lam, v = new, hv
    return lam


_HVP: dict = {}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--states", type=int, default=10)
    p.add_argument("--forms", default="closure,linen-partial,nnx",
                   help=f"comma-separated, of {sorted(FORMS)}")
    a = p.parse_args()
    forms = a.forms.split(",")
    unknown = sorted(set(forms) - set(FORMS))
    if unknown:
        p.error(f"--forms: unknown {unknown}; choose from {sorted(FORMS)}")
    x = jax.random.normal(jax.random.key(0), (a.width,))
    key = jax.random.key(1)
    states = [init(s, a.depth, a.width) for s in range(a.states + 2)]
    raw = raw_probe(a.probes)
    compiled.clear_programs()

    def ours(params):
        return jacobian_moments(lambda z: apply(params, z), x, key=key,
                                num_probes=a.probes).phi

    events = []
    listener = lambda name, d, **kw: events.append(d) if name == COMPILE_EVENT else None  # noqa
    jax.monitoring.register_event_duration_secs_listener(listener)
    c_raw, w_raw = first_minus_warm(lambda: raw(states[0], x, key))
    xla_raw = list(events)
    events.clear()
    c_ours, w_ours = first_minus_warm(lambda: ours(states[0]))
    xla_ours = list(events)
    events.clear()
    # each form: its weight states built first (not timed), a first call and its check
    # untimed, then (form, raw) interleaved at each new state, three rounds: load drift hits
    # both alike
    per_form = {}
    for form in forms:
        make, apply_fn, to_args = FORMS[form](a.depth, a.width)
        fns = [make(s) for s in states]
        args = [to_args(s) for s in states]
        raw_form = raw_probe(a.probes, apply_fn)

        def call(f):
            return jacobian_moments(f, x, key=key, num_probes=a.probes).phi

        call(fns[0]), call(fns[1]), raw_form(args[0], x, key)
        events.clear()
        times = {"ours": [], "raw": []}
        for _ in range(3):
            for f, arg in zip(fns[2:], args[2:], strict=True):
                times["ours"].append(elapsed(call, f))
                times["raw"].append(elapsed(raw_form, arg, x, key))
        per_form[form] = (np.median(times["ours"]), np.median(times["raw"]), len(events),
                          float(call(fns[1])), float(raw_form(args[1], x, key)[0]))
    jax.monitoring.unregister_event_duration_listener(listener)

    print(f"# device: {jax.devices()[0].device_kind} ({platform.machine()}), jax {jax.__version__}")
    print(f"# tanh MLP depth {a.depth}, width {a.width}, one input, {a.probes} probes")
    print(f"first call minus warm call (trace + compile): jacobian_moments {c_ours:.2f} s, "
          f"raw {c_raw:.2f} s, ratio {c_ours / c_raw:.2f}")
    print(f"XLA backend compiles: jacobian_moments {[round(d, 2) for d in xla_ours]} s "
          f"(the probe program, then the statistics program shared by all structures), raw "
          f"{[round(d, 2) for d in xla_raw]} s; probe program / raw "
          f"{max(xla_ours) / max(xla_raw):.2f}, all / raw {sum(xla_ours) / sum(xla_raw):.2f}")
    print(f"warm same-state calls (closure): {w_ours * 1e3:.3g} ms, raw {w_raw * 1e3:.3g} ms")
    for form, (t_ours, t_raw, n_compiled, phi, phi_raw) in per_form.items():
        print(f"call at a new weight state ({form}): {t_ours * 1e3:.3g} ms, raw jitted "
              f"{t_raw * 1e3:.3g} ms, ratio {t_ours / t_raw:.2f}; programs compiled over "
              f"{3 * a.states} calls: {n_compiled}; phi "
              f"{phi:.5f} (raw {phi_raw:.5f})")

    # eager Hessian top eigenvalue vs PyHessian-style power iteration
    kx, ky = jax.random.split(jax.random.key(2))
    xs = jax.random.normal(kx, (256, 32))
    ys = jax.random.normal(ky, (256, 10))

    def net(seed):
        ks = jax.random.split(jax.random.key(seed), 3)
        dims = [(32, 64), (64, 64), (64, 10)]
        return [jax.random.normal(k, d) / np.sqrt(d[0]) for k, d in zip(ks, dims, strict=True)]

    def loss(ws):
        h = xs
        for w in ws[:-1]:
            h = jnp.tanh(h @ w)
        return 0.5 * jnp.mean((h @ ws[-1] - ys) ** 2)

    rows = []
    for seed in (10, 11):
        ws = net(seed)
        t = time.perf_counter()
        ours_top = float(hessian_eigenpairs(loss, ws, key=key, num_eigs=1, num_steps=20).values[0])
        t_e = time.perf_counter() - t
        t = time.perf_counter()
        pi_top = power_iteration(loss, ws, key)
        t_p = time.perf_counter() - t
        rows.append((t_e, t_p, ours_top, pi_top))
    for label, (t_e, t_p, lo, lp) in zip(("first call", "new weights"), rows, strict=True):
        print(f"hessian top-1 ({label}): eager hessian_eigenpairs {t_e:.3f} s, power iteration "
              f"{t_p:.3f} s, ratio {t_e / t_p:.2f}; λ {lo:.5f} vs {lp:.5f}")


if __name__ == "__main__":
    main()
