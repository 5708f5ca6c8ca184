"""``python -m experiments``: list, run and report the checks at initialization.

    python -m experiments --list                  # every id: paper, claim, cost
    python -m experiments G13 T2 --out runs/x     # run some
    python -m experiments --all --size small      # all, CPU-sized; writes experiments/REPORT.md
    python -m experiments --all --size paper --out runs/paper   # the papers' sizes
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import platform
import sys
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


def write_summary(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Row._fields)
        for r in rows:
            w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in r])


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
                   help="write the Markdown report here (default with --all --size small: "
                        "experiments/REPORT.md, figures copied to experiments/figures/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

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
        chosen = args.ids
    out = args.out or os.path.join("runs", f"experiments-{args.size}")
    os.makedirs(out, exist_ok=True)

    rows, times = [], {}
    t_start = time.perf_counter()
    for cid in chosen:
        r, sec = run_check(cid, args.size, out, seed=args.seed, progress=not args.no_progress)
        rows.extend(r)
        times[cid] = sec
        print(f"{cid:<4} {overall(r):<16} {sec:7.1f} s  "
              + "; ".join(f"{x.quantity}: {x.measured:.4g} vs {x.predicted:.4g}" for x in r[:2]),
              flush=True)
    total = time.perf_counter() - t_start
    write_summary(rows, os.path.join(out, "summary.csv"))

    report = args.report
    if report is None and args.all:
        report = (os.path.join(HERE, "REPORT.md") if args.size == "small"
                  else os.path.join(out, "REPORT.md"))
    if report:
        from experiments.report import write_report

        write_report(report, rows, times, chosen, size=args.size, out=out, total_s=total,
                     seed=args.seed, papers=PAPERS, describe=describe,
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
