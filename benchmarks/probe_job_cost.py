"""Where the probe job's time goes, and what LLVM -O1 buys on CPU, measured in one run.

1. The quickstart sweep (``configs/probe/quickstart.py``: 12 variants of the 32-layer
   serial CNN, 4 inits each): seconds spent tracing/lowering, then waiting for the
   compiles (the distinct programs only: variants that differ only in their initializer
   share the measurement), then waiting for the measurements still running (each
   variant is measured as soon as its programs are compiled), and the number of
   programs before and after deduplication.
2. Compile and run time of one variant's measurement program (ReLU, batch norm) and of
   a run-bound MLP ensemble (width 256, depth 32, 8 inits, 16 probes), with the probe
   programs' CPU option (``xla_backend_optimization_level=1``) over XLA's default.

    python benchmarks/probe_job_cost.py [--skip-sweep]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import numpy as np
from timing import elapsed

from gne_jax.models import create_model
from gne_jax.probes.ensemble import plan_ensemble
from gne_jax.probes.sweep import run_sweep
from gne_jax.training.config import from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
O1 = {"xla_backend_optimization_level": 1}


def sweep_phases(c):
    """Times the quickstart's phases through ``run_sweep``'s progress callback."""
    x = c.input_scale * jax.random.normal(jax.random.key(0), tuple(c.input_shape))
    seconds, counts = {}, {}

    def progress(it, total, desc):  # the phases overlap: each entry is the wait after the last
        counts[desc] = total
        t = time.perf_counter()
        yield from it
        seconds[desc] = time.perf_counter() - t

    points = run_sweep(c.model.to_dict(), c.sweep.to_dict(), x, key=jax.random.key(1),
                       num_inits=c.num_inits, progress=progress, train=c.train,
                       init_chunk=c.init_chunk, num_probes=c.num_probes, method=c.method)
    print(f"quickstart sweep: {len(points)} variants, {2 * len(points)} programs, "
          f"{counts['compiling']} distinct compiled")
    traced_and_compiled = seconds["tracing"] + seconds["compiling"]
    print(f"  tracing {seconds['tracing']:.1f} s (compiles and measurements of earlier "
          f"variants run alongside), tracing + compiling {traced_and_compiled:.1f} s, "
          f"then measurements still running {seconds['measuring']:.1f} s")


def compile_both(fn, args):
    """Compile seconds and executables with XLA's default options and with -O1."""
    out = []
    for options in (None, O1):
        lowered = jax.jit(fn, compiler_options=options).lower(*args)
        t = time.perf_counter()
        exe = lowered.compile()
        out.append((time.perf_counter() - t, exe))
    return out


def run_both(executables, args, repeats=7):
    """Median run seconds of each executable, timed alternately (drift hits both alike)."""
    for exe in executables:
        jax.block_until_ready(exe(*args))
    times = [[], []]
    for _ in range(repeats):
        for i, exe in enumerate(executables):
            times[i].append(elapsed(exe, *args))
    return [float(np.median(t)) for t in times]


def option_effect():
    key = jax.random.key(1)
    cnn = create_model({"name": "serial_cnn", "depth": 32, "activation": "relu",
                        "normalization": "batchnorm"})
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    p = plan_ensemble(cnn, x, key=key, num_inits=1, train=True, num_probes=8, mesh=None)
    # variables from a program of its own, so neither timed compile hits the jit cache
    v = jax.jit(lambda x, k: p.init.__wrapped__(x, k))(x, p.init_keys[0])
    cases = {
        "CNN-32 measurement (1 init)": (p.measure.__wrapped__, (v, x, p.probe_keys[0])),
        "CNN-32 init (1 init)": (p.init.__wrapped__, (x, p.init_keys[0])),
    }
    mlp = create_model({"name": "mlp", "depth": 32, "width": 256, "activation": "tanh",
                        "init": "orthogonal", "num_classes": None})
    xm = jax.random.normal(jax.random.key(0), (4, 256))
    q = plan_ensemble(mlp, xm, key=key, num_inits=8, num_probes=16, mesh=None, train=False)
    vm = jax.jit(lambda x, k: q.init.__wrapped__(x, k))(xm, q.init_keys[0])
    cases["MLP-32 w256 measurement (8 inits)"] = (q.measure.__wrapped__,
                                                  (vm, xm, q.probe_keys[0]))
    print(f"{'program':<36} {'compile default':>15} {'compile -O1':>11} {'ratio':>6} "
          f"{'run default':>11} {'run -O1':>8} {'ratio':>6}")
    for name, (fn, args) in cases.items():
        (c0, e0), (c1, e1) = compile_both(fn, args)
        r0, r1 = run_both((e0, e1), args)
        print(f"{name:<36} {c0:>13.2f} s {c1:>9.2f} s {c1 / c0:>6.2f} "
              f"{r0 * 1e3:>8.1f} ms {r1 * 1e3:>5.1f} ms {r1 / r0:>6.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip-sweep", action="store_true")
    a = p.parse_args()
    print(f"# device: {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"{jax.device_count()} device(s), jax {jax.__version__}")
    if not a.skip_sweep:
        t = time.perf_counter()
        sweep_phases(from_file(str(ROOT / "configs/probe/quickstart.py")))
        print(f"  (wall incl. planning {time.perf_counter() - t:.1f} s)")
    option_effect()


if __name__ == "__main__":
    main()
