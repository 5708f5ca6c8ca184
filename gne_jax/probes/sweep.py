"""Sweeps over model configurations: block moments of every variant, as table rows.

A sweep is the Cartesian product of named axes over a base model config. Each
axis value is either a plain value of the config key named by the axis
(``{"depth": [8, 16, 32]}``) or a dict of overrides with an optional ``label``
(``{"activation": [{"activation": "leaky_relu", "negative_slope": 0.3,
"label": "leaky_relu(0.3)"}]}``), for values that need several keys.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from gne_jax.probes.block_moments import BlockMoments
from gne_jax.probes.ensemble import EnsemblePlan, ensemble_summary, plan_ensemble, run_plan


class SweepPoint(NamedTuple):
    """One variant of a sweep: its label, overrides, full model config and result."""

    label: str
    overrides: dict
    config: dict
    result: BlockMoments


def _axis_value(axis: str, value) -> tuple[str, dict]:
    if isinstance(value, Mapping):
        v = dict(value)
        label = str(v.pop("label", ",".join(f"{k}={x}" for k, x in v.items())))
        return label, v
    return f"{value}", {axis: value}


def sweep_variants(axes: Mapping[str, Sequence]) -> list[tuple[str, dict]]:
    """(label, overrides) for every combination of the axes' values, in order."""
    if not axes:
        return [("base", {})]
    per_axis = [[_axis_value(a, v) for v in vals] for a, vals in axes.items()]
    out = []
    for combo in itertools.product(*per_axis):
        label = " / ".join(lab for lab, _ in combo)
        overrides = {}
        for _, o in combo:
            overrides.update(o)
        out.append((label, overrides))
    return out


def run_sweep(
    base_config: Mapping,
    axes: Mapping[str, Sequence],
    x,
    *,
    key: jax.Array,
    num_inits: int,
    create_model: Callable | None = None,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
    max_compile_threads: int = 8,
    train: bool,
    init_chunk: int | None | str = "auto",
    mesh: Any = "auto",
    compiler_options: dict | None | str = "auto",
    num_probes: int = 32,
    method: str = "hutchinson",
    dist: str = "rademacher",
    probe_chunk: int | None = None,
    block_chunk: int | None = None,
    end_to_end: bool = True,
) -> list[SweepPoint]:
    """Ensemble block moments of every variant of ``base_config`` over ``axes``.

    Every variant uses the same ``key`` (same init and probe keys), so differences
    between variants are not sampling noise of different seeds. ``progress(iterable,
    total, desc)`` may wrap the tracing, compiling and measuring loops (e.g. with tqdm).
    The other options are those of ``ensemble_block_moments``.

    The three phases overlap: XLA compiles the programs of earlier variants while
    later ones are traced, and a variant is measured (in a thread of its own, in
    order) as soon as its programs are compiled, while the rest still compile. Each
    variant runs the same executables on the same keys as it would alone, so the
    numbers do not depend on the overlap.
    """
    ensemble_kw = dict(train=train, init_chunk=init_chunk, mesh=mesh,
                       compiler_options=compiler_options, num_probes=num_probes, method=method,
                       dist=dist, probe_chunk=probe_chunk, block_chunk=block_chunk,
                       end_to_end=end_to_end)
    if create_model is None:
        from gne_jax.models import create_model
    variants = sweep_variants(axes)
    models = []
    for label, overrides in variants:  # build all first: a bad axis value fails before work
        cfg = {**dict(base_config), **overrides}
        models.append((label, overrides, cfg, create_model(cfg)))
    plans = [plan_ensemble(m, x, key=key, num_inits=num_inits, **ensemble_kw)
             for *_, m in models]
    results = _compile_and_run(plans, progress=progress, max_threads=max_compile_threads)
    return [SweepPoint(label, overrides, cfg, r)
            for (label, overrides, cfg, _), r in zip(models, results, strict=True)]


def _lower_and_submit(plans, pool, progress, by_text) -> Iterable[list]:
    """Lowers each plan's programs (in Python, in order) and submits each distinct one to
    ``pool`` for compilation; yields each plan's compile futures as soon as submitted."""
    for plan in progress(plans, len(plans), "tracing"):
        futures = []
        for lowered in plan.lower():
            digest = hashlib.sha256(lowered.as_text().encode()).hexdigest()
            if digest not in by_text:
                by_text[digest] = pool.submit(lowered.compile)
            futures.append(by_text[digest])
        yield futures


def _workers(plans, max_threads) -> int:
    return max(1, min(2 * len(plans), os.cpu_count() or 1, max_threads))


def _run_when_compiled(plan, futures) -> BlockMoments:
    return run_plan(plan, tuple(f.result() for f in futures))


def _compile_and_run(plans, *, progress=None, max_threads=8) -> list[BlockMoments]:
    """Every plan's result: lowered in order, compiled in a pool, each measured as soon as
    its programs are compiled (one measuring thread, in plan order)."""
    progress = progress or (lambda it, total, desc: it)
    by_text: dict[str, concurrent.futures.Future] = {}
    compile_pool = concurrent.futures.ThreadPoolExecutor(_workers(plans, max_threads))
    run_pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        runs = [run_pool.submit(_run_when_compiled, plan, futures) for plan, futures in
                zip(plans, _lower_and_submit(plans, compile_pool, progress, by_text),
                    strict=True)]
        done = concurrent.futures.as_completed(by_text.values())
        for _ in progress(done, len(by_text), "compiling"):
            pass
        return [f.result() for f in progress(runs, len(runs), "measuring")]
    finally:  # on an error, queued work is dropped (running work ends on its own)
        run_pool.shutdown(cancel_futures=True)
        compile_pool.shutdown(cancel_futures=True)


def compile_plans(
    plans: Sequence[EnsemblePlan],
    *,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
    max_threads: int = 8,
) -> list[tuple[Any, Any]]:
    """Ahead-of-time ``(init, measure)`` executables of every plan, each distinct program once.

    Variants that differ only in their initializer lower to the same measurement
    program (and any two variants may lower to the same init program): programs are
    keyed by their StableHLO text and compiled once. Lowering runs in Python, one plan
    after the other; XLA compiles in C++ without the GIL, so earlier programs compile on
    the other cores while later ones are lowered.
    """
    progress = progress or (lambda it, total, desc: it)
    by_text: dict[str, concurrent.futures.Future] = {}
    with concurrent.futures.ThreadPoolExecutor(_workers(plans, max_threads)) as pool:
        per_plan = list(_lower_and_submit(plans, pool, progress, by_text))
        done = concurrent.futures.as_completed(by_text.values())
        for _ in progress(done, len(by_text), "compiling"):
            pass
    return [tuple(f.result() for f in futures) for futures in per_plan]


ROW_STATS = ("mean", "sem", "median", "q05", "q95")


def result_rows(result: BlockMoments) -> list[dict[str, Any]]:
    """One row per block, per residual branch and end to end, with statistics over inits.

    Columns: ``index``, ``block``, ``kind`` (block | branch | end_to_end), ``phi_<stat>``
    and ``varphi_<stat>`` for stat in ``ROW_STATS`` (ϕ per init, φ₂ − φ²),
    ``varphi_pooled`` and its SE (E φ₂ − (E φ)², derivations §1.1), ``phi2_mean``, ``n_inits``.
    """
    rows = []

    def add(moments, names, kind, index):
        s = ensemble_summary(moments)
        n = np.asarray(moments.phi).shape[0]
        for j, (name, idx) in enumerate(zip(names, index, strict=True)):
            row = {"index": idx, "block": name, "kind": kind}
            for q in ("phi", "varphi"):
                for stat in ROW_STATS:
                    row[f"{q}_{stat}"] = float(np.atleast_1d(s[q][stat])[j])
            row["varphi_pooled"] = float(np.atleast_1d(s["varphi_pooled"]["mean"])[j])
            row["varphi_pooled_sem"] = float(np.atleast_1d(s["varphi_pooled"]["sem"])[j])
            row["phi2_mean"] = float(np.atleast_1d(s["phi2"]["mean"])[j])
            row["n_inits"] = n
            rows.append(row)

    add(result.blocks, result.names, "block", range(len(result.names)))
    if result.branch is not None:
        add(result.branch, [result.names[i] for i in result.branch_of], "branch",
            result.branch_of)
    if result.end_to_end is not None:
        e2e = jax.tree.map(lambda a: np.asarray(a)[:, None], result.end_to_end)
        add(e2e, ["end_to_end"], "end_to_end", [len(result.names)])
    return rows
