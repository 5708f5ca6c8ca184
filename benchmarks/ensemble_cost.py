"""Cost of block moments over an ensemble of initializations, measured in one run.

Prints the time per initialization of ``ensemble_block_moments`` (inits vmapped) over
a Python loop of single-init calls (one jitted init + probe function, compiled once,
called per key), and inits per second for both. Compile time is excluded from both
(each is warmed up first) and reported separately.

    python benchmarks/ensemble_cost.py [--inits 64 --width 256 --depth 32 --probes 16]

The vmapped ensemble is ``init_chunk=None`` (all inits at once); the library's default
(``init_chunk="auto"``) is timed beside it.
All variants, and the vmapped init program alone (the share of drawing the weights), are
timed in turn within each round, so load drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import jax
import numpy as np
from timing import elapsed

from gne_jax.models import create_model
from gne_jax.probes.block_moments import block_moments, probe_compiler_options
from gne_jax.probes.ensemble import (
    _init_size,
    default_init_chunk,
    ensemble_block_moments,
    plan_ensemble,
)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--inits", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--init-chunks", type=int, nargs="*", default=[8],
                   help="also time the ensemble mapped in chunks of this many inits")
    a = p.parse_args()
    model = create_model({"name": "mlp", "depth": a.depth, "width": a.width,
                          "activation": "tanh", "init": "orthogonal", "num_classes": None})
    x = jax.random.normal(jax.random.key(0), (a.batch, a.width))
    key = jax.random.key(1)
    kw = dict(num_probes=a.probes)

    def ensemble(chunk=None):
        return ensemble_block_moments(model, x, key=key, num_inits=a.inits, mesh=None,
                                      init_chunk=chunk, **kw)

    # the same XLA options as the ensemble's programs (LLVM -O1 on CPU)
    @functools.partial(jax.jit, compiler_options=probe_compiler_options())
    def single(k):
        k_init, k_probe = jax.random.split(k)
        return block_moments(model, model.init(k_init, x, train=False), x, key=k_probe, **kw)

    keys = jax.random.split(key, a.inits)

    def loop():
        return [single(k) for k in keys]

    t = time.perf_counter()
    jax.block_until_ready(ensemble())
    c_ens = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(single(keys[0]))
    c_single = time.perf_counter() - t
    # the share of drawing the weights (orthogonal kernels: one QR per layer and init)
    plan = plan_ensemble(model, x, key=key, num_inits=a.inits, mesh=None, init_chunk=None,
                         **kw)
    auto = default_init_chunk(jax.default_backend(), *_init_size(model, x, key))
    variants = {"loop": loop, "vmapped": ensemble, "default": lambda: ensemble("auto"),
                "init": lambda: [plan.init(plan.x, k) for k in plan.init_keys]}
    variants.update({c: (lambda c=c: ensemble(c)) for c in a.init_chunks})
    for f in variants.values():
        jax.block_until_ready(f())
    # timed in turn within each repeat, so load drift on a shared machine hits all alike
    times = {name: [] for name in variants}
    for _ in range(a.repeats):
        for name, f in variants.items():
            times[name].append(elapsed(f))
    t = {name: float(np.median(v)) for name, v in times.items()}
    per_init = lambda name: t[name] / a.inits * 1e3
    print(f"# device: {jax.devices()[0].device_kind} ({platform.machine()}), "
          f"{jax.device_count()} device(s), jax {jax.__version__}")
    print(f"# MLP width {a.width}, depth {a.depth}, batch {a.batch}, {a.inits} inits, "
          f"{a.probes} probes per block, {a.depth + 1} blocks + end to end; medians of "
          f"{a.repeats} rounds, the variants timed in turn")
    print(f"first call (compile + run): vmapped {c_ens:.2f} s, single-init {c_single:.2f} s")
    print(f"vmapped ensemble: {per_init('vmapped'):.2f} ms/init, "
          f"{a.inits / t['vmapped']:.1f} inits/s")
    print(f"Python loop:      {per_init('loop'):.2f} ms/init, {a.inits / t['loop']:.1f} inits/s")
    print(f"time per init, vmapped / loop: {t['vmapped'] / t['loop']:.3f}")
    print(f"  of which the vmapped init program: {per_init('init'):.2f} ms/init "
          f"({t['init'] / t['vmapped']:.0%})")
    print(f"default (init_chunk='auto' = {auto}): {per_init('default'):.2f} "
          f"ms/init, / loop: {t['default'] / t['loop']:.3f}")
    for c in a.init_chunks:
        print(f"chunks of {c:>3} inits: {per_init(c):.2f} ms/init, "
              f"{a.inits / t[c]:.1f} inits/s, / loop: {t[c] / t['loop']:.3f}")


if __name__ == "__main__":
    main()
