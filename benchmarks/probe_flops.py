"""FLOP rate of the Jacobian-moment probe over a plain matrix product's, measured in one run.

For a tanh MLP applied to a batch (B × W input, depth D, weights W×W), times the jitted
``jacobian_moments`` (K Rademacher probes: vmap of VJP then JVP) and counts the matrix-product
FLOPs the probe cannot avoid: the forward pass once, and per probe one transposed product
(VJP) and one product (JVP) per layer, (2K + 1)·D·2·B·W² in all (XLA's own cost analysis
counts a ``lax.scan`` body once, so it is not used). The achieved rate (FLOP/s) is set
beside that of one jitted ``N × N @ N × N`` float32 product at the same default matmul
precision (2N³ FLOPs). A ratio near 1 means the probe runs at the speed of
the machine's matrix units; it is bounded below 1 by the elementwise work (tanh and its
derivative) and the reductions around the products.

    python benchmarks/probe_flops.py                      # CPU sizes
    python benchmarks/probe_flops.py --width 4096 --batch 256 --matmul 8192   # a GPU
"""

from __future__ import annotations

import argparse
import platform

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time

from gne_jax import jacobian_moments


def batched_mlp(width: int, depth: int, key):
    Ws = jax.random.normal(key, (depth, width, width)) / np.sqrt(width)

    def fn(x):  # x: (batch, width)
        return jax.lax.scan(lambda h, W: (jnp.tanh(h @ W), None), x, Ws)[0]

    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--probes", type=int, default=32)
    p.add_argument("--matmul", type=int, default=1024, help="N of the reference N×N product")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"# device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
          f", jax {jax.__version__}, matmul precision "
          f"{jax.config.jax_default_matmul_precision or 'default'}")

    N = args.matmul
    a = jax.random.normal(jax.random.key(1), (N, N))
    b = jax.random.normal(jax.random.key(2), (N, N))
    mm = jax.jit(jnp.matmul)
    t_mm = median_time(mm, a, b, repeats=args.repeats)
    rate_mm = 2.0 * N**3 / t_mm

    fn = batched_mlp(args.width, args.depth, jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (args.batch, args.width))
    key = jax.random.key(4)

    def probe(x, key):
        return jacobian_moments(fn, x, key=key, num_probes=args.probes)

    flops = (2 * args.probes + 1) * args.depth * 2.0 * args.batch * args.width**2
    t_probe = median_time(jax.jit(probe), x, key, repeats=args.repeats)
    rate_probe = flops / t_probe
    print(f"matmul {N}x{N}x{N}: {t_mm * 1e3:.3f} ms, {rate_mm / 1e12:.2f} TFLOP/s")
    print(f"probe  B={args.batch} W={args.width} D={args.depth} K={args.probes}: "
          f"{t_probe * 1e3:.3f} ms, {flops / 1e9:.2f} GFLOP of products, "
          f"{rate_probe / 1e12:.2f} TFLOP/s")
    print(f"probe FLOP rate / matmul FLOP rate: {rate_probe / rate_mm:.3f}")


if __name__ == "__main__":
    main()
