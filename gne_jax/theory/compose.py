"""Serial and parallel composition of components (derivations §3, §4), nested to any depth.

A network description is a tree whose leaves are `Component`s and whose inner
nodes are `Serial`, `Parallel`, `Residual`, `Repeat` and `Concat`. `predict`
walks the tree once, propagating the input second moment q forward (the
q-map), so that each smooth activation is evaluated at the q it actually sees,
and returns a `Prediction` tree with φ(JJᵀ) and ϕ(JJᵀ) for every node.

Rules (derivations §3–§4, free / R-diagonal factors assumed):

* serial, J = J₂J₁ with sizes m₀ → m₁ → m₂:
  φ = φ₁φ₂ and ϕ = (m₂/m₁)·ϕ₁φ₂² + φ₁²ϕ₂, i.e. normalized variances add with the
  width ratios m_L/m_i;
* parallel, J = Σ Jᵢ (central, free): φ = Σφᵢ, ϕ = Σϕᵢ + Σ_{i≠k} φᵢφₖ;
* residual, J = I + ζJ_b: φ = 1 + ζ²φ_b, ϕ = ζ⁴ϕ_b + 2ζ²φ_b;
* concatenation y = [f(x); x]: φ = (c_fφ_f + c_x)/(c_f + c_x),
  φ₂ = (c_x + 2c_fφ_f + c_f(ϕ_f + φ_f²))/(c_f + c_x).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from gne_jax._tree import is_concrete
from gne_jax.probes import compiled
from gne_jax.theory.components import Component, Moments, Signal, as_signal, identity, scale

Array = jax.Array

__all__ = [
    "Serial",
    "Parallel",
    "Residual",
    "Repeat",
    "Concat",
    "Prediction",
    "predict",
    "serial_moments",
    "parallel_moments",
    "residual_moments",
    "per_block",
]


class Serial(NamedTuple):
    """f = parts[-1] ∘ … ∘ parts[0]; `predict` reports each part as a block."""

    parts: tuple
    name: str = "serial"


class Parallel(NamedTuple):
    """f(x) = Σ branches(x) (same output shape; at most one non-central branch)."""

    branches: tuple
    name: str = "parallel"


class Residual(NamedTuple):
    """f(x) = shortcut(x) + scale·branch(x); ``shortcut=None`` is the identity."""

    branch: Any
    scale: Any = 1.0
    shortcut: Any = None
    name: str = "residual"


class Repeat(NamedTuple):
    """``count`` copies of ``block`` in series, evaluated with ``lax.scan`` over q."""

    block: Any
    count: int
    name: str = "repeat"


class Concat(NamedTuple):
    """y = [f(x); x]: ``c_new`` channels from ``branch`` and ``c_carried`` carried channels."""

    branch: Any
    c_new: int
    c_carried: int
    name: str = "concat"


@struct.dataclass
class Prediction:
    """Predicted moments of one node of a network description (a pytree).

    ``blocks`` holds the children's predictions (for `Serial`: one per part; for
    `Repeat`: one `Prediction` whose fields are arrays over the repetitions).
    ``name`` and ``size_ratio`` (m_out/m_in) are static metadata, not pytree leaves, so
    a `Prediction` passes through ``jax.jit``/``jax.vmap``/``jax.tree.map`` unchanged.
    """

    name: str = struct.field(pytree_node=False)
    phi: Array = None
    varphi: Array = None
    q_in: Array = None
    q_out: Array = None
    size_ratio: float = struct.field(pytree_node=False, default=1.0)
    blocks: tuple = ()
    signal_out: Signal | None = None

    @property
    def moments(self) -> Moments:
        return Moments(self.phi, self.varphi)

    @property
    def phi2(self) -> Array:
        return self.varphi + self.phi**2

    @property
    def normalized_variance(self) -> Array:
        """ϕ/φ², the scale-free spread (as ``JacobianMoments.spread``)."""
        return self.varphi / self.phi**2

    @property
    def spread(self) -> Array:
        """ϕ/φ², the scale-free spread (alias of ``normalized_variance``)."""
        return self.normalized_variance


# ---------------------------------------------------------------------------
# The composition rules on (φ, ϕ) pairs
# ---------------------------------------------------------------------------


def serial_moments(first: Moments, second: Moments, size_ratio_second: float = 1.0) -> Moments:
    """J = J₂J₁: φ = φ₁φ₂, ϕ = (m₂/m₁)ϕ₁φ₂² + φ₁²ϕ₂ (m₂/m₁ = ``size_ratio_second``)."""
    phi = first.phi * second.phi
    varphi = size_ratio_second * first.varphi * second.phi**2 + first.phi**2 * second.varphi
    return Moments(phi, varphi)


def parallel_moments(*branches: Moments) -> Moments:
    """J = Σ Jᵢ: φ = Σφᵢ, ϕ = Σϕᵢ + Σ_{i≠k}φᵢφₖ = Σϕᵢ + (Σφᵢ)² − Σφᵢ²."""
    if not branches:
        raise ValueError("parallel_moments needs at least one branch")
    phis = jnp.stack([jnp.asarray(b.phi) for b in branches])
    varphis = jnp.stack([jnp.asarray(b.varphi) for b in branches])
    total = jnp.sum(phis, axis=0)
    return Moments(total, jnp.sum(varphis, axis=0) + total**2 - jnp.sum(phis**2, axis=0))


def residual_moments(branch: Moments, zeta=1.0) -> Moments:
    """J = I + ζJ_b: φ = 1 + ζ²φ_b, ϕ = ζ⁴ϕ_b + 2ζ²φ_b."""
    z2 = jnp.asarray(zeta) ** 2
    return Moments(1 + z2 * branch.phi, z2**2 * branch.varphi + 2 * z2 * branch.phi)


# ---------------------------------------------------------------------------
# Tree evaluation
# ---------------------------------------------------------------------------

_NODES = (Component, Serial, Parallel, Residual, Repeat, Concat)


def _check_node(node) -> None:
    if not isinstance(node, _NODES):
        names = ", ".join(t.__name__ for t in _NODES)
        raise TypeError(f"network node must be one of {names}; got {type(node).__name__}")


def _sum_signals(sigs) -> Signal:
    """Sum of independent branches: means add, variances add, q = v-part + channel means."""
    m = sum(s.m for s in sigs)
    v = sum(s.v for s in sigs)
    # channel-mean dispersions add; q = v + dispersion + m²
    d = sum(jnp.maximum(s.q - s.v - s.m**2, 0.0) for s in sigs)
    return Signal(v + d + m**2, v, m)


def _eval(node, sig: Signal) -> Prediction:
    _check_node(node)
    q = sig.q
    if isinstance(node, Component):
        m = node.moments(sig)
        if node.propagate is not None:
            out = node.propagate(sig)
        else:  # a user Component without propagate: scale v and m with q
            qo = node.forward(sig.q)
            r = qo / jnp.where(sig.q > 0, sig.q, 1.0)
            out = Signal(qo, r * sig.v, jnp.sqrt(r) * sig.m)
        return Prediction(node.name, m.phi, m.varphi, q, out.q, node.size_ratio, (), out)
    if isinstance(node, Serial):
        if not node.parts:
            raise ValueError("Serial needs at least one part")
        children = []
        acc = Moments(jnp.ones_like(q), jnp.zeros_like(q))
        ratio, h = 1.0, sig
        for part in node.parts:  # heterogeneous parts: a static, usually short structure
            p = _eval(part, h)
            acc = serial_moments(acc, p.moments, p.size_ratio)
            ratio *= p.size_ratio
            h = p.signal_out
            children.append(p)
        return Prediction(node.name, acc.phi, acc.varphi, q, h.q, ratio, tuple(children), h)
    if isinstance(node, Parallel):
        if not node.branches:
            raise ValueError("Parallel needs at least one branch")
        children = tuple(_eval(b, sig) for b in node.branches)
        ratios = {round(c.size_ratio, 12) for c in children}
        if len(ratios) != 1:
            raise ValueError(f"parallel branches must have equal size ratios, got {sorted(ratios)}")
        m = parallel_moments(*(c.moments for c in children))
        # Central branches are uncorrelated, so second moments add.
        out = _sum_signals([c.signal_out for c in children])
        return Prediction(node.name, m.phi, m.varphi, q, out.q, children[0].size_ratio, children,
                          out)
    if isinstance(node, Residual):
        branch = Serial((node.branch, scale(node.scale)), name="branch")
        shortcut = identity() if node.shortcut is None else node.shortcut
        return _eval(Parallel((shortcut, branch), name=node.name), sig)
    if isinstance(node, Repeat):
        if isinstance(node.count, bool) or int(node.count) != node.count or node.count < 1:
            raise ValueError(f"Repeat count must be an integer >= 1, got {node.count!r}")

        def step(carry, _):
            acc_phi, acc_varphi, h = carry
            p = _eval(node.block, h)
            acc = serial_moments(Moments(acc_phi, acc_varphi), p.moments, p.size_ratio)
            return (acc.phi, acc.varphi, p.signal_out), (p.phi, p.varphi, h.q, p.q_out)

        probe = _eval(node.block, sig)
        if abs(probe.size_ratio - 1.0) > 1e-12:
            raise ValueError("Repeat needs a shape-preserving block (size ratio 1)")
        init = (jnp.ones_like(q), jnp.zeros_like(q), sig)
        (phi, varphi, h), (bphi, bvarphi, bq_in, bq_out) = jax.lax.scan(
            step, init, None, length=int(node.count)
        )
        stacked = Prediction(probe.name, bphi, bvarphi, bq_in, bq_out, 1.0)
        return Prediction(node.name, phi, varphi, q, h.q, 1.0, (stacked,), h)
    if isinstance(node, Concat):
        f = _eval(node.branch, sig)
        cf, cx = node.c_new, node.c_carried
        if any(isinstance(c, bool) or int(c) != c for c in (cf, cx)) or cf < 0 or cx < 1:
            raise ValueError(f"Concat needs integer channel counts c_new >= 0 and c_carried "
                             f">= 1, got c_new={cf!r}, c_carried={cx!r}")
        cf, cx = int(cf), int(cx)
        phi = (cf * f.phi + cx) / (cf + cx)
        phi2 = (cx + 2 * cf * f.phi + cf * (f.varphi + f.phi**2)) / (cf + cx)
        w = lambda a, b: (cf * a + cx * b) / (cf + cx)
        fo = f.signal_out
        out = Signal(w(fo.q, sig.q), w(fo.v, sig.v), w(fo.m, sig.m))
        return Prediction(node.name, phi, phi2 - phi**2, q, out.q, (cf + cx) / cx, (f,), out)
    raise AssertionError("unreachable")


def predict(network, q_in=1.0) -> Prediction:
    """Predicted φ(JJᵀ), ϕ(JJᵀ) of ``network`` for an input of second moment ``q_in``.

    ``network`` is a `Component` or a tree of `Serial`/`Parallel`/`Residual`/
    `Repeat`/`Concat`. The input statistics (``q_in`` a float for a centred input,
    or a `Signal(q, v, m)`) are propagated forward through the tree (the q-map,
    extended to the mean and the within-channel batch variance) so that smooth
    activations see the right input variance and normalization layers the right
    statistics.
    """
    _check_node(network)
    signal = as_signal(q_in)
    if not is_concrete(signal):
        return _eval(network, signal)
    # Eagerly: traced once per call (Python only), run as one program compiled once per
    # structure of the network (a lax.scan of a Repeat would otherwise compile anew).
    try:
        return compiled.call(_predict_program, {},
                             [(lambda s: _eval(network, s), (signal,), None)], (signal,))
    except jax.errors.ConcretizationTypeError:  # a component that needs concrete values
        return _eval(network, signal)


def _predict_program(evaluate, signal):
    return evaluate(signal)


def per_block(prediction: Prediction) -> list[tuple[str, float, float]]:
    """The top-level blocks of a prediction as rows ``(name, φ, ϕ)``.

    `Repeat` children are unstacked into one row per repetition (``name[i]``).
    """
    rows = []
    for child in prediction.blocks or (prediction,):
        if jnp.ndim(child.phi) == 0:
            rows.append((child.name, float(child.phi), float(child.varphi)))
        elif child.blocks and jnp.ndim(child.blocks[0].phi) == 1:
            st = child.blocks[0]
            for i in range(st.phi.shape[0]):
                rows.append((f"{child.name}[{i}]", float(st.phi[i]), float(st.varphi[i])))
        else:
            for i in range(child.phi.shape[0]):
                rows.append((f"{child.name}[{i}]", float(child.phi[i]), float(child.varphi[i])))
    return rows
