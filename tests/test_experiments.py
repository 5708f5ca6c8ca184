"""`python -m experiments` end to end on two cheap checks, against the closed forms."""

import csv
import math
import os
import subprocess
import sys

import pytest

import gne_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _arg_error(out, arg):
    """A one-line argparse error naming ``arg`` (exit status 2), no traceback."""
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m experiments: error: ") and arg in last, out.stderr


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


@pytest.mark.parametrize("args, arg", [(("G1", "--all"), "--all"), (("--list", "G1"), "--list"),
                                       (("--list", "--all"), "--list")])
def test_ids_with_all_or_list_are_refused(tmp_path, args, arg):
    """`G1 --all` ran all 42 checks (and overwrote experiments/REPORT.md); `--list G1` listed
    everything. Both are argument errors now (--out/--report keep the repo out of it even if
    the check regressed; the short timeout stops a full run)."""
    out = _run(*args, "--out", str(tmp_path / "o"), "--report", str(tmp_path / "r.md"),
               timeout=120)
    _arg_error(out, arg)
    assert "can't be combined" in out.stderr and not out.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.md").exists()


def _bad_outs(tmp_path):
    f = tmp_path / "results.csv"
    f.write_text("keep me\n")
    bad = [str(f), str(f / "sub"), "/dev/null", ""]
    if os.path.isdir("/proc"):
        bad.append("/proc/experiments-test")
    return f, bad


def test_bad_out_is_a_clear_error_before_any_check(tmp_path):
    """A file, /dev/null, a path below a file, /proc/x and '' (which silently meant the
    default folder) are refused with one line naming --out; nothing is run or written. The
    run's cwd is tmp_path, so a regression to the default folder shows as tmp_path/runs."""
    f, bad = _bad_outs(tmp_path)
    for o in bad:
        out = _run("G1", "--out", o, "--no-progress", cwd=tmp_path)
        _arg_error(out, "argument --out")
        assert not out.stdout, (o, out.stdout)
    assert f.read_text() == "keep me\n" and not (tmp_path / "runs").exists()


def test_bad_report_is_refused_before_any_check(tmp_path):
    """`--report` in a folder that does not exist ran every check, then crashed in
    write_report; now one line naming --report, before the output folder is created."""
    for rep in (tmp_path / "missing" / "r.md", tmp_path, ""):
        out = _run("G1", "--out", str(tmp_path / "o"), "--report", str(rep), "--no-progress")
        _arg_error(out, "argument --report")
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", [str(2**70), str(2**32), "-1"])
def test_seed_out_of_range_is_an_argument_error(tmp_path, seed):
    """2**70 became an OverflowError row of the check; 2**32 gave seed 0's key; -1 is
    refused by NumPy (C1's data)."""
    out = _run("G1", "--seed", seed, "--out", str(tmp_path), "--no-progress")
    _arg_error(out, "argument --seed")
    assert "2**32" in out.stderr and not (tmp_path / "summary.csv").exists()


def test_seed_bounds():
    from experiments.cli import _seed

    assert _seed("0") == 0 and _seed(str(2**32 - 1)) == 2**32 - 1
    import argparse

    for bad in ("-1", str(2**32), "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed(bad)


def test_duplicate_ids_run_once(tmp_path):
    out = _run("G1", "G1", "--out", str(tmp_path), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sum(line.startswith("G1 ") for line in out.stdout.splitlines()) == 1, out.stdout
    assert [r["quantity"] for r in _rows(tmp_path / "summary.csv")] == ["φ(JJᵀ)", "ϕ(JJᵀ)"]


def test_summary_merges_and_report_describes_this_run(tmp_path):
    """A run of G1 into a folder whose summary.csv holds G2 (another run) and a stale G1
    row: G1's rows are replaced, G2's kept verbatim, registry order (G1 before G2). The
    report covers this run only, names the kept ids and describes the machine it ran on
    (not a hard-coded '2-core VM')."""
    fields = ["id", "paper", "quantity", "predicted", "measured", "se", "z", "rel_err",
              "tolerance", "verdict", "note"]
    g2 = ["G2", "Chen et al. 2020 (GNE)", "per_probe_ratio_worst", "1.69", "1.69", "", "",
          "0", "rel ≤ 1e-05", "pass", "from an earlier run"]
    stale = ["G1", "Chen et al. 2020 (GNE)", "stale", "1", "9", "", "", "", "", "fail", ""]
    with open(tmp_path / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([fields, g2, stale])
    rep = tmp_path / "rep" / "r.md"
    rep.parent.mkdir()
    out = _run("G1", "--out", str(tmp_path), "--report", str(rep), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _rows(tmp_path / "summary.csv")
    assert [(r["id"], r["quantity"]) for r in rows] == [
        ("G1", "φ(JJᵀ)"), ("G1", "ϕ(JJᵀ)"), ("G2", "per_probe_ratio_worst")]
    assert list(rows[-1].values()) == g2
    text = rep.read_text()
    assert "2-core VM" not in text and f"on {os.cpu_count()} CPU cores, JAX backend" in text
    assert "keeps earlier runs' rows of G2" in text and "- checks: 1;" in text


def test_foreign_summary_is_kept_and_refused(tmp_path):
    """A summary.csv that this tool did not write is neither merged nor overwritten."""
    (tmp_path / "summary.csv").write_text("a,b\n1,2\n")
    out = _run("G1", "--out", str(tmp_path), "--no-progress")
    _arg_error(out, "argument --out")
    assert (tmp_path / "summary.csv").read_text() == "a,b\n1,2\n"
    assert not (tmp_path / "G1.csv").exists()


def test_m2_no_float64_truncation_warning(tmp_path):
    """M2 computed isometry(X) of its float64 X outside enable_x64: JAX warned that float64
    was truncated to float32 (and the CSV's isometry_X was the float32 number)."""
    import warnings

    import jax
    import jax.numpy as jnp

    from experiments.checks.bn_isometry import theorem3
    from experiments.registry import Context
    from gne_jax.theory import bn_isometry as bi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = theorem3(Context("M2", "small", str(tmp_path)))
    trunc = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert not trunc, trunc
    assert rows[0].verdict == "pass"
    with jax.enable_x64(True):
        k = jax.random.fold_in(jax.random.key(0), 80)
        X = bi.meterez_bn(jax.random.normal(jax.random.split(k)[0], (16, 16), jnp.float64))
        want = float(bi.isometry(X))
    assert float(_rows(tmp_path / "M2.csv")[0]["isometry_X"]) == pytest.approx(want, rel=1e-7)


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
