"""GNE paper, gradient norm equality at initialization: the ``init_grad``, ``selu_grad`` and
``res_grad`` figures.

Per-layer squared weight-gradient norms ‖∇_{W_l}L‖²_F of the 32-layer plain CNN (and of
ResNet-56 for ``res_grad``), one VJP per
batch, over many initializations (``lax.map`` inside one compiled program per activation:
the initializers only change the weights, which are arguments of the gradient program), with
the 15/50/85 percentiles per layer as in the paper's plotting scripts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import gne_jax
from experiments.checks._common import figure, keys, mean_se, record
from experiments.master import GNE
from experiments.registry import FAIL, PASS, Context, check, judge
from gne_jax.probes.block_moments import probe_compiler_options

INITS = (("kaiming_normal", "KM"), ("orthogonal", "Orth"), ("delta_orthogonal", "Delta Orth"))
ACTS = {"tanh": ("tanh", {}), "ReLU": ("relu", {}),
        "leaky ReLU 0.18": ("leaky_relu", {"negative_slope": 0.18}),
        "sPReLU": ("sprelu", {}),
        "leaky ReLU 0.3": ("leaky_relu", {"negative_slope": 0.3}),
        "leaky ReLU 0.5": ("leaky_relu", {"negative_slope": 0.5})}
# Weight layers, input to output: (module, kernels within it); a scanned group's kernels carry a
# leading block axis and are interleaved block by block (conv1, conv2 of block 1, then block 2...).
SERIAL_LAYERS = (("stem", ("conv",)), ("stage1", ("conv",)), ("stage2_down", ("conv",)),
                 ("stage2", ("conv",)), ("stage3_down", ("conv",)), ("stage3", ("conv",)),
                 ("head", ("dense",)))
RESNET_LAYERS = (("stem", ("conv",)),
                 *((f"stage{s}{b}", ("conv1", "conv2")) for s in (1, 2, 3)
                   for b in ("_block1", "")),
                 ("head", ("dense",)))
SELU_VARIANTS = (("SELU (standard)", {"activation": "selu"}),
                 ("depth-aware SELU, ε = 0.03", {"activation": "selu_depth_aware",
                                                 "selu_epsilon": 0.03}),
                 ("depth-aware SELU, ε = 0.07", {"activation": "selu_depth_aware",
                                                 "selu_epsilon": 0.07}))
RES_VARIANTS = (("BN", {"normalization": "batchnorm"}), ("SMN", {"normalization": "smn"}),
                ("Fixup (p = 2, scalars)", {"normalization": "none", "fixup_p": 2.0,
                                            "fixup_scalars": True}))
Y_LABEL = "squared gradient norm of the layer's weights\n(median, 15–85% band)"
X_LABEL = "layer (input to output)"


def _layer_norms(grads, layers=SERIAL_LAYERS):
    """‖∇W‖²_F of every weight kernel (conv or dense), input layer first."""
    out = []
    for name, kernels in layers:
        per = [jnp.square(grads[name][k]["kernel"]) for k in kernels]
        if per[0].ndim == 5:  # scanned group: [blocks, kh, kw, cin, cout]
            out.append(jnp.stack([g.reshape(g.shape[0], -1).sum(1) for g in per], 1).reshape(-1))
        else:
            out.append(jnp.stack([g.sum() for g in per]))
    return jnp.concatenate(out)


def _init_grad(base, inits, n_inits, batch, hw, seed, salt, layers=SERIAL_LAYERS):
    """{init label: [n_inits, n_layers]} squared gradient norms per layer of the model ``base``
    (a config without ``init``), in training mode (batch statistics), one VJP per batch."""
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(seed), salt))
    x = jax.random.normal(kx, (batch, hw, hw, 3))
    y = jax.random.randint(ky, (batch,), 0, 10)
    apply_model = gne_jax.create_model({**base, "init": "kaiming_normal"})

    def norms(v):
        def loss(params):
            logits, _ = apply_model.apply({**v, "params": params}, x, train=True,
                                          mutable=["batch_stats"])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

        return _layer_norms(jax.grad(loss)(v["params"]), layers)

    opts = probe_compiler_options()  # LLVM -O1 on CPU: conv programs compile faster
    grad_program = jax.jit(lambda vs: jax.lax.map(norms, vs), compiler_options=opts)
    out = {}
    for ii, (init, label) in enumerate(inits):
        model = gne_jax.create_model({**base, "init": init})
        vs = jax.jit(lambda ks, model=model: jax.lax.map(lambda k: model.init(k, x), ks),
                     compiler_options=opts)(keys(seed, n_inits, salt * 10 + ii))
        out[label] = np.asarray(grad_program(vs), np.float64)
    return out


def _per_sample_vs_batch(ctx: Context):
    """Diagnostic for the ReLU-family slopes: a plain ReLU MLP (32 hidden layers, orthogonal
    kernels with gain √2, so every block has φ = 1 and the forward second moment is kept).
    For a dense layer ∇_W ℓ_b = δ_b h_bᵀ, so the per-sample sum (1/B²) Σ_b ‖∇_W ℓ_b‖²_F =
    (1/B²) Σ_b ‖δ_b‖² ‖h_b‖² is what φ = 1 per block keeps flat across layers, while the batch
    gradient's ‖(1/B) Σ_b δ_b h_bᵀ‖²_F adds the cross terms (δ_b·δ_b')(h_b·h_b'), which grow as
    ReLU layers raise the correlation between the samples' representations with depth (for
    uncorrelated samples the two are equal in expectation). Per-sample gradients by
    ``vmap`` of ``grad`` over the batch; Gaussian inputs and random labels; small: width 128,
    batch 128, 8 inits (paper: width 512, 32 inits). The per-sample slope is judged flat
    (|slope| ≤ 0.02 + 3 SE over the hidden layers); the batch gradient's slope is reported."""
    n_inits = ctx.pick(8, 32)
    width, batch = ctx.pick((128, 128), (512, 128))
    model = gne_jax.create_model({"name": "mlp", "depth": 32, "width": width,
                                  "activation": "relu", "init": "orthogonal",
                                  "input_layer": False})
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(ctx.seed), 149))
    x = jax.random.normal(kx, (batch, width))
    y = jax.random.randint(ky, (batch,), 0, 10)

    def hidden_norms(grads):
        return jnp.sum(jnp.square(grads["hidden"]["dense"]["kernel"]), axis=(1, 2))

    def norms(v):
        def loss(params, xb, yb):
            logits = model.apply({**v, "params": params}, xb)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))

        whole = hidden_norms(jax.grad(loss)(v["params"], x, y))
        per = jax.vmap(lambda xb, yb: hidden_norms(jax.grad(loss)(v["params"], xb[None],
                                                                  yb[None])))(x, y)
        return whole, per.sum(0) / batch**2

    vs = jax.jit(lambda ks: jax.lax.map(lambda k: model.init(k, x), ks))(
        keys(ctx.seed, n_inits, 149))
    whole, per = (np.asarray(a, np.float64)
                  for a in jax.jit(lambda vs: jax.lax.map(norms, vs))(vs))
    layers = np.arange(1, whole.shape[1] + 1)
    recs, rows = [], []
    slopes = {}
    for what, g in (("batch gradient", whole), ("per-sample sum", per)):
        ss = [np.polyfit(layers, np.log(gi), 1)[0] for gi in g]
        slopes[what] = mean_se(ss)
        recs.append(record("diagnostic_slope_ln_grad_per_layer", *slopes[what], 0.0,
                           variant=f"ReLU MLP {width}, orthogonal gain √2, {what}",
                           n_inits=n_inits, num_probes=0, batch=batch))
    m, se = slopes["batch gradient"]
    note = (f"batch gradient's slope {m:.3g} ± {se:.2g} (×{math.exp(m * 31):.3g} over the "
            "hidden layers) in the same networks: the growth is in the cross-sample terms")
    rows.append(judge("G14", GNE, "diagnostic: per-sample Σ_b‖∇W ℓ_b‖² slope, ReLU MLP "
                      "(flat)", 0.0, *slopes["per-sample sum"], abs_tol=0.02, se_mult=3,
                      note=note))
    return recs, rows


def _band(ax, curves, title):
    """One panel: median and 15–85% band per layer of each ``(label, [n_inits, layers])``."""
    for ci, (lab, g) in enumerate(curves):
        layers = np.arange(1, g.shape[1] + 1)
        q15, q50, q85 = np.quantile(g, (0.15, 0.5, 0.85), axis=0)
        ax.plot(layers, q50, c=f"C{ci}", label=lab)
        ax.fill_between(layers, q15, q85, color=f"C{ci}", alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _quantile_records(figure_name, data, n_inits, batch, hw):
    """CSV records: per variant, init and layer, the mean ± SE of ln‖∇W‖² and the percentiles."""
    recs = []
    for (variant, init), g in data.items():
        lg = np.log(g)
        for li in range(g.shape[1]):
            q15, q50, q85 = np.quantile(g[:, li], (0.15, 0.5, 0.85))
            m, se = mean_se(lg[:, li])
            recs.append(record("ln_grad_sq_norm", m, se, math.nan, figure=figure_name,
                               variant=variant, init=init, layer=li + 1, q15=q15, q50=q50,
                               q85=q85, n_inits=n_inits, num_probes=0, batch=batch, hw=hw))
    return recs


def _selu_grad(ctx: Context):
    """GNE paper, ``selu_grad`` figure: the 32-layer plain CNN with the standard SELU (gain 1)
    vs the depth-aware SELU of derivations §11 (ε = 0.03 and 0.07, γ₀ = 1, fixpoint q = 1),
    (a) Kaiming and (b) orthogonal init. Writes ``G14_selu_grad.png`` / ``.csv``."""
    n_inits = ctx.pick(6, 64)
    batch, hw = ctx.pick((8, 8), (128, 32))
    inits = INITS[:2]
    data = {}
    for vi, (label, over) in enumerate(SELU_VARIANTS):
        base = {"name": "serial_cnn", "depth": 32, **over}
        for init_label, g in _init_grad(base, inits, n_inits, batch, hw, ctx.seed,
                                        170 + vi).items():
            data[label, init_label] = g
    ctx.write_csv(_quantile_records("selu_grad", data, n_inits, batch, hw), "_selu_grad.csv")
    fig, ax = figure(ncols=2, size=(4.6, 3.5))
    for a, (panel, (_, init_label)) in zip(ax.flat, zip("ab", inits, strict=True), strict=True):
        _band(a, [(v, data[v, init_label]) for v, _ in SELU_VARIANTS],
              f"({panel}) 32-layer CNN, SELU, {init_label} init")
    ctx.save_figure(fig, "_selu_grad.png")


def _res_grad(ctx: Context):
    """GNE paper, ``res_grad`` figure: ResNet-56 (CIFAR, Kaiming init) with batch norm, second
    moment normalization (SMN, centred convs) and the Fixup re-derivation (no normalization,
    both branch convs scaled by L^(−p/4) with p = 2, Fixup's scalar biases and multiplier;
    derivations §13). Writes ``G14_res_grad.png`` / ``.csv``."""
    n_inits = ctx.pick(6, 32)
    batch, hw = ctx.pick((8, 8), (128, 32))
    data = {}
    for vi, (label, over) in enumerate(RES_VARIANTS):
        base = {"name": "resnet_cifar", "depth": 56, **over}
        data[label, "KM"] = _init_grad(base, INITS[:1], n_inits, batch, hw, ctx.seed, 180 + vi,
                                       RESNET_LAYERS)["KM"]
    ctx.write_csv(_quantile_records("res_grad", data, n_inits, batch, hw), "_res_grad.csv")
    fig, ax = figure(size=(6.0, 3.8))
    _band(ax[0, 0], [(v, data[v, "KM"]) for v, _ in RES_VARIANTS],
          f"ResNet-56, Kaiming init ({n_inits} inits, batch {batch}, {hw}×{hw})")
    ctx.save_figure(fig, "_res_grad.png")


@check("G14", paper=GNE, claim="gradient norm equality at init: flat per-layer ‖∇W L‖² "
       "(init_grad figure)", cost="~4 min")
def init_grad(ctx: Context):
    """GNE paper, Sec. 7.3, ``init_grad`` figure: per-layer ‖∇_{W_l}L‖²_F of the 32-layer plain
    CNN (no normalization), 15/50/85 percentiles per layer over initializations, for tanh /
    ReLU / leaky ReLU 0.18 / sPReLU × Kaiming / orthogonal / delta-orthogonal, and the leaky
    slope panels (0.18 / 0.3 / 0.5, orthogonal and delta-orthogonal). Gradient norm equality
    predicts flat curves when every block has φ ≈ 1 (the ReLU family at its gain); tanh with
    gain 1 has φ < 1 per block, so its gradients vanish toward the input. One VJP of the
    cross-entropy per batch (Gaussian 16×16 images with random labels stand in for CIFAR-10:
    batch 8, 8 inits, panels (a)–(d) only; paper 128×32×32, 64 inits, all panels).
    Tolerance: slope of ln‖∇W_l‖² vs layer over the conv layers, |slope| ≤ 0.02 + 3 SE for
    the ReLU family (less than ×1.8 over 30 layers), slope > 0.02 for tanh; the orthogonal
    kernels' spread ln(q85/q15) below Kaiming's.

    Figure-only outputs (no verdict rows), the same percentiles: ``G14_selu_grad.png`` (the
    paper's ``selu_grad``: standard SELU vs depth-aware SELU, derivations §11) and
    ``G14_res_grad.png`` (``res_grad``: ResNet-56 with BN / SMN / Fixup), each with its CSV;
    small: 6 inits, batch 8, 8×8 images (paper: 64 / 32 inits, 128×32×32)."""
    n_inits = ctx.pick(8, 64)
    batch, hw = ctx.pick((8, 16), (128, 32))
    acts = ctx.pick(list(ACTS)[:4], list(ACTS))  # small: panels (a)–(d) only
    data = {}
    for ai, act_label in enumerate(ctx.progress(acts, desc="activations")):
        act, kw = ACTS[act_label]
        inits = INITS if ai < 4 else INITS[1:]
        base = {"name": "serial_cnn", "depth": 32, "activation": act, **kw}
        data[act_label] = _init_grad(base, inits, n_inits, batch, hw, ctx.seed, 140 + ai)
    recs, rows = [], []
    layers = np.arange(1, 33)
    body = slice(1, 31)  # conv layers after the stem, before the head
    for act_label, per_init in data.items():
        for init_label, g in per_init.items():
            lg = np.log(g)
            for li in range(g.shape[1]):
                q15, q50, q85 = np.quantile(g[:, li], (0.15, 0.5, 0.85))
                m, se = mean_se(lg[:, li])
                recs.append(record("ln_grad_sq_norm", m, se, math.nan, activation=act_label,
                                   init=init_label, layer=li + 1, q15=q15, q50=q50, q85=q85,
                                   n_inits=n_inits, num_probes=0, batch=batch))
            slopes = [np.polyfit(layers[body], lg[i, body], 1)[0] for i in range(len(lg))]
            m, se = mean_se(slopes)
            spread = float(np.mean(np.log(np.quantile(g[:, body], 0.85, axis=0)
                                          / np.quantile(g[:, body], 0.15, axis=0))))
            recs.append(record("slope_ln_grad_per_layer", m, se, 0.0, activation=act_label,
                               init=init_label, n_inits=n_inits, num_probes=0, spread=spread))
            per_init[init_label] = (g, spread)
            if act_label == "tanh":
                r = judge("G14", GNE, f"slope ln‖∇W‖² per layer, tanh (gain 1), {init_label}",
                          0.0, m, se, tolerance="slope > 0.02 (vanishing toward the input)")
                rows.append(r._replace(verdict=PASS if m > 0.02 else FAIL))
            elif act_label in ("ReLU", "leaky ReLU 0.18", "sPReLU") or init_label != "KM":
                grow = math.exp(m * 30)
                rows.append(judge("G14", GNE, f"slope ln‖∇W‖² per layer, {act_label}, "
                                  f"{init_label} (flat)", 0.0, m, se, abs_tol=0.02, se_mult=3,
                                  fail_note=(
                                      f"the gradients grow toward the output (×{grow:.3g} "
                                      "over the 30 conv layers), at the paper's 128×32×32 "
                                      "batch too (slopes 0.06–0.11 on a GPU; "
                                      "docs/reproductions.md); zero-padded borders lower the "
                                      "Kaiming/orthogonal blocks' φ (G13: 0.82 per block at "
                                      "16×16), but delta-orthogonal kernels have no border "
                                      "taps (block φ 0.95) and show the steepest slope, so "
                                      "the borders do not explain it; the per-sample "
                                      "diagnostic rows below show the cause in a ReLU MLP: "
                                      "‖∇W‖² of the batch loss sums δ_b h_bᵀ over samples "
                                      "(and, in a conv net, positions) whose representations "
                                      "ReLU layers make more correlated with depth, while the "
                                      "per-sample sum that φ governs stays flat")))
    diag_recs, diag_rows = _per_sample_vs_batch(ctx)
    recs += diag_recs
    rows += diag_rows
    for act_label in ("ReLU", "leaky ReLU 0.18", "sPReLU"):
        s = {k: v[1] for k, v in data[act_label].items()}
        r = judge("G14", GNE, f"spread ln(q85/q15): Orth vs KM, {act_label}", s["KM"],
                  s["Orth"], tolerance="Orth < KM")
        rows.append(r._replace(verdict=PASS if s["Orth"] < s["KM"] else FAIL,
                               note=f"Delta Orth {s['Delta Orth']:.3g}"))
    ctx.write_csv(recs)

    fig, ax = figure(ncols=3, nrows=2, size=(4.3, 3.3))
    panels = [(f"({'abcd'[i]}) {a}", a, [lab for _, lab in INITS]) for i, a in
              enumerate(("tanh", "ReLU", "leaky ReLU 0.18", "sPReLU"))]
    if "leaky ReLU 0.5" in data:
        panels += [(f"({e}) {lab}, leaky ReLU slopes", None, lab) for e, lab in
                   (("e", "Orth"), ("f", "Delta Orth"))]
    else:
        fig, ax = figure(ncols=2, nrows=2, size=(4.3, 3.3))
    for a, (title, act_label, what) in zip(ax.flat, panels, strict=True):
        curves = ([(lab, data[act_label][lab][0]) for lab in what] if act_label else
                  [(f"slope {s}", data[f"leaky ReLU {s}"][what][0]) for s in
                   ("0.18", "0.3", "0.5")])
        _band(a, curves, title)
    ctx.save_figure(fig)
    _selu_grad(ctx)  # figure-only outputs: the paper's selu_grad and res_grad figures
    _res_grad(ctx)
    return rows
