"""The calibration report and its plot (φ per block before and after)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CalibrationReport(NamedTuple):
    """What ``calibrate`` did, block by block (numpy arrays, one entry per block).

    Attributes:
      names: block names, in order.
      knob: the knob turned (``"kernel"``: kernel scale, for residual blocks with a
        parameter-free shortcut the branch scale; ``"scale"``: normalization γ; ...).
      target, tol: φ target and relative tolerance.
      phi_before, phi_before_sem, varphi_before, varphi_before_sem: φ, ϕ (with SEs) of each
        block of the network as given, at its own activations.
      phi_after, phi_after_sem, varphi_after, varphi_after_sem: the same for the
        calibrated network (fresh probes when ``verify``).
      scale: g, the factor applied to the knob (relative to the given weights).
      start_scale: g⁽⁰⁾, the solver's start (1, given, or the theory start).
      theory_phi: the theory's φ per block (``start="theory"``), else None.
      iterations: φ measurements in the solve.
      matvecs: VJP+JVP pairs spent per block (before + solve + verification); a block
        measured exactly (small Jacobian) counts min(m, n)/2 pairs per measurement.
      converged: whether |φ̂ − target| + 2·SE ≤ tol·target was met (True for excluded
        blocks, which are not solved).
      last_slope: the last secant slope d ln φ / d ln g (2 for one homogeneous weight layer).
    """

    names: tuple[str, ...]
    knob: str
    target: float
    tol: float
    phi_before: np.ndarray
    phi_before_sem: np.ndarray
    varphi_before: np.ndarray
    varphi_before_sem: np.ndarray
    phi_after: np.ndarray
    phi_after_sem: np.ndarray
    varphi_after: np.ndarray
    varphi_after_sem: np.ndarray
    scale: np.ndarray
    start_scale: np.ndarray
    theory_phi: np.ndarray | None
    iterations: np.ndarray
    matvecs: np.ndarray
    converged: np.ndarray
    last_slope: np.ndarray

    @classmethod
    def from_stats(cls, names, stats, *, knob, target, tol, num_probes, verify, theory_phi):
        a = {k: np.asarray(v) for k, v in stats._asdict().items()}
        it = a["iterations"].astype(int)
        matvecs = np.ceil(a["cost"] * (1 + it + int(verify))).astype(int)
        return cls(tuple(names), knob, float(target), float(tol), a["phi_before"],
                   a["phi_before_sem"], a["varphi_before"], a["varphi_before_sem"],
                   a["phi_after"], a["phi_after_sem"], a["varphi_after"], a["varphi_after_sem"],
                   a["scale"], a["start_scale"], theory_phi, it, matvecs,
                   a["converged"].astype(bool), a["last_slope"])

    @property
    def total_matvecs(self) -> int:
        return int(self.matvecs.sum())

    @property
    def start_error(self) -> np.ndarray:
        """ln(g/g⁽⁰⁾): how far the start (e.g. the theory start) was from the final scale."""
        return np.log(self.scale / self.start_scale)

    @property
    def max_error(self) -> float:
        """max_j |φ_after,j − target| / target."""
        return float(np.max(np.abs(self.phi_after - self.target)) / self.target)

    def rows(self) -> list[dict]:
        """One dict per block (for a CSV or a table)."""
        out = []
        for j, name in enumerate(self.names):
            out.append({
                "block": name, "phi_before": float(self.phi_before[j]),
                "phi_before_se": float(self.phi_before_sem[j]),
                "varphi_before": float(self.varphi_before[j]),
                "phi_after": float(self.phi_after[j]), "phi_after_se": float(self.phi_after_sem[j]),
                "varphi_after": float(self.varphi_after[j]),
                "varphi_after_se": float(self.varphi_after_sem[j]),
                "scale": float(self.scale[j]), "start_scale": float(self.start_scale[j]),
                "iterations": int(self.iterations[j]), "matvecs": int(self.matvecs[j]),
                "converged": bool(self.converged[j]),
            })
        return out


def plot_calibration(report: CalibrationReport, *, title: str | None = None):
    """A ``matplotlib.figure.Figure``: φ per block before and after, with ±2 SE bars.

    Log y-axis; the target and the tolerance band ``target·(1 ± tol)`` are drawn.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    j = np.arange(len(report.names))
    ax.errorbar(j, report.phi_before, yerr=2 * report.phi_before_sem, fmt="o", ms=3,
                label="before", color="tab:red", alpha=0.8)
    ax.errorbar(j, report.phi_after, yerr=2 * report.phi_after_sem, fmt="s", ms=3,
                label="after calibration", color="tab:blue")
    t, tol = report.target, report.tol
    ax.axhline(t, color="k", lw=0.8)
    ax.axhspan(t * (1 - tol), t * (1 + tol), color="tab:blue", alpha=0.12,
               label=f"target ± {tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("φ(J Jᵀ) of the block")
    if len(j) <= 16:
        ax.set_xticks(j, report.names, rotation=60, fontsize=7)
    ax.set_title(title or f"calibration ({report.knob} knob)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
