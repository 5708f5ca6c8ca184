"""Aggregate run directories into the papers' training figures.

Accuracy figure (as the GNE paper's): the mean test-accuracy curve over repeats per run
label; the legend gives "mean of the last 10 epochs ± 2σ", σ the mean over those epochs
of the per-epoch standard deviation over repeats (setups §1.6). Gradient figure: per
layer (input first), the 15th/50th/85th percentiles of ‖∇_W L‖²_F over every recorded
step of the first epochs and every repeat, log scale. Loss figure: mean training loss
per epoch (the SGD-vs-Adam comparison).
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from matplotlib.figure import Figure

LAST = 10


def slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_").lower()


def run_dirs(out: str, group: str, label: str) -> list[str]:
    base = os.path.join(out, group, slug(label))
    if not os.path.isdir(base):
        return []
    return sorted(os.path.join(base, d) for d in os.listdir(base) if d.startswith("seed"))


def _rows(d):
    path = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(dirs: list[str], key: str) -> np.ndarray:
    """``(repeats, epochs)`` of ``key`` per epoch, truncated to the shortest finished run."""
    per = []
    for d in dirs:
        rows = [r for r in _rows(d) if key in r]
        if rows:
            per.append([r[key] for r in rows])
    if not per:
        return np.zeros((0, 0))
    n = min(len(p) for p in per)
    return np.asarray([p[:n] for p in per], float)


def last_mean_2sigma(acc: np.ndarray, last: int = LAST) -> tuple[float, float]:
    """Mean of the mean curve over the last epochs, and 2 × mean per-epoch std over repeats."""
    tail = acc[:, -last:]
    std = tail.std(axis=0, ddof=1) if acc.shape[0] > 1 else np.zeros(tail.shape[1])
    return float(tail.mean()), float(2 * std.mean())


def aggregate(out: str, group: str, labels: list[str]) -> dict[str, str]:
    """Writes ``<group>_accuracy.png``, ``<group>_gradients.png``, ``<group>_loss.png`` and
    ``<group>_summary.csv`` into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    fig_acc, fig_grad, fig_loss = (Figure(figsize=(7, 4.5)) for _ in range(3))
    ax_acc, ax_grad, ax_loss = (f.add_subplot() for f in (fig_acc, fig_grad, fig_loss))
    summary = []
    for i, label in enumerate(labels):
        dirs = run_dirs(out, group, label)
        acc = 100 * curves(dirs, "eval_accuracy")
        loss = curves(dirs, "train_loss")
        color = f"C{i % 10}"
        if acc.size:
            m, s2 = last_mean_2sigma(acc)
            epochs = np.arange(1, acc.shape[1] + 1)
            ax_acc.plot(epochs, acc.mean(0), color=color,
                        label=f"{label}: {m:.2f} ± {s2:.2f}")
            if acc.shape[0] > 1:
                ax_acc.fill_between(epochs, acc.min(0), acc.max(0), color=color, alpha=0.15)
            summary.append({"label": label, "repeats": acc.shape[0], "epochs": acc.shape[1],
                            f"test_acc_last{LAST}_mean": round(m, 3),
                            "two_sigma": round(s2, 3),
                            "final_train_loss": round(float(loss[:, -1].mean()), 4)
                            if loss.size else float("nan")})
        if loss.size:
            ax_loss.plot(np.arange(1, loss.shape[1] + 1), loss.mean(0), color=color,
                         label=label)
        vals = []
        for d in dirs:
            path = os.path.join(d, "grad_norms.npz")
            if os.path.exists(path):
                with np.load(path) as g:
                    vals.append(g["values"])
        if vals:
            v = np.concatenate(vals)  # (steps × repeats, layers)
            layers = np.arange(1, v.shape[1] + 1)
            p15, p50, p85 = np.percentile(v, [15, 50, 85], axis=0)
            ax_grad.plot(layers, p50, color=color, label=label)
            ax_grad.fill_between(layers, p15, p85, color=color, alpha=0.2)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
               title=f"{group}: mean over repeats (legend: mean of last {LAST} ± 2σ)")
    ax_grad.set(xlabel="layer (input first)", ylabel="‖∇W L‖²  (15/50/85 percentiles)",
                yscale="log", title=f"{group}: gradient norms, first epochs")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title=f"{group}")
    paths = {}
    for name, fig, ax in (("accuracy", fig_acc, ax_acc), ("gradients", fig_grad, ax_grad),
                          ("loss", fig_loss, ax_loss)):
        if ax.lines:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths[name] = os.path.join(out, f"{group}_{name}.png")
            fig.savefig(paths[name], dpi=110)
    if summary:
        paths["summary"] = os.path.join(out, f"{group}_summary.csv")
        with open(paths["summary"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
    return paths
