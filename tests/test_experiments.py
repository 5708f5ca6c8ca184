"""`python -m experiments` end to end on two cheap checks, against the closed forms."""

import csv
import math
import os
import subprocess
import sys

import pytest

import gne_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_list_has_every_id():
    out = _run("--list")
    assert out.returncode == 0, out.stderr
    ids = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    want = ([f"G{i}" for i in range(1, 21)] + [f"T{i}" for i in range(1, 9)]
            + [f"M{i}" for i in range(1, 6)] + [f"O{i}" for i in range(1, 7)] + ["L1", "D1"])
    assert set(want) <= set(ids) and len(want) == 41


def test_two_checks_end_to_end(tmp_path):
    """G18 (inverted dropout, keep p = 0.8) and G2 (orthogonal layer, gain 1.3) through the
    CLI; their CSV numbers against the closed forms: φ = 1/p and ϕ = (1 − p)/p³ within 4 SE,
    and ‖Wᵀv‖²/‖v‖² = γ² for every probe."""
    out = _run("G18", "G2", "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    p = 0.8
    rows = {r["quantity"]: r for r in _rows(tmp_path / "G18.csv")}
    for q, want in (("phi", 1 / p), ("varphi", (1 - p) / p**3)):
        r = rows[q]
        assert float(r["predicted"]) == pytest.approx(want, rel=1e-6)
        assert abs(float(r["measured"]) - want) < 4 * float(r["se"]), r
        assert int(r["n_inits"]) >= 32 and int(r["num_probes"]) == 4
    rows = {r["quantity"]: r for r in _rows(tmp_path / "G2.csv")}
    assert float(rows["per_probe_ratio_worst"]["measured"]) == pytest.approx(1.3**2, rel=1e-5)
    summary = _rows(tmp_path / "summary.csv")
    assert {r["id"] for r in summary} == {"G18", "G2"}
    assert all(r["verdict"] == "pass" for r in summary), summary
    assert math.isfinite(float(summary[0]["measured"]))


def test_unknown_id_is_a_clear_error(tmp_path):
    out = _run("G99", "--out", str(tmp_path))
    assert out.returncode != 0 and "unknown check id" in out.stderr


@pytest.mark.slow
def test_same_command_same_csv(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert _run("G1", "G12", "--out", str(d), "--no-progress").returncode == 0
    for name in ("G1.csv", "G12.csv"):
        assert (a / name).read_text() == (b / name).read_text()


def _leaky_relu_c_map(c, slope):
    """The C map of leaky ReLU (slope α) at unit q, closed form: with φ(x) = (1+α)/2·x +
    (1−α)/2·|x| and E|u||v| = (2/π)(√(1−c²) + c·arcsin c) for unit normals of
    correlation c, C(c) = [(1+α)²/4·c + (1−α)²/4·E|u||v|] / ((1+α²)/2)."""
    abs_uv = 2 / math.pi * (math.sqrt(1 - c * c) + c * math.asin(c))
    return ((1 + slope) ** 2 / 4 * c + (1 - slope) ** 2 / 4 * abs_uv) / ((1 + slope**2) / 2)


@pytest.mark.parametrize("depth", [20, 98, 200])
def test_tat_slope_meets_its_c0_target(depth):
    """C1's TAT baseline: the slope read off the dks package's transformed activation makes
    the depth-L chain's C map send 0 to TAT's target 0.9 (checked with the closed form,
    not the package's quadrature), and the config is orthogonal + gain at that slope."""
    pytest.importorskip("dks")
    from experiments.checks.calibration import tat_config, tat_leaky_relu_slope

    slope = tat_leaky_relu_slope(depth)
    c = 0.0
    for _ in range(depth):
        c = _leaky_relu_c_map(c, slope)
    assert 0 < slope < 1 and abs(c - 0.9) < 1e-3
    cfg = tat_config({"name": "serial_cnn", "depth": depth, "activation": "relu"})
    assert cfg["activation"] == "leaky_relu" and cfg["negative_slope"] == slope
    assert cfg["init"] == "delta_orthogonal" and cfg["gain"] is None
    # gain=None is the activation's gain, TAT's output scale √(2/(1+α²)) (q(1) = 1)
    gain = gne_jax.activation_gain("leaky_relu", negative_slope=slope)
    assert gain == pytest.approx(math.sqrt(2 / (1 + slope**2)), rel=1e-6)
