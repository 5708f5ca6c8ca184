"""The master list of checks at initialization: every id with its paper and one-line claim.

The report has one row per id of this list, implemented or not; a check module registers the
implementation (``experiments.registry.check``). New ids are added here and in their module.
"""

from __future__ import annotations

GNE = "Chen et al. 2020 (GNE)"
TARNOWSKI = "Tarnowski et al. 2019"
METEREZ = "Meterez et al. 2024"
ORVIETO = "Orvieto, Kohler et al. 2021"
LUTHER = "Luther & Seung 2019"
DANESHMAND = "Daneshmand et al. 2020"

PAPERS = (GNE, TARNOWSKI, METEREZ, ORVIETO, LUTHER, DANESHMAND)

# id -> (paper, one-line claim)
MASTER: dict[str, tuple[str, str]] = {
    "G1": (GNE, "Gaussian dense layer: φ = nσ², ϕ = n(m+1)σ⁴"),
    "G2": (GNE, "scaled orthogonal layer: ‖Wᵀv‖²/‖v‖² = γ² for every probe, ϕ = 0"),
    "G3": (GNE, "Gaussian conv: φ = c_in·k²·σ², ϕ/φ² ≈ c_out/c_in"),
    "G4": (GNE, "delta-orthogonal conv: exact per-probe ratio, ϕ = 0 (c_out ≤ c_in)"),
    "G5": (GNE, "activations: φ = E f′(x)², φ₂ = E f′(x)⁴ on N(0, q) (derivations §8)"),
    "G6": (GNE, "batch norm (train): φ = γ²/σ²(1 − 2/M), ϕ = γ⁴/σ⁴·2(M−2)/M²"),
    "G7": (GNE, "SMN (train): φ = γ²/m̄²(1 − 1/M), ϕ = γ⁴/m̄⁴(M−1)/M²"),
    "G8": (GNE, "SMN custom backward = autodiff of the forward pass"),
    "G9": (GNE, "SMN running statistic and eval-mode output"),
    "G10": (GNE, "second-moment lemma: φ(J_seg) = α_out/α_in"),
    "G11": (GNE, "serial theorem: φ = Πφᵢ, ϕ/φ² = Σ ϕᵢ/φᵢ² (wide MLP)"),
    "G12": (GNE, "residual I + cW: φ = 1 + c², ϕ = 2c² + c⁴"),
    "G13": (GNE, "activation selection, 32-layer plain CNN: end-to-end φ and ϕ/φ² per init"),
    "G14": (GNE, "gradient norm equality at init: flat per-layer ‖∇W L‖² (init_grad figure)"),
    "G15": (GNE, "sWS conv: squared row norms 2(n−1)/n, block φ ≈ 1"),
    "G16": (GNE, "depth-aware SELU: (λ, α), q → 1, block φ = 1 + ε, network (1 + ε)^L"),
    "G17": (GNE, "Fixup-style branch: φ = 2L^(−p), block 1 + 2L^(−p)"),
    "G18": (GNE, "inverted dropout: φ = 1/p, ϕ = (1 − p)/p³"),
    "G19": (GNE, "k×k average pooling: ‖Jᵀv‖²/‖v‖² = 1/k² exactly"),
    "G20": (GNE, "concatenation [f(x); x]: φ and φ₂ (derivations §8)"),
    "T1": (TARNOWSKI, "residual net: c = σ²·E f′² from per-block JVPs"),
    "T2": (TARNOWSKI, "m1 = e^c"),
    "T3": (TARNOWSKI, "m2 = (1 + 2c)e^(2c)"),
    "T4": (TARNOWSKI, "mean log-eigenvalue of JJᵀ = 0"),
    "T5": (TARNOWSKI, "log(AM/GM) of the eigenvalues = c"),
    "T6": (TARNOWSKI, "median eigenvalue 1, half the eigenvalues below 1"),
    "T7": (TARNOWSKI, "support edges λ∓(c)"),
    "T8": (TARNOWSKI, "eigenvalue density = solution of the G-equation"),
    "M1": (METEREZ, "isometry gap decays under orthogonal weights + BN, slope ln(d/(d+2))"),
    "M2": (METEREZ, "Theorem 3: E 𝓘(BN(WX)) ≥ factor·𝓘(X) for Haar W"),
    "M3": (METEREZ, "log‖∇W₁L‖ vs depth: flat for orthogonal, growing for Gaussian (Fig. 3)"),
    "M4": (METEREZ, "ReLU + standard BN, Gaussian W: gradient growth π/(π−1) per layer"),
    "M5": (METEREZ, "shaped tanh/sin with gains ℓ^(−0.4): log‖∇W₁‖ flat to depth 1000"),
    "O1": (ORVIETO, "linear MLP: E ln(‖Jv‖²/‖v‖²) = L[ψ(d/2) − ln(d/2)]"),
    "O2": (ORVIETO, "linear MLP: E ‖Jv‖²/‖v‖² = 1"),
    "O3": (ORVIETO, "ReLU He MLP: per-layer mean log-ratio E_K ψ(K/2) + ln 2 + ln(2/d)"),
    "O4": (ORVIETO, "tr H (Hutchinson HVP) = Σ‖∂f/∂W_l‖²_F for piecewise-linear nets, ½MSE"),
    "O5": (ORVIETO, "median tr H and λmax(H) rise then collapse with depth"),
    "O6": (ORVIETO, "quadratic saddle: SGD escape ∝ 1/s, Adam ≈ independent of s"),
    "L1": (LUTHER, "within-sample variance fraction = 1 − ρ_k (arc-cosine map); 1 with BN"),
    "D1": (DANESHMAND, "rank collapse of a deep linear chain without BN, rank kept with BN"),
}
