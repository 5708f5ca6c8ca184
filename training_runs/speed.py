"""SMN vs BN (vs no normalization) speed: forward+backward and the full train step.

Times, for CIFAR ResNets with each normalization, (a) ``value_and_grad`` of the loss
(forward + backward) and (b) the jitted ``train_step`` (plus the SGD update, clipping,
weight decay, metric sums), on one synthetic batch, interleaved over the variants,
``repeats`` timed calls each, median. Writes ``speed_smn_bn.png`` and ``speed_smn_bn.csv``.
The GNE paper's claim is that SMN trains about 30% faster than BN (on GPU); on a CPU the
ratio can differ either way (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from gne_jax.models import default_config
from gne_jax.training import train
from gne_jax.training.config import base_config
from gne_jax.training.unroll import should_unroll, unroll_scans

NORMS = ("batchnorm", "smn", "none")


def _programs(norm, depth, batch, size=32):
    c = base_config()
    c.model = default_config("resnet_cifar")
    c.model.depth = depth
    c.model.normalization = norm
    model = train.create_model(c, 10)
    state, _ = train.create_train_state(model, c, (size, size, 3), 390, jax.random.PRNGKey(0))
    apply = unroll_scans(model.apply) if should_unroll("auto") else model.apply
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)

    def loss(params):
        v = {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {
            "params": params}
        kw = {"mutable": ["batch_stats"]} if state.batch_stats else {}
        out = apply(v, x, train=True, **kw)
        logits = out[0] if state.batch_stats else out
        return train.cross_entropy(logits, y).mean()

    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    norms = train.layer_grad_norms(model, state.params)
    step = jax.jit(functools.partial(train.train_step, base_key=jax.random.PRNGKey(1),
                                     mixup_alpha=0.0, grad_sq_fn=norms.fn,
                                     apply_fn=apply if apply is not model.apply else None))
    batch_data = {"image": x, "label": y}
    jax.block_until_ready(fwd_bwd(state.params))
    jax.block_until_ready(step(state, batch_data))
    return (lambda: fwd_bwd(state.params)), (lambda: step(state, batch_data))


def speed_figure(out: str, *, depth: int = 20, batch: int = 64, repeats: int = 5) -> str:
    """Measures and plots; returns the path of the figure."""
    progs = {n: _programs(n, depth, batch) for n in NORMS}
    times = {(n, k): [] for n in NORMS for k in ("fwd+bwd", "train step")}
    for _ in range(repeats):
        for n, (fb, st) in progs.items():
            for k, fn in (("fwd+bwd", fb), ("train step", st)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[(n, k)].append(time.perf_counter() - t0)
    med = {key: float(np.median(v)) for key, v in times.items()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "speed_smn_bn.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["normalization", "what", "median_ms", "images_per_s", "device", "depth",
                    "batch"])
        dev = jax.devices()[0]
        for (n, k), t in med.items():
            w.writerow([n, k, round(1e3 * t, 2), round(batch / t, 1),
                        f"{dev.platform}:{dev.device_kind}", depth, batch])
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    width = 0.38
    xs = np.arange(len(NORMS))
    for j, k in enumerate(("fwd+bwd", "train step")):
        vals = [1e3 * med[(n, k)] for n in NORMS]
        bars = ax.bar(xs + (j - 0.5) * width, vals, width, label=k)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=8)
    ratio = med[("smn", "train step")] / med[("batchnorm", "train step")]
    dev = jax.devices()[0]
    ax.set(xticks=xs, xticklabels=["BN", "SMN", "none"], ylabel="median ms per call",
           title=f"ResNet-{depth}, batch {batch}, {dev.platform}: SMN/BN step = {ratio:.2f}")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "speed_smn_bn.png")
    fig.savefig(path, dpi=110)
    return path
