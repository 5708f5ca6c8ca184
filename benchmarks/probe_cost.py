"""Cost of the Jacobian-moment probe, measured in one run on one function.

Prints, for a tanh MLP whose output size is m:
  1. probe time / raw time: ``jacobian_moments`` (Hutchinson, K probes) against the
     K VJP + JVP calls it needs written directly with ``jax.vjp`` / ``jax.jvp`` (vmapped,
     jitted, probes pre-drawn). Target: <= 1.1.
  2. probe time / exact time for m in --sizes, with the relative error the probe reached
     against the exact moments.

    python benchmarks/probe_cost.py [--sizes 256 1024 4096] [--probes 64] [--depth 4]
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time

from gne_jax import jacobian_moments


def make_mlp(width, depth, key):
    Ws = jax.random.normal(key, (depth, width, width)) / np.sqrt(width)

    def fn(x):
        def layer(h, W):
            return jnp.tanh(W @ h), None

        return jax.lax.scan(layer, x, Ws)[0]

    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    K = args.probes
    print(f"# device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
          f", jax {jax.__version__}, probes K={K}, depth {args.depth}")
    print(f"{'m':>6} {'probe_s':>9} {'raw_s':>9} {'probe/raw':>9} {'exact_s':>9} "
          f"{'probe/exact':>11} {'relerr_phi':>10} {'relerr_varphi':>13}")
    key = jax.random.key(0)
    for m in args.sizes:
        fn = make_mlp(m, args.depth, jax.random.key(m))
        x = jax.random.normal(jax.random.key(1), (m,))

        probe = jax.jit(lambda x, k, fn=fn: jacobian_moments(fn, x, key=k, num_probes=K))
        V = jax.random.rademacher(key, (K, m), dtype=jnp.float32)

        @jax.jit
        def raw(x, V, fn=fn):  # K × (VJP then JVP), probes given
            def one(v):
                u = jax.vjp(fn, x)[1](v)[0]
                w = jax.jvp(fn, (x,), (u,))[1]
                return jnp.sum(u**2), jnp.sum(w**2)

            return jax.vmap(one)(V)

        exact = jax.jit(lambda x, fn=fn: jacobian_moments(fn, x, method="exact"))
        t_probe = median_time(probe, x, key)
        t_raw = median_time(raw, x, V)
        t_exact = median_time(exact, x, repeats=2)
        est, ex = probe(x, key), exact(x)
        rel_phi = abs(float(est.phi) - float(ex.phi)) / float(ex.phi)
        rel_var = abs(float(est.varphi) - float(ex.varphi)) / float(ex.varphi)
        print(f"{m:>6} {t_probe:>9.4f} {t_raw:>9.4f} {t_probe / t_raw:>9.3f} {t_exact:>9.3f} "
              f"{t_probe / t_exact:>11.4f} {rel_phi:>10.4f} {rel_var:>13.4f}")


if __name__ == "__main__":
    main()
