"""The registry of checks: each check module registers its checks with ``@check``.

A check is a function ``fn(ctx: Context) -> list[Row]`` (or one ``Row``). It measures one
claim of a paper at initialization, writes ``<ctx.out>/<id>.csv`` with every measured number
(``ctx.write_csv``) and, where a picture says more, ``<ctx.out>/<id>.png`` (``ctx.save_figure``),
and returns rows with the prediction, the measurement ± SE and a verdict.

Ids not implemented by any module still appear in the master list (``MASTER``) and in the
report as "not implemented".
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

PASS, FAIL, DEVIATION, NOT_IMPLEMENTED, ERROR = (
    "pass", "fail", "deviation", "not implemented", "error")
_ORDER = {PASS: 0, DEVIATION: 1, FAIL: 2, ERROR: 3, NOT_IMPLEMENTED: 4}


class Row(NamedTuple):
    """One compared quantity of a check.

    ``z`` is (measured − predicted)/SE when an SE is meaningful, ``rel_err`` is
    (measured − predicted)/|predicted|; ``tolerance`` says which of the two is judged and how
    (e.g. "|z| ≤ 3", "rel ≤ 2%", "slope > 0"); ``note`` explains every deviation or failure.
    """

    id: str
    paper: str
    quantity: str
    predicted: float
    measured: float
    se: float = math.nan
    z: float = math.nan
    rel_err: float = math.nan
    tolerance: str = ""
    verdict: str = PASS
    note: str = ""


def judge(id, paper, quantity, predicted, measured, se=math.nan, *, z_tol=None, rel_tol=None,
          abs_tol=None, se_mult=None, tolerance=None, deviation_note=None, note="",
          fail_note="") -> Row:
    """A row judged by |z| ≤ z_tol, |rel| ≤ rel_tol or |measured − predicted| ≤ abs_tol
    (any that is given must hold). With ``se_mult`` = k the relative/absolute tolerances
    bound the systematic part only: |measured − predicted| ≤ tol + k·SE. A failing row with
    ``deviation_note`` becomes a documented deviation (the note says why it is expected),
    otherwise a fail (with ``fail_note``, the explanation, appended)."""
    predicted, measured, se = float(predicted), float(measured), float(se)
    z = (measured - predicted) / se if se > 0 and math.isfinite(se) else math.nan
    rel = (measured - predicted) / abs(predicted) if predicted != 0 else math.nan
    margin = se_mult * se if se_mult is not None and math.isfinite(se) else 0.0
    extra = f" + {se_mult:g} SE" if se_mult is not None else ""
    diff = abs(measured - predicted)
    ok, parts = True, []
    if z_tol is not None:
        parts.append(f"|z| ≤ {z_tol:g}")
        ok &= math.isfinite(z) and abs(z) <= z_tol
    if rel_tol is not None:
        parts.append(f"rel ≤ {rel_tol:g}{extra}")
        ok &= predicted != 0 and diff <= rel_tol * abs(predicted) + margin
    if abs_tol is not None:
        parts.append(f"abs ≤ {abs_tol:g}{extra}")
        ok &= diff <= abs_tol + margin
    ok &= math.isfinite(measured)
    verdict = PASS if ok else (DEVIATION if deviation_note else FAIL)
    if not ok and (deviation_note or fail_note):
        note = (note + "; " if note else "") + (deviation_note or fail_note)
    return Row(id, paper, quantity, predicted, measured, se, z, rel,
               tolerance or " and ".join(parts), verdict, note)


def overall(rows: Sequence[Row]) -> str:
    """The worst verdict of a check's rows."""
    return max((r.verdict for r in rows), key=lambda v: _ORDER.get(v, 5), default=ERROR)


@dataclasses.dataclass
class Context:
    """What a check gets: the size, the output folder, a seed and a progress callback.

    ``ctx.small`` is True for ``--size small``; ``ctx.pick(small, paper)`` chooses a setting.
    ``ctx.progress(iterable, total=None)`` wraps a loop in the check's progress bar.
    """

    id: str
    size: str
    out: str
    seed: int = 0
    progress: Callable[..., Any] = lambda it, **kw: it
    records: list = dataclasses.field(default_factory=list)  # scratch list for CSV records

    @property
    def small(self) -> bool:
        return self.size == "small"

    def pick(self, small, paper):
        return small if self.small else paper

    def path(self, suffix: str) -> str:
        return os.path.join(self.out, f"{self.id}{suffix}")

    def write_csv(self, records: Sequence[dict], suffix: str = ".csv") -> str:
        """Writes ``records`` (dicts with the same keys) to ``<out>/<id><suffix>``."""
        os.makedirs(self.out, exist_ok=True)
        path = self.path(suffix)
        keys: list[str] = []
        for r in records:
            keys.extend(k for k in r if k not in keys)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in records:
                w.writerow({k: _fmt(v) for k, v in r.items()})
        return path

    def save_figure(self, fig, suffix: str = ".png") -> str:
        """Saves a ``matplotlib.figure.Figure`` as ``<out>/<id><suffix>``."""
        os.makedirs(self.out, exist_ok=True)
        path = self.path(suffix)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return path


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.8g}"
    try:
        import numpy as np

        if isinstance(v, np.generic | np.ndarray) and np.ndim(v) == 0:
            return f"{float(v):.8g}"
    except ImportError:  # pragma: no cover
        pass
    return v


@dataclasses.dataclass(frozen=True)
class Check:
    id: str
    paper: str
    claim: str
    cost: str
    fn: Callable[[Context], Any]
    module: str


CHECKS: dict[str, Check] = {}


def check(id: str, *, paper: str, claim: str, cost: str = "seconds"):
    """Registers ``fn(ctx) -> list[Row]`` as check ``id`` (its docstring holds the claim in
    full: paper, equation or figure, setup, tolerance)."""

    def register(fn):
        if id in CHECKS:
            raise ValueError(
                f"check {id!r} registered twice ({CHECKS[id].module}, {fn.__module__})")
        CHECKS[id] = Check(id, paper, claim, cost, fn, fn.__module__)
        return fn

    return register
