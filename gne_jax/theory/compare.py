"""Predicted vs measured moments: a table with z-scores, and an optional plot.

Measurements are `gne_jax.probes.moments.JacobianMoments` (one initialization: the SE is
probe noise only) or `PooledMoments` from `pool_inits` (several initializations:
the SE includes init-to-init variance, and ϕ is the pooled ϕ of derivations §1.1,
E[φ₂] − (E φ)²).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from gne_jax.probes.ensemble import PooledMoments, pool_inits
from gne_jax.theory.components import Moments
from gne_jax.theory.compose import Prediction

__all__ = ["PooledMoments", "pool_inits", "ComparisonRow", "Comparison", "compare"]


class ComparisonRow(NamedTuple):
    name: str
    phi_pred: float
    phi_meas: float
    phi_sem: float
    phi_z: float
    varphi_pred: float
    varphi_meas: float
    varphi_sem: float
    varphi_z: float


def _z(pred, meas, sem) -> float:
    if sem > 0:
        return (meas - pred) / sem
    return 0.0 if meas == pred else math.copysign(math.inf, meas - pred)


class Comparison(NamedTuple):
    """Rows of predicted vs measured φ and ϕ; ``str()`` gives a readable table."""

    rows: tuple[ComparisonRow, ...]

    @property
    def max_abs_z(self) -> float:
        return max(max(abs(r.phi_z), abs(r.varphi_z)) for r in self.rows)

    def __str__(self) -> str:
        head = (f"{'block':<24}{'φ pred':>10}{'φ meas':>10}{'± SE':>9}{'z':>7}"
                f"{'ϕ pred':>11}{'ϕ meas':>11}{'± SE':>9}{'z':>7}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name[:23]:<24}{r.phi_pred:>10.4g}{r.phi_meas:>10.4g}{r.phi_sem:>9.2g}"
                f"{r.phi_z:>7.2f}{r.varphi_pred:>11.4g}{r.varphi_meas:>11.4g}"
                f"{r.varphi_sem:>9.2g}{r.varphi_z:>7.2f}"
            )
        return "\n".join(lines)

    def plot(self, ax=None):
        """Predicted vs measured φ and ϕ per block with ±2 SE bars (matplotlib, lazy)."""
        import matplotlib.pyplot as plt  # lazy: plotting is optional

        if ax is None:
            fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        else:
            fig = np.ravel(ax)[0].figure
        x = np.arange(len(self.rows))
        names = [r.name for r in self.rows]
        for a, key, label in ((ax[0], "phi", "φ(JJᵀ)"), (ax[1], "varphi", "ϕ(JJᵀ)")):
            pred = [getattr(r, f"{key}_pred") for r in self.rows]
            meas = [getattr(r, f"{key}_meas") for r in self.rows]
            sem = [2 * getattr(r, f"{key}_sem") for r in self.rows]
            a.plot(x, pred, "o-", label="predicted")
            a.errorbar(x, meas, yerr=sem, fmt="s", capsize=3, label="measured ± 2 SE")
            a.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
            a.set_ylabel(label)
            a.legend()
        fig.tight_layout()
        return fig


def _pred_rows(predicted) -> list[tuple[str, float, float]]:
    if isinstance(predicted, Prediction):
        return [(predicted.name, float(predicted.phi), float(predicted.varphi))]
    if isinstance(predicted, Moments):
        return [("network", float(predicted.phi), float(predicted.varphi))]
    if isinstance(predicted, Sequence) and not isinstance(predicted, str):
        rows = []
        for i, p in enumerate(predicted):
            if isinstance(p, Prediction):
                rows.append((p.name, float(p.phi), float(p.varphi)))
            elif isinstance(p, Moments):
                rows.append((f"block{i}", float(p.phi), float(p.varphi)))
            elif isinstance(p, tuple) and len(p) == 3:
                rows.append((str(p[0]), float(p[1]), float(p[2])))
            else:
                raise TypeError(f"predicted[{i}] must be a Prediction, Moments or (name, φ, ϕ)")
        return rows
    raise TypeError(
        "predicted must be a Prediction, Moments, or a sequence of them / (name, φ, ϕ) rows; "
        f"got {type(predicted).__name__}"
    )


def _meas_rows(measured: Any) -> list[tuple[float, float, float, float]]:
    def one(m):
        try:
            return (float(m.phi), float(m.phi_sem), float(m.varphi), float(m.varphi_sem))
        except (AttributeError, TypeError) as e:
            raise TypeError(
                "measured entries need scalar phi, phi_sem, varphi, varphi_sem "
                f"(JacobianMoments or PooledMoments); got {type(m).__name__}"
            ) from e

    if hasattr(measured, "phi") and jnp.ndim(measured.phi) == 0:
        return [one(measured)]
    if hasattr(measured, "phi"):  # arrays over blocks
        n = int(np.shape(measured.phi)[0])
        return [
            (float(measured.phi[i]), float(measured.phi_sem[i]), float(measured.varphi[i]),
             float(measured.varphi_sem[i]))
            for i in range(n)
        ]
    if isinstance(measured, Sequence):
        return [one(m) for m in measured]
    raise TypeError(f"measured must be JacobianMoments/PooledMoments or a sequence, got "
                    f"{type(measured).__name__}")


def compare(predicted, measured, *, names: Sequence[str] | None = None, plot: bool = False):
    """Table of predicted vs measured φ, ϕ with z = (measured − predicted)/SE.

    Args:
      predicted: a `Prediction` (end-to-end), `Moments`, or a sequence of them or of
        ``(name, φ, ϕ)`` rows (e.g. ``per_block(prediction)``), one per block.
      measured: one measurement (`JacobianMoments`, `PooledMoments`) or a sequence of
        them, or one whose fields are arrays over blocks; same length as ``predicted``.
      names: optional row names (default: the prediction's names).
      plot: also return a matplotlib figure (predicted vs measured per block).

    Returns:
      `Comparison`, or ``(Comparison, figure)`` when ``plot=True``.
    """
    pred, meas = _pred_rows(predicted), _meas_rows(measured)
    if len(pred) != len(meas):
        raise ValueError(f"predicted has {len(pred)} rows but measured has {len(meas)}")
    if names is not None and len(names) != len(pred):
        raise ValueError(f"names has {len(names)} entries, expected {len(pred)}")
    rows = []
    for i, ((name, pp, pv), (mp, sp, mv, sv)) in enumerate(zip(pred, meas, strict=True)):
        rows.append(ComparisonRow(
            name if names is None else names[i], pp, mp, sp, _z(pp, mp, sp), pv, mv, sv,
            _z(pv, mv, sv),
        ))
    table = Comparison(tuple(rows))
    if plot:
        return table, table.plot()
    return table
