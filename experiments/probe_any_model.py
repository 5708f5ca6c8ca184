"""Probing any JAX model: an NNX model (via split/merge) and a plain function, beside exact values.

1. An NNX tanh MLP (``nnx.Linear`` layers, orthogonal kernels). ``nnx.split`` turns each
   layer into a pure function of its input; ``gne_jax.chain_blocks`` makes them blocks and
   ``gne_jax.groups_moments`` estimates φ(JⱼJⱼᵀ) and ϕ of every block and end to end.
   The whole model, ``nnx.merge(graphdef, state)``, goes to ``gne_jax.jacobian_moments``.
2. A plain function (``lax.scan`` over stacked Gaussian weights) to ``jacobian_moments``.

Every estimate is printed beside φ and ϕ of the exact Jacobian (``jax.jacfwd`` +
``eigvalsh``), with its distance in standard errors, and the serial theorem's product of
the blocks' φ beside the end-to-end φ.

    python experiments/probe_any_model.py [--width 64 --depth 6 --batch 2 --probes 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gne_jax import chain_blocks, groups_moments, jacobian_moments


class TanhMLP(nnx.Module):
    """``x ↦ tanh(W_L … tanh(W_1 x))`` with orthogonal ``W_l`` (no biases)."""

    def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
        init = nnx.initializers.orthogonal()
        self.layers = nnx.List([nnx.Linear(width, width, use_bias=False, kernel_init=init,
                                           rngs=rngs) for _ in range(depth)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def exact_moments(fn, x) -> tuple[float, float]:
    """φ = tr(JJᵀ)/m and ϕ = tr((JJᵀ)²)/m − φ² from the dense Jacobian of ``fn`` at ``x``."""
    J = jax.jacfwd(lambda z: fn(z.reshape(x.shape)).ravel())(x.ravel())
    ev = np.linalg.eigvalsh(np.asarray(J @ J.T, np.float64))
    return float(ev.mean()), float((ev**2).mean() - ev.mean() ** 2)


def row(name, m, fn, x):
    phi, varphi = exact_moments(fn, x)
    return {"function": name, "phi": float(m.phi), "phi_sem": float(m.phi_sem),
            "phi_exact": phi, "varphi": float(m.varphi), "varphi_sem": float(m.varphi_sem),
            "varphi_exact": varphi}


def run(width=64, depth=6, batch=2, probes=64, seed=0) -> list[dict]:
    """Estimates and exact values for every block of the NNX MLP, the whole MLP and a
    plain scanned function; one dict per function."""
    k_x, k_probe, k_w = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (batch, width))
    model = TanhMLP(width, depth, nnx.Rngs(seed))
    rows = []

    # per block: each layer as a pure function of its input (its parameters closed over)
    def layer_fn(layer):
        graphdef, state = nnx.split(layer)
        return lambda h: jnp.tanh(nnx.merge(graphdef, state)(h))

    named = [(f"layer{i + 1}", layer_fn(layer)) for i, layer in enumerate(model.layers)]
    groups = chain_blocks(named, x)
    r = groups_moments(groups, x, key=k_probe, num_probes=probes)
    h = x
    for j, (name, fn) in enumerate(named):
        rows.append(row(f"nnx {name}", jax.tree.map(lambda a, j=j: a[j], r.blocks), fn, h))
        h = fn(h)

    # the whole model: one pure function of x
    graphdef, state = nnx.split(model)
    whole = lambda z: nnx.merge(graphdef, state)(z)  # noqa: E731
    rows.append(row("nnx whole model", jacobian_moments(whole, x, key=k_probe,
                                                        num_probes=probes), whole, x))
    rows[-1]["phi_product_of_blocks"] = float(np.prod(np.asarray(r.blocks.phi)))

    # a plain function of x
    Ws = jax.random.normal(k_w, (depth, width, width)) / np.sqrt(width)
    plain = lambda z: jax.lax.scan(lambda c, W: (jnp.tanh(c @ W.T), None), z, Ws)[0]  # noqa: E731
    rows.append(row("plain scanned function", jacobian_moments(plain, x, key=k_probe,
                                                               num_probes=probes), plain, x))
    return rows


def within(r: dict, q: str, k: float = 4.0) -> str:
    """"yes" if the estimate of ``q`` is within ``k`` SE (+ float32 rounding) of the exact."""
    ok = abs(r[q] - r[f"{q}_exact"]) <= k * r[f"{q}_sem"] + 1e-5 * (abs(r[f"{q}_exact"]) + 1)
    return "yes" if ok else "NO"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rows = run(a.width, a.depth, a.batch, a.probes, a.seed)
    print(f"{'function':<24} {'phi (est ± SE)':>20} {'exact':>8} {'ok':>3} "
          f"{'varphi (est ± SE)':>20} {'exact':>8} {'ok':>3}")
    for r in rows:
        print(f"{r['function']:<24} {r['phi']:>10.4f} ± {r['phi_sem']:<7.4f} "
              f"{r['phi_exact']:>8.4f} {within(r, 'phi'):>3} {r['varphi']:>10.4f} ± "
              f"{r['varphi_sem']:<7.4f} {r['varphi_exact']:>8.4f} {within(r, 'varphi'):>3}")
    print("ok: within 4 standard errors (+ float32 rounding). A layer's JJᵀ = D W Wᵀ D = D² is "
          "diagonal for orthogonal W, where Rademacher probes are exact (SE 0).")
    whole = next(r for r in rows if r["function"] == "nnx whole model")
    print(f"serial theorem: product of the blocks' phi {whole['phi_product_of_blocks']:.4f}, "
          f"end-to-end phi {whole['phi']:.4f} (exact {whole['phi_exact']:.4f})")


if __name__ == "__main__":
    main()
