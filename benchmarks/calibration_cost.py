"""Cost of ``gne_jax.calibrate`` against LSUV on the calibration experiment's plain networks.

For each network (tanh MLP, ReLU MLP, serial CNN with ReLU and leaky ReLU 0.18, all
without normalization or shortcuts, default Kaiming init) this times

* ``calibrate`` (default options: tol 0.05, 32 probes, verification on): the first call
  (compile + run) and calls on a second weight state of the same structure (run only:
  the program is cached), and counts its VJP+JVP pairs (``report.matvecs``);
* ``lsuv`` (Mishkin & Matas: orthonormal pre-init, Tol_var = 0.05, T_max = 10) the same
  way, counting forward passes of a block.

Usage::

    python benchmarks/calibration_cost.py                 # CPU sizes (a few minutes)
    python benchmarks/calibration_cost.py --size paper    # 200-layer MLPs, 98-layer CNN, GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

import gne_jax
from gne_jax.calibration import calibrate, lsuv


def networks(size: str):
    small = size == "small"
    mlp = dict(depth=48 if small else 200, width=128 if small else 512)
    cnn = dict(depth=20 if small else 98, widths=(8, 16, 16) if small else (16, 32, 64))
    batch = 64  # the calibration batch of experiment C1 (its sizes, small and paper)
    hw, ch = (8, 1) if small else (32, 3)
    return [
        ("tanh MLP", {"name": "mlp", "activation": "tanh", **mlp}, (batch, 64)),
        ("ReLU MLP", {"name": "mlp", "activation": "relu", **mlp}, (batch, 64)),
        ("ReLU CNN", {"name": "serial_cnn", "activation": "relu", **cnn}, (batch, hw, hw, ch)),
        ("leaky ReLU CNN", {"name": "serial_cnn", "activation": "leaky_relu",
                            "negative_slope": 0.18, **cnn}, (batch, hw, hw, ch)),
    ]


def timed(fn):
    """(result, wall seconds, process CPU seconds) of one call, waiting for the results.

    CPU time (all threads of this process) is reported beside wall time because the
    benchmark VM is shared: under load, wall time measures the neighbours too.
    """
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t, time.process_time() - c


def median_run(fn, repeats):
    runs = [timed(fn)[1:] for _ in range(repeats)]
    return tuple(float(np.median([r[i] for r in runs])) for i in range(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "paper"), default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lsuv-only", action="store_true",
                    help="time only LSUV, with and without its orthonormal pre-init")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit the BLAS/LAPACK threads (threadpoolctl), as experiment C1 does "
                         "with 1: on a 2-core CPU its QR threads fight XLA's")
    args = ap.parse_args()
    if args.blas_threads:
        import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jaxlib's LAPACK uses)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.blas_threads, user_api="blas")
    print(f"# jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or '?'}, "
          f"{os.cpu_count()} CPUs, size {args.size}; run = median of {args.repeats} calls on "
          f"a second weight state (compiled); wall / CPU seconds; BLAS threads "
          f"{args.blas_threads or 'default'}")
    print("| network | blocks | calibrate first call | calibrate run | VJP+JVP pairs "
          "| pairs / block | max iterations | LSUV first call | LSUV run "
          "| LSUV block forwards | CPU time calibrate / LSUV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    if args.lsuv_only:
        return lsuv_parts(args)
    for label, cfg, shape in networks(args.size):
        model = gne_jax.create_model(cfg)
        x = jax.random.normal(jax.random.key(0), shape)
        v1 = model.init(jax.random.key(1), x)
        v2 = model.init(jax.random.key(2), x)
        (_, r), cw, cc = timed(lambda: calibrate(model, v1, x, key=jax.random.key(3)))
        (_, lr), lw, lc = timed(lambda: lsuv(model, v1, x, key=jax.random.key(3), tol=0.05))
        rw, rc = median_run(lambda: calibrate(model, v2, x, key=jax.random.key(4)),
                            args.repeats)
        sw, sc = median_run(lambda: lsuv(model, v2, x, key=jax.random.key(4), tol=0.05),
                            args.repeats)
        n = len(r.names)
        print(f"| {label} (depth {cfg['depth']}) | {n} | {cw:.1f} / {cc:.1f} | "
              f"{rw:.2f} / {rc:.2f} | {r.total_matvecs} | {r.total_matvecs / n:.0f} | "
              f"{int(r.iterations.max())} | {lw:.1f} / {lc:.1f} | {sw:.3f} / {sc:.3f} | "
              f"{int(np.sum(lr.forwards))} | {rc / sc:.0f} |", flush=True)


def lsuv_parts(args):
    """LSUV's two steps: the orthonormal pre-init (QR per kernel) and the rescaling loop."""
    print("| network | LSUV run, with orthonormal pre-init | rescaling only "
          "(orthonormal=False) |")
    print("|---|---|---|")
    for label, cfg, shape in networks(args.size):
        model = gne_jax.create_model(cfg)
        x = jax.random.normal(jax.random.key(0), shape)
        v1 = model.init(jax.random.key(1), x)
        v2 = model.init(jax.random.key(2), x)
        res = []
        for orth in (True, False):
            timed(lambda o=orth: lsuv(model, v1, x, key=jax.random.key(3), tol=0.05,
                                      orthonormal=o))
            res.append(median_run(lambda o=orth: lsuv(model, v2, x, key=jax.random.key(4),
                                                      tol=0.05, orthonormal=o), args.repeats))
        (w1, c1), (w2, c2) = res
        print(f"| {label} (depth {cfg['depth']}) | {w1:.3f} / {c1:.3f} | {w2:.3f} / {c2:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
