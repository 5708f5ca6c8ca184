"""Cost of forming Haar-orthogonal kernels for an ensemble, two QR routes in one run.

Times an ensemble's orthogonal initialization, ``inits × layers`` Gaussian matrices of
``width × width`` factored at once (vmapped), through ``jnp.linalg.qr`` (``geqrf`` +
``orgqr``; jaxlib's GPU ``orgqr`` is one solver call per matrix) and through
``gne_jax.linalg.qr.householder_qr`` (``geqrf`` + two matrix products and one triangular
solve), and prints their ratio. ``gne_jax.linalg.qr.qr`` uses the second on GPUs only.

    python benchmarks/qr_cost.py [--inits 64 --layers 33 --widths 64 256 1024]
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
from timing import median_time

from gne_jax.linalg.qr import householder_qr


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--inits", type=int, default=64)
    p.add_argument("--layers", type=int, default=33)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(f"# device: {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"jax {jax.__version__}")
    print(f"# {a.inits} inits x {a.layers} layers of width x width, vmapped; median of "
          f"{a.repeats} after a warm-up (compile excluded)")
    routes = {"jnp.linalg.qr": lambda m: jnp.linalg.qr(m)[0],
              "householder_qr": lambda m: householder_qr(m)[0]}
    for w in a.widths:
        mats = jax.random.normal(jax.random.key(0), (a.inits * a.layers, w, w))
        t = {name: median_time(jax.jit(jax.vmap(f)), mats, repeats=a.repeats)
             for name, f in routes.items()}
        n = a.inits * a.layers
        print(f"width {w:>5}: jnp.linalg.qr {t['jnp.linalg.qr'] * 1e3:9.2f} ms, "
              f"householder_qr {t['householder_qr'] * 1e3:9.2f} ms ({n} matrices); "
              f"householder_qr / jnp.linalg.qr = "
              f"{t['householder_qr'] / t['jnp.linalg.qr']:.3f}")


if __name__ == "__main__":
    main()
