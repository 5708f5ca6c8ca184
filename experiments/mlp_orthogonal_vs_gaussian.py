"""Deep tanh MLP at orthogonal vs Gaussian init: φ(JJᵀ) and ϕ end to end.

The GNE paper's serial theorem predicts the normalized variance ϕ/φ² of a product of
L blocks to be the sum of the blocks' own: about m/n = 1 per Gaussian layer plus the
tanh term ≈ 8q² per layer (derivations §3, §8), and only the tanh term with orthogonal
weights. So Gaussian weights spread the singular values of a deep network roughly
linearly in depth; orthogonal ones do not.

    python experiments/mlp_orthogonal_vs_gaussian.py [--width 256] [--depths 4 16 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gne_jax import jacobian_moments


def tanh_mlp(key, width, depth, init):
    if init == "orthogonal":
        keys = jax.random.split(key, depth)
        Ws = jax.vmap(lambda k: jax.nn.initializers.orthogonal()(k, (width, width)))(keys)
    else:
        Ws = jax.random.normal(key, (depth, width, width)) / np.sqrt(width)

    def fn(x):
        return jax.lax.scan(lambda h, W: (jnp.tanh(W @ h), None), x, Ws)[0]

    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--probes", type=int, default=64)
    args = p.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.width,)) * 0.1  # small q: tanh ≈ linear
    print(f"{'init':>11} {'depth':>5} {'phi':>16} {'varphi':>16} {'varphi/phi^2':>12}")
    for init in ("orthogonal", "gaussian"):
        for depth in args.depths:
            fn = tanh_mlp(jax.random.key(depth), args.width, depth, init)
            m = jacobian_moments(fn, x, key=jax.random.key(1), num_probes=args.probes)
            print(f"{init:>11} {depth:>5} {float(m.phi):>8.4f} ± {float(m.phi_sem):<6.4f}"
                  f" {float(m.varphi):>8.4f} ± {float(m.varphi_sem):<6.4f}"
                  f" {float(m.varphi / m.phi**2):>12.3f}")


if __name__ == "__main__":
    main()
