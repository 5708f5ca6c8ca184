"""Training logs: console, JSONL + CSV files, TensorBoard events, PNG curves.

One row per epoch (train/eval loss and accuracy, learning rate, step time,
images/s) goes to ``metrics.jsonl`` and ``metrics.csv``; scalars also go to
TensorBoard through tensorboardX (no TensorFlow); the moments hook's rows go to
``moments.jsonl``. Per-layer squared gradient
norms over the first epochs go to ``grad_norms.npz`` and ``grad_norms.png``
(15/50/85 percentiles per layer, as the GNE paper plotted them).
Only process 0 writes.
"""

from __future__ import annotations

import csv
import json
import os
import struct
from typing import Any

import jax
import numpy as np
from absl import logging


class MetricsWriter:
    """Writes one dict of scalars per call to every sink; process 0 only.

    The per-epoch rows go to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard; the rows of
    the moments hook to ``moments.jsonl``. :meth:`truncate` drops from all of them what was
    logged after the checkpoint a resumed run starts from.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = workdir
        self.active = jax.process_index() == 0
        self.jsonl = os.path.join(workdir, "metrics.jsonl")
        self.csv = os.path.join(workdir, "metrics.csv")
        self.moments = os.path.join(workdir, "moments.jsonl")
        self._tensorboard = self.active and tensorboard
        self._purge_step: int | None = None
        self._tb = None

    def _tb_writer(self):
        """The TensorBoard writer, opened at first use (after :meth:`truncate`, if any).

        After a truncate it opens with ``purge_step``, the first rewritten step: a marker
        telling TensorBoard's Python loader to discard earlier events at steps >= it (the
        earlier files no longer hold any; :meth:`truncate` rewrote them).
        """
        if self._tb is None and self._tensorboard:
            self._tb = _summary_writer(os.path.join(self.workdir, "tensorboard"),
                                       self._purge_step)
        return self._tb

    def rows(self) -> list[dict[str, Any]]:
        """The rows written so far (this run and earlier runs in the same workdir)."""
        return _read_jsonl(self.jsonl)

    def truncate(self, step: int, *, keep_row_at_step: bool = True) -> None:
        """Drops what was logged after ``step``, the checkpoint a resumed run starts from.

        Epoch rows (``metrics.jsonl``/``.csv``, TensorBoard) at steps > ``step`` are dropped,
        and the one at ``step`` too unless ``keep_row_at_step``; moments rows at steps
        > ``step``. Files are replaced whole (written aside, then renamed), so a kill
        meanwhile leaves either the old or the new file. The TensorBoard event files are
        rewritten without those rows' events (every reader then shows each step once), and
        the next event file also carries tensorboardX's ``purge_step`` marker.
        """
        if not self.active:
            return
        first_dropped = step + 1 if keep_row_at_step else step
        kept = [r for r in self.rows() if r["step"] < first_dropped]
        if os.path.exists(self.jsonl):
            _write_jsonl(self.jsonl, kept)
            self._rewrite_csv(kept)
        if os.path.exists(self.moments):
            _write_jsonl(self.moments, [r for r in _read_jsonl(self.moments)
                                        if r["step"] <= step])
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        # Also with TensorBoard switched off for the resumed run: the earlier run's files.
        _drop_tensorboard_rows(os.path.join(self.workdir, "tensorboard"), first_dropped)
        self._purge_step = first_dropped

    def _rewrite_csv(self, rows):
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        tmp = self.csv + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.csv)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (float(v) if isinstance(v, np.generic | np.ndarray | jax.Array) else v)
               for k, v in row.items()}
        if not self.active:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rewrite_csv(self.rows())
        tb = self._tb_writer()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    tb.add_scalar(k, v, row["step"])
            tb.flush()
        logging.info(
            "epoch %s step %d: %s", row.get("epoch"), row["step"],
            ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                      if k not in ("step", "epoch") and isinstance(v, float)),
        )

    def write_moments(self, row: dict[str, Any]) -> None:
        """Appends one row of the moments hook (``step`` and its values) to ``moments.jsonl``."""
        if self.active:
            with open(self.moments, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _event_records(path: str) -> list[tuple[bytes, Any]]:
    """The records of a TensorBoard event file as ``(raw record, Event)``.

    A record is ``length (8 bytes), its CRC (4), the Event proto, its CRC (4)``; a truncated
    last record (a writer killed mid-write) is left out.
    """
    from tensorboardX.proto import event_pb2  # noqa: PLC0415

    with open(path, "rb") as f:
        data = f.read()
    out, i = [], 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        end = i + 12 + n + 4
        if end > len(data):
            break
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        out.append((data[i:end], event))
        i = end
    return out


def _drop_tensorboard_rows(logdir: str, first_dropped: int) -> None:
    """Rewrites each event file of ``logdir`` without its summaries at steps >= ``first_dropped``.

    A file is replaced whole (written aside, then renamed) and only when it loses events;
    a file that cannot be read as events is left as it is.
    """
    from google.protobuf.message import DecodeError  # noqa: PLC0415

    if not os.path.isdir(logdir):
        return
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or name.endswith(".tmp") or not os.path.isfile(path):
            continue
        try:
            records = _event_records(path)
        except (OSError, DecodeError, struct.error):
            continue
        kept = [raw for raw, event in records
                if not (event.HasField("summary") and event.step >= first_dropped)]
        if len(kept) < len(records):
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(b"".join(kept))
            os.replace(tmp, path)


def _summary_writer(logdir: str, purge_step: int | None):
    """A tensorboardX ``SummaryWriter`` on a new event file of ``logdir``.

    tensorboardX names event files by the second and host and truncates an existing file of
    that name; the numbered suffix keeps a second writer opened within the same second
    from overwriting the first, and sorts after it (TensorBoard reads files in name order).
    """
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir, purge_step=purge_step,
                         filename_suffix=f".{len(os.listdir(logdir)):04d}")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    """Replaces ``path`` by ``rows``, one JSON object a line (written aside, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


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
