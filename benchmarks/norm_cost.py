"""Forward+backward cost of second moment normalization (SMN) vs Flax BatchNorm.

The GNE paper claims SMN is "theoretically 30% faster than batch normalization"
(derivations §12.3): SMN needs one reduction (Σx²) on the forward pass and two (Σg,
Σg·x) on the backward pass. This script times, on ResNet-50 feature-map shapes,
one jitted training-mode step of each layer: forward, running-statistics update
and the full VJP (gradients for the input, γ and β), with a fixed random
cotangent. Both layers are timed alternately in the same run (so machine load
drifts affect both), after a warm-up, and the median of ``--repeats`` is reported
together with the ratio SMN / BN.

Usage::

    python benchmarks/norm_cost.py                 # batch 128 (GPU-sized)
    python benchmarks/norm_cost.py --batch 16      # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
from timing import elapsed

from gne_jax.nn.normalization import SecondMomentNorm

RESNET50_SHAPES = ((56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048))


def make_step(layer: nn.Module, x: jax.Array):
    """Jitted train step ``(variables, x, g) -> (dparams, dx, new_batch_stats)``."""
    variables = layer.init(jax.random.key(0), x[:2], use_running_average=False)

    def step(variables, x, g):
        def fwd(params, x):
            y, upd = layer.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=False,
                mutable=["batch_stats"],
            )
            return y, upd["batch_stats"]

        _, vjp, stats = jax.vjp(fwd, variables["params"], x, has_aux=True)
        dparams, dx = vjp(g)
        return dparams, dx, stats

    return jax.jit(step), variables


def bench_shape(shape, layers: dict, repeats: int, warmup: int, dtype) -> dict[str, float]:
    kx, kg = jax.random.split(jax.random.key(1))
    x = (jax.random.normal(kx, shape, dtype) + 0.1).astype(dtype)
    g = jax.random.normal(kg, shape, dtype)
    steps = {name: make_step(layer, x) for name, layer in layers.items()}
    for _ in range(warmup):
        for fn, v in steps.values():
            jax.block_until_ready(fn(v, x, g))
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):  # interleaved so that load drifts hit every layer alike
        for name, (fn, v) in steps.items():
            times[name].append(elapsed(fn, v, x, g))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="batch size (paper: 128)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.batch <= 0 or args.repeats <= 0:
        parser.error("--batch and --repeats must be positive")
    dtype = jnp.dtype(args.dtype)

    layers = {
        "bn": nn.BatchNorm(momentum=0.9, epsilon=1e-5),  # Flax default: one-pass variance
        "bn_two_pass": nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False),
        "smn": SecondMomentNorm(momentum=0.9, epsilon=1e-5),
    }
    dev = jax.devices()[0]
    print(
        f"# norm_cost: device={dev.platform}:{dev.device_kind} cpu={_cpu_name()!r} "
        f"cores={os.cpu_count()} jax={jax.__version__} batch={args.batch} dtype={args.dtype} "
        f"repeats={args.repeats} (median) warmup={args.warmup}"
    )
    print(
        f"{'shape (N,H,W,C)':>22} {'BN ms':>9} {'BN2 ms':>9} {'SMN ms':>9} "
        f"{'SMN/BN':>7} {'SMN/BN2':>8}"
    )
    ratios = []
    for hwc in RESNET50_SHAPES:
        shape = (args.batch, *hwc)
        t = bench_shape(shape, layers, args.repeats, args.warmup, dtype)
        r, r2 = t["smn"] / t["bn"], t["smn"] / t["bn_two_pass"]
        ratios.append(r)
        print(
            f"{str(shape):>22} {1e3 * t['bn']:9.2f} {1e3 * t['bn_two_pass']:9.2f} "
            f"{1e3 * t['smn']:9.2f} {r:7.3f} {r2:8.3f}",
            flush=True,
        )
    geo = statistics.geometric_mean(ratios)
    print(f"# geometric-mean SMN/BN time ratio: {geo:.3f} (paper claim: about 0.7)")


if __name__ == "__main__":
    main()
