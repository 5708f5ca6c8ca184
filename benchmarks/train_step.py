"""Training-step time of CIFAR ResNet-56 with SMN vs BatchNorm vs no normalization.

Times the jitted ``gne_jax.training.train.train_step`` (forward, backward, SGD update with
clipping and weight decay, metric sums) on synthetic data, all variants in one
run and interleaved (variant A, B, C, A, B, C, ...) so that machine-load drift
affects them alike. Prints the median step time, images/s, compile time, and the
ratios SMN/BN and SMN/none.

  python benchmarks/train_step.py                       # batch 128, as in the paper
  python benchmarks/train_step.py --batch 32 --steps 3  # quicker on a small CPU
"""

from __future__ import annotations

import argparse
import functools
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from gne_jax.models import default_config
from gne_jax.training import train
from gne_jax.training.config import base_config

VARIANTS = {"batchnorm": "batchnorm", "smn": "smn", "none": "none"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_step(norm: str, depth: int, batch: int, image_size: int):
    c = base_config()
    c.model = default_config("resnet_cifar")
    c.model.depth = depth
    c.model.normalization = norm
    c.optimizer.learning_rate = 0.1
    model = train.create_model(c, 10)
    state, _ = train.create_train_state(model, c, (image_size, image_size, 3), 390,
                                        jax.random.PRNGKey(0))
    norms = train.layer_grad_norms(model, state.params)
    step = jax.jit(functools.partial(train.train_step, base_key=jax.random.PRNGKey(1),
                                     mixup_alpha=0.0, grad_sq_fn=norms.fn), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch_data = {"image": jnp.asarray(rng.standard_normal((batch, image_size, image_size, 3)),
                                       jnp.float32),
                  "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32)}
    t0 = time.perf_counter()
    state, m = step(state, batch_data)
    jax.block_until_ready((state, m))
    return {"step": step, "state": state, "batch": batch_data,
            "compile_s": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x{jax.device_count()} | "
          f"cpu: {cpu_name()} | jax {jax.__version__}")
    print(f"ResNet-{args.depth}, batch {args.batch}, {args.image_size}x{args.image_size}, "
          f"{args.repeats} x {args.steps} timed steps per variant (interleaved)")
    runs = {name: make_step(norm, args.depth, args.batch, args.image_size)
            for name, norm in VARIANTS.items()}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, r in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["state"], m = r["step"](r["state"], r["batch"])
            jax.block_until_ready((r["state"], m))
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{'variant':<10} {'step ms':>9} {'min-max ms':>17} {'images/s':>9} {'compile s':>10}")
    for name in runs:
        lo, hi = 1e3 * min(times[name]), 1e3 * max(times[name])
        print(f"{name:<10} {1e3 * med[name]:9.1f} {lo:8.1f}-{hi:<8.1f} "
              f"{args.batch / med[name]:9.1f} {runs[name]['compile_s']:10.1f}")
    print(f"SMN / BN step time:   {med['smn'] / med['batchnorm']:.3f}")
    print(f"SMN / none step time: {med['smn'] / med['none']:.3f}")
    print(f"BN / none step time:  {med['batchnorm'] / med['none']:.3f}")


if __name__ == "__main__":
    main()
