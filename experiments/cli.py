"""``python -m experiments``: list, run and report the checks at initialization.

    python -m experiments --list                  # every id: paper, claim, cost
    python -m experiments G13 T2 --out runs/x     # run some
    python -m experiments --all --size small      # all, CPU-sized; writes experiments/REPORT.md
    python -m experiments --all --size paper --out runs/paper   # the papers' sizes

``summary.csv`` in the output folder is merged across runs: the rows of the ids just run
replace their old rows, other ids' rows are kept (registry order). A report (``--report``,
or the default one of ``--all``) shows the checks of this run only.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import platform
import sys
import tempfile
import time
import traceback

from experiments.master import MASTER, PAPERS
from experiments.registry import (
    CHECKS,
    ERROR,
    NOT_IMPLEMENTED,
    Context,
    Row,
    overall,
)

# The modules that register checks. A new module is added here (one line).
CHECK_MODULES = (
    "experiments.checks.components",
    "experiments.checks.networks",
    "experiments.checks.init_gradients",
    "experiments.checks.resnet_spectrum",
    "experiments.checks.bn_isometry",
    "experiments.checks.log_norms",
    "experiments.checks.sample_variance",
    "experiments.checks.calibration",
)

HERE = os.path.dirname(os.path.abspath(__file__))


def load_checks() -> dict:
    """Imports every module of ``CHECK_MODULES`` (registering its checks)."""
    for name in CHECK_MODULES:
        importlib.import_module(name)
    return CHECKS


def all_ids() -> list[str]:
    """The master list's ids in order, then any registered id not in it."""
    return list(MASTER) + [i for i in CHECKS if i not in MASTER]


def describe(cid: str) -> tuple[str, str, str]:
    """(paper, claim, cost) of an id."""
    if cid in CHECKS:
        c = CHECKS[cid]
        return c.paper, c.claim, c.cost
    paper, claim = MASTER[cid]
    return paper, claim, NOT_IMPLEMENTED


def _progress_factory(cid: str, enabled: bool):
    def progress(iterable, total=None, desc=None):
        if not enabled:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=f"{cid} {desc or ''}".strip(), leave=False,
                    file=sys.stderr, dynamic_ncols=True)

    return progress


def run_check(cid: str, size: str, out: str, *, seed: int = 0, progress: bool = True):
    """Runs one check; returns (rows, seconds). Exceptions become an "error" row."""
    paper, claim, _ = describe(cid)
    if cid not in CHECKS:
        return [Row(cid, paper, claim, float("nan"), float("nan"), verdict=NOT_IMPLEMENTED,
                    note="no module implements this check yet")], 0.0
    ctx = Context(cid, size, out, seed, _progress_factory(cid, progress))
    t0 = time.perf_counter()
    try:
        rows = CHECKS[cid].fn(ctx)
        rows = [rows] if isinstance(rows, Row) else list(rows)
        if not rows:
            raise RuntimeError("the check returned no rows")
    except Exception as e:  # reported, never hidden
        tb = traceback.format_exc(limit=3).strip().splitlines()[-1]
        rows = [Row(cid, paper, claim, float("nan"), float("nan"), verdict=ERROR,
                    note=f"{type(e).__name__}: {e}"[:300] + f" ({tb[:200]})")]
    return rows, time.perf_counter() - t0


SEED_LIMIT = 2**32  # jax.random.key keeps the low 32 bits of a seed (without x64)


def _seed(text: str) -> int:
    """``--seed``: an integer 0 <= seed < 2**32. JAX folds a larger seed onto a smaller one
    (2**32 and 0 give the same key) or raises OverflowError (>= 2**64), and NumPy refuses
    negative seeds (C1's data)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"expected an integer 0 <= seed < 2**32 = {SEED_LIMIT}, got {text}")
    return seed


def _probe_writable(folder: str) -> str | None:
    """None if a file can be created (and removed) in ``folder``, else the reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(name)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_out(p: argparse.ArgumentParser, out: str) -> None:
    """``--out`` must be a writable folder or creatable as one (checked, not created)."""
    if not out.strip():
        p.error("argument --out: expected a folder path, got an empty string")
    if os.path.exists(out) or os.path.islink(out):
        if not os.path.isdir(out):
            p.error(f"argument --out: expected a folder, but {out!r} exists and is not one")
        if not os.access(out, os.W_OK | os.X_OK):
            p.error(f"argument --out: the folder {out!r} is not writable")
        return
    base = _nearest_existing(out)
    if not os.path.isdir(base):
        p.error(f"argument --out: can't create the folder {out!r}: {base!r} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        p.error(f"argument --out: can't create the folder {out!r}: {base!r} is not writable")


def _check_report(p: argparse.ArgumentParser, report: str, out: str) -> None:
    """``--report`` must be a file path whose folder exists and is writable (or is the
    output folder ``out``, already checked and created before the run)."""
    if not report.strip():
        p.error("argument --report: expected a file path, got an empty string")
    if os.path.isdir(report):
        p.error(f"argument --report: expected a file path, but {report!r} is a folder")
    parent = os.path.dirname(os.path.abspath(report))
    if parent == os.path.abspath(out) and not os.path.exists(out):
        return  # created with the output folder
    if not os.path.isdir(parent):
        p.error(f"argument --report: the folder {parent!r} of {report!r} does not exist")
    why = _probe_writable(parent)
    if why:
        p.error(f"argument --report: can't write in the folder {parent!r} ({why})")
    if os.path.exists(report) and not os.access(report, os.W_OK):
        p.error(f"argument --report: {report!r} exists and is not writable")
    figs = os.path.join(parent, "figures")
    if os.path.exists(figs) and not os.path.isdir(figs):
        p.error(f"argument --report: the report's figures go to {figs!r}, which exists and "
                "is not a folder")


def read_summary(path: str) -> list[dict]:
    """The rows of an existing ``summary.csv`` (as strings; [] if there is none). Raises
    ValueError if the file is not a summary written by this tool."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != Row._fields:
            raise ValueError(f"its columns are {reader.fieldnames}, expected {list(Row._fields)}")
        return list(reader)


def merge_summary(old: list[dict], rows, order) -> list:
    """``rows`` (this run) replace the old rows of their ids; other ids' old rows are kept.
    Sorted by ``order`` (the registry's), ids not in it last; rows of one id keep their
    order."""
    new_ids = {r.id for r in rows}
    merged = [tuple(r[k] for k in Row._fields) for r in old if r["id"] not in new_ids]
    merged += list(rows)
    rank = {cid: i for i, cid in enumerate(order)}
    return sorted(merged, key=lambda r: rank.get(r[0], len(rank)))  # stable


def write_summary(rows, path):
    """Writes the summary atomically (a temporary file, then renamed over ``path``)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".summary-", suffix=".csv", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(Row._fields)
            for r in rows:
                w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in r])
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ids", nargs="*", help="check ids (e.g. G13 T2 M4)")
    p.add_argument("--list", action="store_true", help="list every check and exit")
    p.add_argument("--all", action="store_true",
                   help="run every check: the papers' and the extra studies (C1)")
    p.add_argument("--size", choices=("small", "paper"), default="small")
    p.add_argument("--out", default=None, help="output folder (default runs/experiments-SIZE)")
    p.add_argument("--report", default=None,
                   help="write the Markdown report of this run's checks here (default with "
                        "--all --size small: experiments/REPORT.md, figures copied to "
                        "experiments/figures/)")
    p.add_argument("--seed", type=_seed, default=0, help="an integer 0 <= seed < 2**32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.ids and args.all:
        p.error("check ids and --all can't be combined: give ids, or --all")
    if args.ids and args.list:
        p.error("check ids and --list can't be combined: --list lists every id")
    if args.list and args.all:
        p.error("--list and --all can't be combined")
    load_checks()
    ids = all_ids()
    if args.list:
        w = max(len(i) for i in ids)
        for cid in ids:
            paper, claim, cost = describe(cid)
            print(f"{cid:<{w}}  {paper:<28}  {claim}  [{cost}]")
        return 0
    if args.all:  # the papers' checks, then the extra studies (C1, ~5 min at small size)
        chosen = ids
    else:
        if not args.ids:
            p.error("give check ids, --all or --list")
        unknown = [i for i in args.ids if i not in ids]
        if unknown:
            p.error(f"unknown check id(s) {unknown}; see --list")
        chosen = list(dict.fromkeys(args.ids))  # each id once, in the order given

    # Every argument is checked before any check runs (and before anything is created).
    out = os.path.join("runs", f"experiments-{args.size}") if args.out is None else args.out
    _check_out(p, out)
    report = args.report
    if report is None and args.all:
        report = (os.path.join(HERE, "REPORT.md") if args.size == "small"
                  else os.path.join(out, "REPORT.md"))
    if report is not None:
        _check_report(p, report, out)
    summary_path = os.path.join(out, "summary.csv")
    try:
        old_summary = read_summary(summary_path)
    except (OSError, ValueError, csv.Error) as e:
        p.error(f"argument --out: can't read {summary_path!r}, which this run would merge "
                f"its rows into ({e}); choose another --out or move that file")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        p.error(f"argument --out: can't create the folder {out!r} ({e.strerror or e})")
    why = _probe_writable(out)
    if why:
        p.error(f"argument --out: can't write in the folder {out!r} ({why})")

    rows, times = [], {}
    t_start = time.perf_counter()
    for cid in chosen:
        r, sec = run_check(cid, args.size, out, seed=args.seed, progress=not args.no_progress)
        rows.extend(r)
        times[cid] = sec
        print(f"{cid:<4} {overall(r):<16} {sec:7.1f} s  "
              + "; ".join(f"{x.quantity}: {x.measured:.4g} vs {x.predicted:.4g}" for x in r[:2]),
              flush=True)
        # after every check, so an interrupted run keeps the summary in step with the CSVs
        try:  # read again: a concurrent run into the same folder may have added its rows
            current = read_summary(summary_path)
        except (OSError, ValueError, csv.Error):
            current = old_summary
        write_summary(merge_summary(current, rows, ids), summary_path)
    total = time.perf_counter() - t_start
    others = sorted({r["id"] for r in old_summary} - set(chosen),
                    key=lambda c: ids.index(c) if c in ids else len(ids))

    if report is not None:
        from experiments.report import write_report

        write_report(report, rows, times, chosen, size=args.size, out=out, total_s=total,
                     seed=args.seed, papers=PAPERS, describe=describe, other_ids=others,
                     command="python -m experiments " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:]))
        print(f"report: {report}")
    print(f"{len(chosen)} checks in {total:.0f} s; CSVs in {out}")
    return 0 if all(overall([r]) not in (ERROR,) for r in rows) else 1


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
            f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind})")


__all__ = ["main", "load_checks", "run_check", "machine"]
