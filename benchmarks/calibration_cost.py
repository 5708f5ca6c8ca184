"""Cost of ``gne_jax.calibrate`` against LSUV on the calibration experiment's plain networks.

For each network (tanh MLP, ReLU MLP, serial CNN with ReLU and leaky ReLU 0.18, all
without normalization or shortcuts, default Kaiming init) this times

* ``calibrate`` (default options: tol 0.05, 32 probes, verification on): the first call
  (compile + run) and a second call on a fresh weight state of the same structure (run
  only: the program is cached), and counts its VJP+JVP pairs (``report.matvecs``);
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
    cnn = dict(depth=26 if small else 98, widths=(8, 16, 16) if small else (16, 32, 64))
    batch = 16 if small else 64
    hw = 8 if small else 32
    return [
        ("tanh MLP", {"name": "mlp", "activation": "tanh", **mlp}, (batch, 64)),
        ("ReLU MLP", {"name": "mlp", "activation": "relu", **mlp}, (batch, 64)),
        ("ReLU CNN", {"name": "serial_cnn", "activation": "relu", **cnn}, (batch, hw, hw, 3)),
        ("leaky ReLU CNN", {"name": "serial_cnn", "activation": "leaky_relu",
                            "negative_slope": 0.18, **cnn}, (batch, hw, hw, 3)),
    ]


def timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("small", "paper"), default="small")
    args = ap.parse_args()
    print(f"# jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or '?'}, "
          f"{os.cpu_count()} CPUs, size {args.size}")
    print("| network | blocks | calibrate first call (s) | calibrate run (s) | VJP+JVP pairs "
          "| pairs / block | max iterations | LSUV first call (s) | LSUV run (s) "
          "| LSUV block forwards | run time calibrate / LSUV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, cfg, shape in networks(args.size):
        model = gne_jax.create_model(cfg)
        x = jax.random.normal(jax.random.key(0), shape)
        v1 = model.init(jax.random.key(1), x)
        v2 = model.init(jax.random.key(2), x)
        (_, r), t_first = timed(lambda: calibrate(model, v1, x, key=jax.random.key(3)))
        (_, r), t_run = timed(lambda: calibrate(model, v2, x, key=jax.random.key(4)))
        (_, lr), l_first = timed(lambda: lsuv(model, v1, x, key=jax.random.key(3), tol=0.05))
        (_, lr), l_run = timed(lambda: lsuv(model, v2, x, key=jax.random.key(4), tol=0.05))
        n = len(r.names)
        print(f"| {label} (depth {cfg['depth']}) | {n} | {t_first:.1f} | {t_run:.2f} | "
              f"{r.total_matvecs} | {r.total_matvecs / n:.0f} | {int(r.iterations.max())} | "
              f"{l_first:.1f} | {l_run:.3f} | {int(np.sum(lr.forwards))} | "
              f"{t_run / l_run:.0f} |", flush=True)


if __name__ == "__main__":
    main()
