"""Cost of curvature measurements against the HVPs they use, measured in one run.

On one ReLU MLP (default 784-256-256-10, ~270k parameters, batch 128 of random
data, squared loss) prints:
  1. Hessian trace (``hessian_trace``, Hutchinson, N probes, vmapped) against N raw
     HVPs (``jax.jvp(jax.grad(L))``, vmapped over pre-drawn probes, jitted), and the
     time to draw the N probes alone.
  2. top-5 eigenvalues (``hessian_eigenpairs``, S Lanczos steps, full
     reorthogonalization) against S raw HVPs applied one after another in a
     ``lax.fori_loop`` (Lanczos is sequential), and against matfree's
     ``decomp.tridiag_sym(S, reortho="full")`` + ``eigh`` on the same flat HVP.
  3. lowering + compile time of our Lanczos and matfree's for 20 vs 200 steps.

    python benchmarks/curvature_cost.py [--widths 784 256 256 10] [--batch 128]
        [--probes 100] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from matfree import decomp
from timing import median_time

from gne_jax.curvature import hessian_eigenpairs, hessian_matvec, hessian_trace
from gne_jax.linalg.lanczos import lanczos_tridiag, ritz


def compile_time(f, *args):
    t = time.perf_counter()
    jax.jit(f).lower(*args).compile()
    return time.perf_counter() - t


def init_mlp(key, widths):
    params = []
    for k, din, dout in zip(jax.random.split(key, len(widths) - 1), widths[:-1], widths[1:],
                            strict=True):
        params.append({"kernel": jax.random.normal(k, (din, dout)) * np.sqrt(2.0 / din),
                       "bias": jnp.zeros(dout)})
    return params


def mlp(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--widths", type=int, nargs="+", default=[784, 256, 256, 10])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    N, S = args.probes, args.steps

    key = jax.random.key(0)
    kp, kx, ky, kv, kt, ke = jax.random.split(key, 6)
    params = init_mlp(kp, args.widths)
    x = jax.random.normal(kx, (args.batch, args.widths[0]))
    y = jax.random.normal(ky, (args.batch, args.widths[-1]))
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((mlp(p, x) - y) ** 2, axis=-1))
    flat, unravel = ravel_pytree(params)
    n = flat.size
    print(f"# device: {jax.devices()[0].device_kind}, CPU: {cpu_name()}, "
          f"{jax.device_count()} device(s), jax {jax.__version__}")
    print(f"# model: ReLU MLP {args.widths}, {n} parameters, batch {args.batch}; "
          f"trace probes N={N}, Lanczos steps S={S}")

    # Raw HVP, written directly: forward-over-reverse on the loss.
    def raw_hvp(p, v):
        return jax.jvp(jax.grad(loss), (p,), (v,))[1]

    probes = jax.vmap(lambda k: unravel(jax.random.rademacher(k, (n,), jnp.float32)))(
        jax.random.split(kv, N))
    raw_n = jax.jit(lambda p, V: jax.vmap(lambda v: raw_hvp(p, v))(V))
    t_raw_n = median_time(raw_n, params, probes, repeats=args.repeats)

    trace_fn = jax.jit(lambda p, k: hessian_trace(loss, p, key=k, num_probes=N).value)
    t_trace = median_time(trace_fn, params, kt, repeats=args.repeats)
    # The part of the trace cost that is not HVPs: drawing N Rademacher probes.
    draw = jax.jit(lambda k: jax.vmap(lambda k_: jax.random.rademacher(k_, (n,), jnp.float32))(
        jax.random.split(k, N)))
    t_draw = median_time(draw, kt, repeats=args.repeats)

    def raw_seq(p, v0):  # S dependent HVPs: the sequential floor of Lanczos
        def body(_, v):
            w = raw_hvp(p, v)
            return jax.tree.map(lambda a: a / jnp.sqrt(jnp.sum(a * a) + 1.0), w)
        return jax.lax.fori_loop(0, S, body, v0)

    v0 = jax.tree.map(lambda a: a[0], probes)
    t_raw_s = median_time(jax.jit(raw_seq), params, v0, repeats=args.repeats)
    eig_fn = jax.jit(lambda p, k: hessian_eigenpairs(loss, p, key=k, num_eigs=5,
                                                     num_steps=S).values)
    t_eig = median_time(eig_fn, params, ke, repeats=args.repeats)

    def ours(p, v):
        hvp = hessian_matvec(loss, p)
        res = lanczos_tridiag(S)(lambda u: ravel_pytree(hvp(unravel(u)))[0], v)
        return ritz(res).values[-5:]

    def theirs(p, v):
        hvp = hessian_matvec(loss, p)
        res = decomp.tridiag_sym(S, reortho="full")(lambda u: ravel_pytree(hvp(unravel(u)))[0],
                                                     v)
        return jnp.linalg.eigvalsh(res.J_small)[-5:]

    vflat = ravel_pytree(v0)[0]
    t_ours = median_time(jax.jit(ours), params, vflat, repeats=args.repeats)
    t_theirs = median_time(jax.jit(theirs), params, vflat, repeats=args.repeats)
    top_ours = np.asarray(jax.jit(ours)(params, vflat))
    top_theirs = np.asarray(jax.jit(theirs)(params, vflat))

    print(f"{'measurement':<44} {'time_s':>9} {'raw_s':>9} {'ratio':>7}")
    print(f"{'hessian_trace, N HVPs vmapped':<44} {t_trace:9.4f} {t_raw_n:9.4f} "
          f"{t_trace / t_raw_n:7.2f}")
    print(f"{'  of which drawing N Rademacher probes':<44} {t_draw:9.4f} {t_raw_n:9.4f} "
          f"{t_draw / t_raw_n:7.2f}")
    print(f"{'top-5 eigenvalues, S Lanczos steps':<44} {t_eig:9.4f} {t_raw_s:9.4f} "
          f"{t_eig / t_raw_s:7.2f}")
    print(f"{'our Lanczos vs matfree tridiag_sym (S steps)':<44} {t_ours:9.4f} {t_theirs:9.4f} "
          f"{t_ours / t_theirs:7.2f}")
    print(f"# top-5 ours {np.round(top_ours, 5)} vs matfree {np.round(top_theirs, 5)}; "
          f"max rel diff {np.max(np.abs(top_ours - top_theirs) / np.abs(top_theirs)):.2e}")

    # Compile time vs number of steps (same HVP, flat start vector).
    print(f"{'compile (lower+compile) s':<28} {'20 steps':>9} {'200 steps':>10} {'ratio':>7}")
    for name, make in [
        ("ours (gne_jax.linalg.lanczos)", lambda k: lambda p, v: lanczos_tridiag(k)(
            lambda u: ravel_pytree(hessian_matvec(loss, p)(unravel(u)))[0], v).diag),
        ("matfree tridiag_sym", lambda k: lambda p, v: decomp.tridiag_sym(k, reortho="full")(
            lambda u: ravel_pytree(hessian_matvec(loss, p)(unravel(u)))[0], v).J_small),
    ]:
        c20 = compile_time(make(20), params, vflat)
        c200 = compile_time(make(200), params, vflat)
        print(f"{name:<28} {c20:9.2f} {c200:10.2f} {c200 / c20:7.2f}")


if __name__ == "__main__":
    main()
