"""Training-step time: scanned vs unrolled stages, the non-finite check, SMN vs BN.

Times the jitted ``gne_jax.training.train.train_step`` (forward, backward, SGD update with
clipping and weight decay, metric sums) on synthetic data. Variants of one comparison are
timed interleaved (A, B, C, A, B, C, ...) so that machine-load drift affects them alike;
the table gives the median step time, images/s and the compile time (first call).

  python benchmarks/train_step.py unroll        # serial CNN-8 and ResNet-20, batch 128
  python benchmarks/train_step.py unroll --models serial8,resnet20,resnet56 --batch 32
  python benchmarks/train_step.py finite_check  # cost of the per-step state check
  python benchmarks/train_step.py norms         # ResNet-56 SMN vs BN vs none
  python benchmarks/train_step.py norms --norm-model resnet50 --image-size 224  # on a GPU

``unroll`` compares four ways of running the models' scanned stages (``nn.scan``):
``scanned`` (the loop, XLA:CPU's slow path for weight-gradient convolutions inside loops),
``unroll_scans`` (the train loop's default on CPU: ``gne_jax.training.unroll``, the traced
program re-evaluated with every scan unrolled), ``hand-unrolled`` (the model built with a
Python loop of separate block modules) and ``nn.scan(unroll=n)`` (JAX's own unrolling).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import platform
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gne_jax.models import common, default_config
from gne_jax.training import train
from gne_jax.training.config import base_config
from gne_jax.training.unroll import unroll_scans

MODELS = {
    "serial8": ("serial_cnn", {"depth": 8, "normalization": "batchnorm"}),
    "serial32": ("serial_cnn", {"depth": 32, "normalization": "batchnorm"}),
    "resnet20": ("resnet_cifar", {"depth": 20, "normalization": "batchnorm"}),
    "resnet56": ("resnet_cifar", {"depth": 56, "normalization": "batchnorm"}),
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@contextlib.contextmanager
def patched_scan(kind: str):
    """Builds the models' scanned stages another way meanwhile.

    ``hand``: a Python loop of separate block modules (``<stage>_b<i>``), the model an
    unrolled implementation would be; ``scan_unroll``: ``nn.scan(..., unroll=length)``.
    """
    original = common._scan

    def hand(module, h, length, xs):
        for i in range(length):
            block = module.clone(parent=module.parent, name=f"{module.name}_b{i}")
            h = block(h) if xs is None else block(h, jax.tree.map(lambda a, i=i: a[i], xs))
        return h

    def scan_unroll(module, h, length, xs):
        scan = nn.scan(common._scan_body, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, length=length, unroll=length)
        return scan(module, h, xs)[0]

    common._scan = {"hand": hand, "scan_unroll": scan_unroll}[kind]
    try:
        yield
    finally:
        common._scan = original


def make_step(model_name: str, model_kw: dict, batch: int, image_size: int, *,
              unroll: bool = False, check_state: bool = True):
    """A compiled train step (timed first call = compile + one step) with its state."""
    c = base_config()
    c.model = default_config(model_name)
    c.model.update(model_kw)
    c.optimizer.learning_rate = 0.1
    model = train.create_model(c, 10)
    state, _ = train.create_train_state(model, c, (image_size, image_size, 3), 390,
                                        jax.random.PRNGKey(0))
    norms = train.layer_grad_norms(model, state.params)
    step = jax.jit(functools.partial(
        train.train_step, base_key=jax.random.PRNGKey(1), mixup_alpha=0.0, grad_sq_fn=norms.fn,
        check_state=check_state, apply_fn=unroll_scans(model.apply) if unroll else None),
        donate_argnums=0)
    rng = np.random.default_rng(0)
    batch_data = {"image": jnp.asarray(rng.standard_normal((batch, image_size, image_size, 3)),
                                       jnp.float32),
                  "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_data).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch_data)
    jax.block_until_ready((state, m))
    return {"step": compiled, "state": state, "batch": batch_data, "compile_s": compile_s}


def time_interleaved(runs: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Per-variant step times, one per repeat; the order alternates (A B C, C B A, ...)."""
    times = {name: [] for name in runs}
    names = list(runs)
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            r = runs[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                r["state"], m = r["step"](r["state"], r["batch"])
            jax.block_until_ready((r["state"], m))
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def print_table(runs, times, batch):
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{'variant':<28} {'step ms':>9} {'min-max ms':>17} {'images/s':>9} {'compile s':>10}")
    for name in runs:
        lo, hi = 1e3 * min(times[name]), 1e3 * max(times[name])
        print(f"{name:<28} {1e3 * med[name]:9.1f} {lo:8.1f}-{hi:<8.1f} "
              f"{batch / med[name]:9.1f} {runs[name]['compile_s']:10.1f}")
    return med


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="unroll", choices=("unroll", "finite_check",
                                                                  "norms"))
    p.add_argument("--models", default="serial8,resnet20",
                   help=f"comma-separated, of {sorted(MODELS)} (unroll, finite_check)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--depth", type=int, default=56, help="ResNet depth (norms)")
    p.add_argument("--norm-model", default="resnet_cifar", choices=("resnet_cifar", "resnet50"),
                   help="model family of the norms comparison (resnet50: use --image-size 224)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hand", action="store_true", help="skip the hand-unrolled model")
    p.add_argument("--no-scanned", action="store_true", help="skip the scanned model (slow)")
    args = p.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()} | "
          f"cpu: {cpu_name()} | jax {jax.__version__}")
    print(f"batch {args.batch}, {args.image_size}x{args.image_size}, {args.repeats} x "
          f"{args.steps} timed steps per variant (interleaved)")
    if args.mode == "norms":
        family = args.norm_model
        kw = {"depth": args.depth} if family == "resnet_cifar" else {}
        runs = {norm: make_step(family, {**kw, "normalization": norm}, args.batch,
                                args.image_size)
                for norm in ("batchnorm", "smn", "none")}
        med = print_table(runs, time_interleaved(runs, args.steps, args.repeats), args.batch)
        print(f"SMN / BN step time:   {med['smn'] / med['batchnorm']:.3f}")
        print(f"SMN / none step time: {med['smn'] / med['none']:.3f}")
        print(f"BN / none step time:  {med['batchnorm'] / med['none']:.3f}")
        return
    for key in args.models.split(","):
        name, kw = MODELS[key]
        print(f"\n{key}: {name} {kw}")
        if args.mode == "finite_check":
            runs = {f"{key} check_state=True": make_step(name, kw, args.batch, args.image_size,
                                                         unroll=True, check_state=True),
                    f"{key} check_state=False": make_step(name, kw, args.batch,
                                                          args.image_size, unroll=True,
                                                          check_state=False)}
            med = print_table(runs, time_interleaved(runs, args.steps, args.repeats),
                              args.batch)
            a, b = med.values()
            print(f"check cost: {1e3 * (a - b):+.1f} ms per step ({100 * (a / b - 1):+.1f}%)")
            # The check alone (same reduction as inside the step), far below the noise above.
            st = runs[f"{key} check_state=True"]["state"]
            check = jax.jit(train._tree_finite)
            tree = (st.params, st.batch_stats, st.opt_state)
            jax.block_until_ready(check(tree))
            alone = []
            for _ in range(20):
                t0 = time.perf_counter()
                jax.block_until_ready(check(tree))
                alone.append(time.perf_counter() - t0)
            n = sum(x.size for x in jax.tree.leaves(tree))
            print(f"the check alone: {1e3 * np.median(alone):.2f} ms over {n} values "
                  f"({100 * np.median(alone) / b:.2f}% of the step)")
            continue
        runs = {} if args.no_scanned else {
            f"{key} scanned": make_step(name, kw, args.batch, args.image_size)}
        runs[f"{key} unroll_scans"] = make_step(name, kw, args.batch, args.image_size,
                                                unroll=True)
        if not args.no_hand:
            with patched_scan("hand"):
                runs[f"{key} hand-unrolled"] = make_step(name, kw, args.batch,
                                                         args.image_size)
            with patched_scan("scan_unroll"):
                runs[f"{key} nn.scan(unroll=n)"] = make_step(name, kw, args.batch,
                                                             args.image_size)
        times = time_interleaved(runs, args.steps, args.repeats)
        med = print_table(runs, times, args.batch)
        if not args.no_scanned:
            print(f"scanned / unroll_scans: "
                  f"{med[f'{key} scanned'] / med[f'{key} unroll_scans']:.1f}x")
        if not args.no_hand:
            # Paired per repeat (the two ran back to back), robust to slow load drift.
            paired = (np.asarray(times[f"{key} unroll_scans"])
                      / np.asarray(times[f"{key} hand-unrolled"]))
            print(f"unroll_scans / hand-unrolled: "
                  f"{med[f'{key} unroll_scans'] / med[f'{key} hand-unrolled']:.2f} (medians); "
                  f"per repeat: median {np.median(paired):.2f}, quartiles "
                  f"{np.percentile(paired, 25):.2f}-{np.percentile(paired, 75):.2f}")


if __name__ == "__main__":
    main()
