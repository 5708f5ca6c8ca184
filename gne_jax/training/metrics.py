"""Training logs: console, JSONL + CSV files, TensorBoard events, PNG curves.

One row per epoch (train/eval loss and accuracy, learning rate, step time,
images/s) goes to ``metrics.jsonl`` and ``metrics.csv``; scalars also go to
TensorBoard through tensorboardX (no TensorFlow). Per-layer squared gradient
norms over the first epochs go to ``grad_norms.npz`` and ``grad_norms.png``
(15/50/85 percentiles per layer, as the GNE paper plotted them).
Only process 0 writes.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging


class MetricsWriter:
    """Writes one dict of scalars per call to every sink; process 0 only."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = workdir
        self.active = jax.process_index() == 0
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
        self._tb = None
        if self.active and tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def rows(self) -> list[dict[str, Any]]:
        """The rows written so far (this run and earlier runs in the same workdir)."""
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate(self, max_step: int) -> None:
        """Drops rows after ``max_step``: written after the checkpoint a resumed run starts from."""
        if not self.active:
            return
        kept = [r for r in self.rows() if r["step"] <= max_step]
        with open(self.jsonl, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self._rewrite_csv(kept)

    def _rewrite_csv(self, rows):
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (float(v) if isinstance(v, np.generic | np.ndarray | jax.Array) else v)
               for k, v in row.items()}
        if not self.active:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rewrite_csv(self.rows())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, row["step"])
            self._tb.flush()
        logging.info(
            "epoch %s step %d: %s", row.get("epoch"), row["step"],
            ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                      if k not in ("step", "epoch") and isinstance(v, float)),
        )

    def close(self):
        if self._tb is not None:
            self._tb.close()


def plot_curves(workdir: str, rows: list[dict[str, Any]]) -> str | None:
    """Loss, accuracy and learning-rate curves per epoch to ``curves.png``."""
    if jax.process_index() != 0 or not rows:
        return None
    from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: backend left alone)

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    for key, ax in (("loss", axes[0]), ("accuracy", axes[1])):
        for split in ("train", "eval"):
            vals = [r.get(f"{split}_{key}") for r in rows]
            pts = [(e, v) for e, v in zip(epochs, vals, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    axes[2].plot(epochs, [r.get("learning_rate") for r in rows])
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=100)
    return path


def save_grad_norms(workdir: str, names: list[str], steps: np.ndarray, values: np.ndarray,
                    *, plot: bool = True):
    """Saves squared per-layer gradient norms ``values[t, l]`` (before clipping) and a plot."""
    if jax.process_index() != 0:
        return
    np.savez(os.path.join(workdir, "grad_norms.npz"), names=np.asarray(names), steps=steps,
             values=values)
    if len(values) == 0 or not plot:
        return
    from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: backend left alone)

    q = np.percentile(values, [15, 50, 85], axis=0)
    layers = np.arange(1, len(names) + 1)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.fill_between(layers, q[0], q[2], alpha=0.3, label="15-85%")
    ax.plot(layers, q[1], marker=".", label="median")
    ax.set_yscale("log")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel(r"$\|\nabla_W L\|_F^2$")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "grad_norms.png"), dpi=100)


def load_grad_norms(workdir: str, max_step: int):
    """The saved gradient norms with ``step < max_step`` as lists, or empty lists."""
    path = os.path.join(workdir, "grad_norms.npz")
    if not os.path.exists(path):
        return [], []
    data = np.load(path)
    keep = data["steps"] < max_step
    return list(data["steps"][keep]), list(data["values"][keep])
