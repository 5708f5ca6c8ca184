"""Tarnowski et al. (AISTATS 2019): the universal Jacobian spectrum of residual networks.

For x ← x + f(Wx) ("post") or x ← x + Wf(x) ("pre") with branch weights N(0, σ²/(N·L)), the
spectrum of JJᵀ depends on one number c = Σₗ φ(branchₗ) (derivations §14.1,
``gne_jax.theory.resnet_spectrum``). One shared measurement per configuration and init: the
library's residual MLP (``gne_jax.create_model``), per-block branch moments
(``gne_jax.block_moments``) for c, end-to-end Hutchinson moments for m1, m2, forward second
moments (``gne_jax.probes.forward_stats``) for the predicted c of bounded activations, and
the exact eigenvalues of JJᵀ (``jax.jacfwd``) for T4–T8.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

import gne_jax
from experiments.checks._common import figure, keys, mean_se, record
from experiments.master import TARNOWSKI
from experiments.registry import DEVIATION, Context, check, judge
from gne_jax.probes.forward_stats import forward_stats
from gne_jax.theory import components as C
from gne_jax.theory import resnet_spectrum as rs

# (form, activation, σ²)
CONFIGS = (("post", "linear", 1.0), ("post", "tanh", 1.0), ("post", "relu", 2.0),
           ("pre", "relu", 2.0), ("pre", "tanh", 1.0))
NUM_PROBES = 16


def _label(cfg):
    return f"{cfg[0]} {cfg[1]} σ²={cfg[2]:g}"


def _predicted_c(form, act, sigma2, alpha_in, L):
    """c from the activation's E f′² at the input second moment of each block."""
    if act == "linear":
        return sigma2
    if act == "relu":
        return sigma2 / 2
    q = np.asarray(alpha_in, np.float64) * (sigma2 / L if form == "post" else 1.0)
    return float(np.mean([float(rs.resnet_c_for_activation(sigma2, C.tanh(), qq)) for qq in q]))


@functools.cache
def _measure(size: str, seed: int):
    N, L = (400, 100) if size == "small" else (1000, 100)
    n_inits = 2 if size == "small" else 3
    out = {}
    for ci, (form, act, sigma2) in enumerate(CONFIGS):
        model = gne_jax.create_model({
            "name": "mlp", "width": N, "depth": L, "num_classes": None, "input_layer": False,
            "activation": act, "residual": form, "gain": math.sqrt(sigma2 / L)})
        res = []
        for k in keys(seed, n_inits, 200 + ci):
            kx, kv, kp = jax.random.split(k, 3)
            x = jax.random.normal(kx, (1, N))
            v = model.init(kv, x)
            bm = gne_jax.block_moments(model, v, x, key=kp, num_probes=NUM_PROBES,
                                       train=False)
            fs = forward_stats(model, v, x, train=False)
            J = jax.jacfwd(lambda z, v=v: model.apply(v, z[None])[0])(x[0])
            ev = np.linalg.eigvalsh(np.asarray(J @ J.T, np.float64))
            c = float(np.sum(np.asarray(bm.branch.phi, np.float64)))
            res.append({"c": c, "c_pred": _predicted_c(form, act, sigma2, fs.alpha_in, L),
                        "m1": float(bm.end_to_end.phi), "m1_se": float(bm.end_to_end.phi_sem),
                        "m2": float(bm.end_to_end.phi2),
                        "m2_se": float(bm.end_to_end.phi2_sem), "ev": ev})
        out[(form, act, sigma2)] = res
    return out, N, L, n_inits


def _rows_for(ctx, cid, quantity, fn_meas, fn_pred, *, rel_tol=None, abs_tol=None,
              one_sided=None, deviation=None, what="", fail_note=""):
    """One row per configuration: measured (mean ± SE over inits) vs predicted."""
    data, N, L, n = _measure(ctx.size, ctx.seed)
    recs, rows = ctx.records, []
    for cfg in CONFIGS:
        meas = np.asarray([fn_meas(r) for r in data[cfg]], np.float64)
        pred = np.asarray([fn_pred(r) for r in data[cfg]], np.float64)
        m, se = mean_se(meas) if n > 1 else (meas.mean(), math.nan)
        p = float(pred.mean())
        recs.append(record(quantity, m, se, p, form=cfg[0], activation=cfg[1], sigma2=cfg[2],
                           N=N, L=L, n_inits=n, num_probes=NUM_PROBES if what else 0))
        dev = deviation(cfg) if deviation else None
        row = judge(cid, TARNOWSKI, f"{quantity}, {_label(cfg)}", p, m, se, rel_tol=rel_tol,
                    abs_tol=abs_tol, se_mult=3, deviation_note=dev, fail_note=fail_note)
        if one_sided is not None:
            ok = one_sided(m, p)
            row = row._replace(tolerance="measured ≤ predicted (one-sided)",
                               verdict="pass" if ok else (DEVIATION if dev else "fail"),
                               note="" if ok else (dev or ""))
        rows.append(row)
    ctx.write_csv(recs)  # rewritten with every call: one CSV with all the check's records
    return rows


_RELU_OUTLIER = ("ReLU post form: the positive mean of ReLU outputs builds one huge eigenvalue "
                 "along the all-ones direction (derivations §14.1), outside the free model")
_PRE_FORM = ("pre form: the ReLU/tanh masks are nearly persistent across layers, so the "
             "branches are not free; m2 and the upper edge run 5–17% high (derivations §14.1)")


def _dev_moments(cfg):
    if cfg[:2] == ("post", "relu"):
        return _RELU_OUTLIER
    if cfg[0] == "pre" and cfg[1] in ("relu", "tanh"):
        return _PRE_FORM
    return None


def _dev_pre(cfg):
    return _PRE_FORM if cfg[0] == "pre" and cfg[1] in ("relu", "tanh") else None


def _dev_relu(cfg):
    return _RELU_OUTLIER if cfg[:2] == ("post", "relu") else None


@check("T1", paper=TARNOWSKI, claim="c = Σ φ(branch) = σ²·avg E f′² (per-block JVPs)",
       cost="~90 s (shared by T1–T8)")
def c_parameter(ctx: Context):
    """Tarnowski et al., derivations §14.1: c = Σₗ(1/N)‖Xₗ‖²_F equals σ²·avgₗ E f′(hₗ)²
    (linear σ², ReLU σ²/2, tanh from the measured input second moments). Residual MLP of
    width N = 400, depth L = 100 (paper N = 1000), 2 inits (paper 3), branch φ by 16 Hutchinson
    probes per block; tolerance 1% + 3 SE across inits (every T row: the table's tolerance
    bounds the systematic part, 3 SE the init-to-init noise of 2–3 inits)."""
    return _rows_for(ctx, "T1", "c", lambda r: r["c"], lambda r: r["c_pred"], rel_tol=0.01,
                     what="probes")


@check("T2", paper=TARNOWSKI, claim="m1 = φ(JJᵀ) = e^c", cost="shared with T1")
def m1(ctx: Context):
    """Tarnowski et al., derivations §14.1: m1 = e^c, with c measured per init (T1); m1 by
    Hutchinson over 16 probes (JVP + VJP). Tolerance 5% (2–5% in derivations §14.1); the ReLU
    post form carries a mean outlier (documented)."""
    return _rows_for(ctx, "T2", "m1", lambda r: r["m1"], lambda r: math.exp(r["c"]),
                     rel_tol=0.05, deviation=_dev_relu, what="probes")


@check("T3", paper=TARNOWSKI, claim="m2 = (1 + 2c)e^(2c)", cost="shared with T1")
def m2(ctx: Context):
    """Tarnowski et al., derivations §14.1: m2 = φ((JJᵀ)²) = (1 + 2c)e^{2c}, c measured per
    init; Hutchinson. Tolerance 5%; pre-form ReLU/tanh up to 17% high and the ReLU post-form
    outlier are documented deviations. A second set of rows drops the top eigenvalue (exact)."""
    rows = _rows_for(ctx, "T3", "m2", lambda r: r["m2"],
                     lambda r: (1 + 2 * r["c"]) * math.exp(2 * r["c"]), rel_tol=0.05,
                     deviation=_dev_moments, what="probes")
    data, N, L, n = _measure(ctx.size, ctx.seed)
    cfg = ("post", "relu", 2.0)
    meas = [float(np.mean(r["ev"][:-1] ** 2)) for r in data[cfg]]
    pred = [(1 + 2 * r["c"]) * math.exp(2 * r["c"]) for r in data[cfg]]
    m, se = mean_se(meas)
    rows.append(judge("T3", TARNOWSKI, f"m2 (exact, top eigenvalue dropped), {_label(cfg)}",
                      float(np.mean(pred)), m, se, rel_tol=0.05))
    return rows


@check("T4", paper=TARNOWSKI, claim="mean log-eigenvalue of JJᵀ = 0", cost="shared with T1")
def mean_log(ctx: Context):
    """Tarnowski et al., derivations §14.1: E log λ = 0 (det J = 1 on average in log), from the
    exact eigenvalues; tolerance |·| < 0.01 (+ 3 SE across inits, as for every T row). The
    ReLU post-form outlier (≈ 5e4) alone shifts the mean log by ≈ ln(5e4)/N."""
    return _rows_for(ctx, "T4", "mean log λ", lambda r: np.mean(np.log(r["ev"])),
                     lambda r: 0.0, abs_tol=0.01, deviation=_dev_relu)


@check("T5", paper=TARNOWSKI, claim="log(AM/GM) of the eigenvalues = c", cost="shared with T1")
def isometry_gap(ctx: Context):
    """Tarnowski et al., derivations §14.1: log(mean λ) − mean log λ = c, exact eigenvalues,
    c measured per init; tolerance 1% (the ReLU post-form outlier inflates the mean)."""
    return _rows_for(ctx, "T5", "log(AM/GM)",
                     lambda r: math.log(np.mean(r["ev"])) - np.mean(np.log(r["ev"])),
                     lambda r: r["c"], rel_tol=0.01, deviation=_dev_relu)


@check("T6", paper=TARNOWSKI, claim="median eigenvalue 1; half the eigenvalues below 1",
       cost="shared with T1")
def median(ctx: Context):
    """Tarnowski et al., derivations §14.1: the median eigenvalue of JJᵀ is 1 and the fraction
    below 1 is ½; exact eigenvalues; tolerance ±0.01."""
    return (_rows_for(ctx, "T6", "median λ", lambda r: np.median(r["ev"]), lambda r: 1.0,
                      abs_tol=0.01, fail_note=(
                          "finite N: the median of N eigenvalues moves by 1/(N·ρ(1)) per "
                          "eigenvalue crossing 1 (≈ 0.01 at N = 400, c = 1), the same order "
                          "as the tolerance; the fraction below 1 (next rows) is the robust "
                          "form of this invariant"))
            + _rows_for(ctx, "T6", "fraction λ < 1", lambda r: np.mean(r["ev"] < 1),
                        lambda r: 0.5, abs_tol=0.01))


@check("T7", paper=TARNOWSKI, claim="support edges λ∓(c)", cost="shared with T1")
def edges(ctx: Context):
    """Tarnowski et al., derivations §14.1: the spectrum fills [λ₋, λ₊] with
    λ± = (s ± 1)/(s ∓ 1)·e^{±cs}, s = √(1 + 2/c). λ_min within 1%; λ_max one-sided (it
    converges slowly in N: λ_max ≤ λ₊); the ReLU post-form outlier is a documented deviation."""
    return (_rows_for(ctx, "T7", "λ_min", lambda r: r["ev"][0],
                      lambda r: float(rs.spectrum_edges(r["c"])[0]), rel_tol=0.01,
                      deviation=_dev_pre)
            + _rows_for(ctx, "T7", "λ_max", lambda r: r["ev"][-1],
                        lambda r: float(rs.spectrum_edges(r["c"])[1]),
                        one_sided=lambda m, p: m <= p * 1.001, deviation=_dev_moments))


def _hist_l1(ev, c, bins=30):
    """L1 distance between the eigenvalue histogram and the predicted density, on bins uniform
    in log λ over the predicted support (each bin's predicted mass by the CDF)."""
    lo, hi = (float(e) for e in rs.spectrum_edges(c))
    edges_ = np.exp(np.linspace(np.log(lo), np.log(hi), bins + 1))
    emp = np.histogram(np.clip(ev, lo, hi), edges_)[0] / len(ev)
    pred = np.diff(np.asarray(rs.cdf(edges_, c), np.float64))
    return float(np.sum(np.abs(emp - pred)))


def _ks(ev, c):
    """Kolmogorov–Smirnov distance between the eigenvalues and the predicted CDF."""
    ev = np.sort(ev)
    F = np.asarray(rs.cdf(ev, c, num_points=801), np.float64)
    n = len(ev)
    return float(max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n)))


@check("T8", paper=TARNOWSKI, claim="eigenvalue density = solution of the G-equation",
       cost="shared with T1")
def density(ctx: Context):
    """Tarnowski et al., derivations §14.1: the density of JJᵀ's eigenvalues is −Im G/π with
    G = (zG − 1)e^{c(1 − 2zG)}. Histogram (30 bins uniform in log λ over [λ₋, λ₊]) of the exact
    eigenvalues vs the predicted mass per bin; tolerance L1 < 0.05 (post form), < 0.10 (pre
    form, "looser"); also the Kolmogorov–Smirnov distance to the predicted CDF, tolerance
    1.63/√N (the 99% bound for N i.i.d. draws; eigenvalues are more rigid). Figure:
    histograms vs the G-equation density, per configuration."""
    data, N, L, n = _measure(ctx.size, ctx.seed)
    recs, rows = [], []
    fig, ax = figure(ncols=3, nrows=2, size=(4.2, 3.2))
    for i, cfg in enumerate(CONFIGS):
        l1 = [_hist_l1(r["ev"], r["c"]) for r in data[cfg]]
        m, se = mean_se(l1)
        tol = 0.05 if cfg[0] == "post" else 0.10
        recs.append(record("hist_L1", m, se, 0.0, form=cfg[0], activation=cfg[1],
                           sigma2=cfg[2], N=N, L=L, n_inits=n, num_probes=0))
        row = judge("T8", TARNOWSKI, f"histogram L1, {_label(cfg)}", 0.0, m, se, abs_tol=tol,
                    deviation_note=_dev_moments(cfg), fail_note=(
                        "finite N: with N eigenvalues per init in 30 bins (≈ 13 per bin at "
                        "N = 400) the bin counts fluctuate by tens of percent, which adds up "
                        "to an L1 of several percent; the KS distance (next row), which "
                        "needs no bins, is within its bound"))
        rows.append(row._replace(tolerance=f"L1 < {tol:g}"))
        ks = [_ks(r["ev"], r["c"]) for r in data[cfg]]
        km, kse = mean_se(ks)
        bound = 1.63 / math.sqrt(N)
        recs.append(record("KS_distance", km, kse, 0.0, form=cfg[0], activation=cfg[1],
                           sigma2=cfg[2], N=N, L=L, n_inits=n, num_probes=0, bound=bound))
        row = judge("T8", TARNOWSKI, f"KS distance, {_label(cfg)}", 0.0, km, kse, abs_tol=bound,
                    deviation_note=_dev_moments(cfg))
        rows.append(row._replace(tolerance=f"KS < 1.63/√N = {bound:.3f}"))
        a = ax.flat[i]
        ev = np.concatenate([r["ev"] for r in data[cfg]])
        c = float(np.mean([r["c"] for r in data[cfg]]))
        lo, hi = (float(e) for e in rs.spectrum_edges(c))
        a.hist(np.log(ev), bins=40, density=True, alpha=0.5, label=f"exact eigenvalues ({n} inits)")
        t = np.linspace(np.log(lo), np.log(hi), 400)
        a.plot(t, np.asarray(rs.density(np.exp(t), c), np.float64) * np.exp(t),
               label=f"G-equation, c = {c:.3f}")
        a.set_xlabel("log λ of JJᵀ")
        a.set_ylabel("density in log λ")
        a.set_title(f"{_label(cfg)}, N={N}, L={L}", fontsize=9)
        a.legend(fontsize=7)
    ax.flat[-1].axis("off")
    ctx.write_csv(recs)
    ctx.save_figure(fig)
    return rows


_ = jnp  # jax.numpy is used through the library calls above
