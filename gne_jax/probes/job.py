r"""The probe job: per-block Jacobian moments of model variants over ensembles of inits.

    python -m gne_jax.probe --config configs/probe/quickstart.py --workdir runs/quickstart
    python -m gne_jax.probe --config configs/probe/quickstart.py --workdir runs/q \
        --config.model.depth=20 --config.num_inits=8

Writes into the workdir ``results.csv`` (one row per variant × block, branch and end
to end), ``results.json`` (the config and the same rows) and PNG plots (φ and ϕ per
block; φ and ϕ against depth when the sweep has a ``depth`` axis). A workdir that
already holds results is never overwritten: the new run goes to ``<workdir>/run-N``.
The files are written into a hidden temporary folder and moved into place only once all
are written, so a run that fails or is interrupted (Ctrl-C) leaves nothing behind: no
partial ``run-N``, and no workdir that the run itself created.
``run_probe(config, workdir)`` does the same from a notebook.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gne_jax.probes.sweep import result_rows, run_sweep, sweep_variants

CONFIG_KEYS = {
    "model": "base model config (gne_jax.models.default_config(name) with overrides)",
    "sweep": "axes: key -> list of values or override dicts (Cartesian product)",
    "input_shape": "probe input shape, batch first, e.g. (8, 32, 32, 3)",
    "input_scale": "std of the Gaussian probe input",
    "num_inits": "random initializations per variant",
    "num_probes": "probes per block (each one VJP + one JVP)",
    "method": "hutchinson | hutch++ | exact",
    "train": "True: batch statistics (batch-coupled); False: running statistics",
    "seed": "PRNG seed for inputs, inits and probes",
    "init_chunk": "inits at once (None: all)",
    "block_chunk": "blocks of a group at once (None: all)",
    "probe_chunk": "probes at once (None: all)",
    "plot": "write PNG plots",
}
RESULT_FILES = ("results.csv", "results.json")
log = logging.getLogger(__name__)


def check_config(config: Mapping) -> None:
    """Unknown or missing top-level keys raise a ValueError listing the valid ones."""
    keys = set(config.keys())
    unknown = sorted(keys - set(CONFIG_KEYS))
    missing = sorted(set(CONFIG_KEYS) - keys)
    if unknown or missing:
        valid = "\n".join(f"  {k}: {v}" for k, v in CONFIG_KEYS.items())
        what = f"unknown key(s) {unknown}" if unknown else f"missing key(s) {missing}"
        raise ValueError(f"probe config has {what}. Valid keys:\n{valid}")
    check_input_shape(config["input_shape"])


def check_input_shape(shape) -> None:
    """Raises a ValueError naming ``input_shape`` and its bad entry unless it is a sequence
    of positive integers (a negative one would otherwise fail deep inside XLA)."""
    example = "expected positive integers, batch first, e.g. (8, 32, 32, 3)"
    if isinstance(shape, str | bytes) or not hasattr(shape, "__len__"):
        raise ValueError(f"input_shape={shape!r} is not a sequence; {example}")
    if len(shape) == 0:
        raise ValueError(f"input_shape={tuple(shape)!r} is empty; {example}")
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
            raise ValueError(f"input_shape={tuple(shape)!r}: entry {i} is {d!r}; {example}")


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """``workdir``, created if needed and checked writable before any work starts.

    Nothing else is created here: a run writes into a hidden temporary folder that
    ``publish_run`` moves into place only once every file is written, so a run that fails
    leaves no partial ``run-N`` behind.
    """
    root = Path(workdir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as e:
        raise PermissionError(f"`workdir` {str(root)!r} cannot be written: {e}") from e
    return root


def _missing_dirs(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` will create, deepest first: each prefix of
    the path as written (``x/../y`` creates ``x`` and ``y``) that does not exist yet."""
    parts = Path(path).absolute().parts
    out = []
    for i in range(1, len(parts) + 1):
        if parts[i - 1] in (".", ".."):
            continue
        prefix = Path(os.path.normpath(Path(*parts[:i])))
        if not prefix.exists() and prefix not in out:
            out.append(prefix)
    return out[::-1]


def _remove_empty(dirs: list[Path]) -> None:
    """Removes the folders a failed run created (deepest first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (someone else's files), or gone: leave it
            return


def _new_partial_dir(root: Path) -> Path:
    """A fresh hidden folder in ``root`` for a run's files (mode as the umask gives, as
    ``run-N`` gets it when renamed)."""
    while True:
        tmp = root / f".partial-run-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
        except FileNotFoundError:  # a concurrent run that failed removed the empty workdir
            root.mkdir(parents=True, exist_ok=True)


def holds_results(root: Path) -> bool:
    return any((root / f).exists() for f in RESULT_FILES)


def _claim(path: Path) -> bool:
    """Creates the empty file ``path`` if it does not exist (atomically: of two runs, one
    gets it)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def publish_run(tmp: Path, root: Path) -> Path:
    """Moves the finished run in ``tmp`` into place and returns where it went: ``root``
    itself while ``root`` holds no results, else the first free ``root/run-N`` (N >= 2),
    into which ``tmp`` is renamed in one step. Interrupted, it leaves ``root`` as it was."""
    if not holds_results(root) and _claim(root / "results.csv"):
        # root is this run's: its other files, then results.csv over the claim (an empty
        # results.csv is a run still being moved in)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "results.csv")
        moved = []
        try:
            for p in files:
                os.replace(p, root / p.name)
                moved.append(root / p.name)
        except BaseException:
            for p in moved:
                p.unlink(missing_ok=True)
            (root / "results.csv").unlink(missing_ok=True)
            raise
        tmp.rmdir()
        return root
    n = 2
    while True:
        out = root / f"run-{n}"
        try:
            out.mkdir()  # claims run-N against a concurrent run
        except FileExistsError:
            n += 1
            continue
        try:
            os.replace(tmp, out)  # replaces the empty claimed folder atomically
        except BaseException:
            with contextlib.suppress(OSError):
                out.rmdir()
            raise
        return out


def swept_fields(axes: Mapping) -> set[str]:
    """The model fields that the sweep's axes set (a base value of these is replaced)."""
    return {k for _, overrides in sweep_variants(axes) for k in overrides}


def _variant_columns(axes: Mapping) -> list[str]:
    cols = []
    for _, overrides in sweep_variants(axes):
        cols.extend(k for k in overrides if k not in cols)
    return cols


def run_probe(config: ml_collections.ConfigDict | Mapping, workdir: str) -> list[dict[str, Any]]:
    """Runs the probe job described by ``config`` and writes its files; returns the rows."""
    config = ml_collections.ConfigDict(config) if not isinstance(
        config, ml_collections.ConfigDict) else config
    check_config(config)
    created = _missing_dirs(Path(workdir))
    try:
        return _run_probe(config, prepare_workdir(workdir))
    except BaseException:  # KeyboardInterrupt too: leave no workdir the run made for nothing
        _remove_empty(created)
        raise


def _run_probe(config: ml_collections.ConfigDict, root: Path) -> list[dict[str, Any]]:
    from gne_jax.models import create_model

    base = config.model.to_dict()
    axes = config.sweep.to_dict() if config.sweep is not None else {}
    for _, overrides in sweep_variants(axes):  # bad values fail here, before any work
        create_model({**base, **overrides})
    key = jax.random.key(config.seed)
    k_x, k_run = jax.random.split(key)
    x = config.input_scale * jax.random.normal(k_x, tuple(config.input_shape))
    try:
        from tqdm.auto import tqdm

        progress = lambda it, total, desc: tqdm(  # noqa: E731
            it, total=total, desc=desc, unit="program" if desc == "compiling" else "variant")
    except ImportError:  # pragma: no cover
        progress = None
    points = run_sweep(
        base, axes, x, key=k_run, num_inits=config.num_inits, create_model=create_model,
        progress=progress, train=config.train, init_chunk=config.init_chunk,
        num_probes=config.num_probes, method=config.method, block_chunk=config.block_chunk,
        probe_chunk=config.probe_chunk,
    )
    vcols = _variant_columns(axes)
    rows = []
    for p in points:
        for r in result_rows(p.result):
            rows.append({"variant": p.label, "model": p.config["name"],
                         **{c: p.config.get(c) for c in vcols}, **r})
    # Every file goes to a hidden temporary folder first, moved into place when complete.
    tmp = _new_partial_dir(root)
    try:
        write_results(tmp, config, rows)
        if config.plot:
            plot_results(tmp, rows, depth_axis="depth" in axes)
        out = publish_run(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s and plots to %s", ", ".join(RESULT_FILES), out)
    return rows


def write_results(out: Path, config, rows: list[dict]) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "results.json", "w") as f:
        json.dump({"config": config.to_dict(), "rows": rows}, f, indent=1, default=str)


# Block Dynamical Isometry, as the table judges it: every body block's median φ within this
# band and its mean spread ϕ at most BDI_MAX_VARPHI (derivations §2).
BDI_PHI_BAND = (0.8, 1.25)
BDI_MAX_VARPHI = 0.5
# The stem and the head change the number of channels/units (and the head pools), so their φ
# is not expected to be 1: the verdict judges the blocks between them.
EDGE_BLOCKS = ("stem", "input", "head")


def bdi_verdict(blocks: list[dict]) -> str:
    """'holds', or the first body block (input side) whose φ or ϕ breaks the isometry."""
    body = [r for r in blocks if r["block"] not in EDGE_BLOCKS] or blocks
    lo, hi = BDI_PHI_BAND
    for r in sorted(body, key=lambda r: r["index"]):
        if not lo <= r["phi_median"] <= hi:
            return f"breaks at {r['block']} (phi {r['phi_median']:.3g})"
        if r["varphi_mean"] > BDI_MAX_VARPHI:
            return f"breaks at {r['block']} (varphi {r['varphi_mean']:.3g})"
    return "holds"


def format_table(rows: list[dict]) -> str:
    """One line per variant: end-to-end φ and ϕ, the block farthest from φ = 1, and whether
    Block Dynamical Isometry holds (judged on the body blocks), with a legend."""
    lines = [f"{'variant':<44} {'e2e phi (median)':>16} {'e2e varphi':>11} "
             f"{'worst block':>16} {'its phi':>9} {'mean block varphi':>17}  BDI"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        blocks = [r for r in rs if r["kind"] == "block"]
        e2e = next((r for r in rs if r["kind"] == "end_to_end"), None)
        body = [r for r in blocks if r["block"] not in EDGE_BLOCKS] or blocks
        worst = max(body, key=lambda r: abs(np.log(max(r["phi_median"], 1e-30))))
        lines.append(
            f"{v:<44} {e2e['phi_median'] if e2e else float('nan'):>16.4g} "
            f"{e2e['varphi_pooled'] if e2e else float('nan'):>11.4g} "
            f"{worst['block']:>16} {worst['phi_median']:>9.4g} "
            f"{np.mean([r['varphi_mean'] for r in body]):>17.4g}  {bdi_verdict(blocks)}")
    lo, hi = BDI_PHI_BAND
    lines.append(
        f"\nphi: mean squared singular value of a block's Jacobian (1 = passes gradient norms "
        f"unchanged); varphi: their spread. BDI holds when every body block has phi in "
        f"[{lo}, {hi}] and varphi <= {BDI_MAX_VARPHI}; the stem and head change the number "
        f"of channels and are not judged (their phi scales with the width ratio).")
    return "\n".join(lines)


def plot_results(out: Path, rows: list[dict], depth_axis: bool) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig = Figure(figsize=(13, 4.5))
    axs = fig.subplots(1, 2)
    for v in variants:
        b = [r for r in rows if r["variant"] == v and r["kind"] == "block"]
        idx = [r["index"] for r in b]
        axs[0].plot(idx, [r["phi_median"] for r in b], marker=".", label=v)
        axs[1].plot(idx, [max(r["varphi_mean"], 1e-12) for r in b], marker=".", label=v)
    axs[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axs[0].set(yscale="log", xlabel="block", ylabel="φ(JJᵀ) per block (median over inits)")
    axs[1].set(yscale="log", xlabel="block", ylabel="ϕ(JJᵀ) per block (mean over inits)")
    axs[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out / "phi_per_block.png", dpi=120)
    if depth_axis:
        e2e = [r for r in rows if r["kind"] == "end_to_end"]
        fig = Figure(figsize=(12, 4.5))
        axs = fig.subplots(1, 2)
        groups: dict[str, list] = {}
        for r in e2e:
            rest = " / ".join(p for p in r["variant"].split(" / ") if p != str(r["depth"]))
            groups.setdefault(rest or "all", []).append(r)
        for lab, rs in groups.items():
            rs = sorted(rs, key=lambda r: r["depth"])
            d = [r["depth"] for r in rs]
            axs[0].plot(d, [r["phi_median"] for r in rs], marker="o", label=lab)
            axs[1].plot(d, [max(r["varphi_pooled"], 1e-12) for r in rs], marker="o", label=lab)
        axs[0].set(yscale="log", xlabel="depth", ylabel="end-to-end φ (median)")
        axs[1].set(yscale="log", xlabel="depth", ylabel="end-to-end ϕ (pooled)")
        axs[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "phi_vs_depth.png", dpi=120)


