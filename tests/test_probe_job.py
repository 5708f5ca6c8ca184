"""The probe job end to end: files, columns, no overwrite, bad config, the CLI."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gne_jax.probes.job import CONFIG_KEYS, run_probe
from gne_jax.training.config import from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
    return from_file(str(ROOT / "configs" / "probe" / f"{name}.py"))


def tiny_quickstart():
    """The quickstart config (same sweep: 2 inits × 3 activations × 2 norms) at tiny size."""
    c = load_config("quickstart")
    c.model.depth = 8
    c.model.widths = (4, 4, 4)
    c.input_shape = (2, 8, 8, 3)
    c.num_inits = 2
    c.num_probes = 4
    return c


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quickstart_at_tiny_size_writes_results_and_never_overwrites(tmp_path):
    c = tiny_quickstart()
    rows = run_probe(c, str(tmp_path))
    for f in ("results.csv", "results.json", "phi_per_block.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    table = read_csv(tmp_path / "results.csv")
    assert len(table) == len(rows)
    expected_cols = {"variant", "model", "init", "activation", "negative_slope",
                     "normalization", "index", "block", "kind", "phi_mean", "phi_sem",
                     "phi_median", "phi_q05", "phi_q95", "varphi_mean", "varphi_sem",
                     "varphi_median", "varphi_pooled", "varphi_pooled_sem", "phi2_mean",
                     "n_inits"}
    assert expected_cols <= set(table[0]), expected_cols - set(table[0])
    variants = {r["variant"] for r in table}
    assert len(variants) == 12
    assert "leaky_relu(0.3) / orthogonal / batchnorm" in variants
    e2e = [r for r in table if r["kind"] == "end_to_end"]
    assert len(e2e) == 12
    blocks = [r for r in table if r["kind"] == "block"]
    # 6·1+2 = 8 weight layers: stem + 6 convs + head
    assert len(blocks) == 12 * 8
    phi = np.array([float(r["phi_mean"]) for r in table])
    assert np.all(np.isfinite(phi)) and np.all(phi > 0)
    assert all(int(r["n_inits"]) == 2 for r in table)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["num_inits"] == 2 and len(data["rows"]) == len(rows)
    # a run that fails in a workdir holding results leaves nothing behind
    bad = tiny_quickstart()
    bad.model.depth = -4
    with pytest.raises(ValueError, match="depth"):
        run_probe(bad, str(tmp_path))
    assert not list(tmp_path.glob("run-*"))
    # a second run into the same workdir goes to run-2 and leaves the first files alone
    before = (tmp_path / "results.csv").read_bytes()
    c.sweep.activation = [{"activation": "tanh", "label": "tanh"}]
    c.sweep.normalization = ["none"]
    run_probe(c, str(tmp_path))
    assert (tmp_path / "results.csv").read_bytes() == before
    assert len(read_csv(tmp_path / "run-2" / "results.csv")) == 2 * 9


def test_depth_sweep_plots_against_depth(tmp_path):
    c = load_config("depth_sweep")
    c.model.width = 8
    c.sweep.depth = [2, 4]
    c.input_shape = (2, 8)
    c.num_inits = 2
    c.num_probes = 4
    rows = run_probe(c, str(tmp_path))
    assert (tmp_path / "phi_vs_depth.png").exists()
    e2e = [r for r in rows if r["kind"] == "end_to_end"]
    assert sorted({r["depth"] for r in e2e}) == [2, 4]


def test_bad_config_and_workdir_fail_before_work(tmp_path):
    c = load_config("smoke")
    with c.unlocked():
        c.num_init = 3
    with pytest.raises(ValueError, match="unknown key.*num_init.*Valid keys"):
        run_probe(c, str(tmp_path / "a"))
    c = load_config("smoke")
    c.sweep.activation = ["swish"]
    with pytest.raises(ValueError, match="swish"):
        run_probe(c, str(tmp_path / "b"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(PermissionError, match="cannot be written"):
        run_probe(load_config("smoke"), str(not_a_dir / "sub"))
    assert not (tmp_path / "a" / "results.csv").exists()
    assert set(CONFIG_KEYS) == set(load_config("quickstart").keys())


def test_command_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GNE_JAX_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "gne_jax.probe", "--config", str(ROOT / "configs/probe/smoke.py"),
         "--workdir", str(tmp_path), "--config.num_inits=1", "--config.num_probes=2",
         "--config.sweep.normalization=('none',)"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worst block" in out.stdout
    table = read_csv(tmp_path / "results.csv")
    assert {r["n_inits"] for r in table} == {"1"}
    assert {r["normalization"] for r in table} == {"none"}  # a sweep axis set from the CLI
    bad = subprocess.run(
        [sys.executable, "-m", "gne_jax.probe", "--config", str(ROOT / "configs/probe/smoke.py"),
         "--workdir", str(tmp_path / "x"), "--config.nonexistent=1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode != 0 and "nonexistent" in bad.stderr
    # a bad value is one line naming it, not a traceback; overriding a field that a sweep
    # axis sets (and would silently replace) is refused, naming the axis to change
    for override, message in [("--config.model.depth=-4", "error: Config `depth` must be"),
                              ("--config.model.init=orthogonal", "the sweep axis 'init' sets")]:
        bad = subprocess.run(
            [sys.executable, "-m", "gne_jax.probe", "--config",
             str(ROOT / "configs/probe/smoke.py"), "--workdir", str(tmp_path), override],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr
    assert not list(tmp_path.glob("run-*"))  # neither failure left a run directory


def test_bdi_verdict_judges_body_blocks_from_the_input_side():
    from gne_jax.probes.job import bdi_verdict

    def row(i, name, phi, varphi=0.1):
        return {"index": i, "block": name, "phi_median": phi, "varphi_mean": varphi}

    ok = [row(0, "stem", 0.3), row(1, "b1", 1.1), row(2, "b2", 0.9), row(3, "head", 0.01)]
    assert bdi_verdict(ok) == "holds"  # stem/head change the width: not judged
    bad = [row(0, "stem", 1.0), row(1, "b1", 1.0), row(2, "b2", 2.0), row(3, "b3", 0.1)]
    assert bdi_verdict(bad) == "breaks at b2 (phi 2)"
    spread = [row(1, "b1", 1.0, varphi=3.0), row(2, "b2", 5.0)]
    assert bdi_verdict(spread) == "breaks at b1 (varphi 3)"


def test_input_shape_entries_are_checked_before_any_work(tmp_path):
    for shape, entry in [((-2, 8, 8, 3), "entry 0 is -2"), ((2, -8, 8, 3), "entry 1 is -8"),
                         ((2, 8, 0, 3), "entry 2 is 0"), ((2, 8.5, 8, 3), "entry 1 is 8.5")]:
        c = load_config("smoke")
        c.input_shape = shape
        with pytest.raises(ValueError, match=rf"^input_shape=.*: {entry}; expected positive"):
            run_probe(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def _fake_sweep(monkeypatch):
    """run_probe without compiling: one variant of two blocks (what a sweep returns)."""
    from types import SimpleNamespace

    from gne_jax.probes import job

    def rows(result):
        return [{"index": i, "block": f"b{i}", "kind": "block", "phi_median": 1.0,
                 "varphi_mean": 0.1, "varphi_pooled": 0.1} for i in range(2)]

    monkeypatch.setattr(job, "run_sweep", lambda *a, **k: [
        SimpleNamespace(label="v", config={"name": "serial_cnn"}, result=None)])
    monkeypatch.setattr(job, "result_rows", rows)
    return job


def test_interrupted_or_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    job = _fake_sweep(monkeypatch)
    plot = job.plot_results

    def interrupted_plot(*a, **k):
        raise KeyboardInterrupt

    # A workdir the run created (with its parent) is removed again.
    monkeypatch.setattr(job, "plot_results", interrupted_plot)
    with pytest.raises(KeyboardInterrupt):
        run_probe(load_config("smoke"), str(tmp_path / "new" / "w"))
    assert not (tmp_path / "new").exists()
    # A workdir that existed stays, without a partial run in it.
    (tmp_path / "mine").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_probe(load_config("smoke"), str(tmp_path / "mine"))
    assert list((tmp_path / "mine").iterdir()) == []
    # A complete first run, then an interrupted second: no run-2, the first run intact.
    monkeypatch.setattr(job, "plot_results", plot)
    root = tmp_path / "w"
    run_probe(load_config("smoke"), str(root))
    first = {p.name: p.read_bytes() for p in root.iterdir()}
    assert set(first) == {"results.csv", "results.json", "phi_per_block.png"}
    monkeypatch.setattr(job, "plot_results", interrupted_plot)
    with pytest.raises(KeyboardInterrupt):
        run_probe(load_config("smoke"), str(root))
    monkeypatch.setattr(job, "write_results", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_probe(load_config("smoke"), str(root))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == first
    # The same command, uninterrupted, writes a complete run-2.
    monkeypatch.undo()
    job = _fake_sweep(monkeypatch)
    run_probe(load_config("smoke"), str(root))
    assert sorted(p.name for p in (root / "run-2").iterdir()) == [
        "phi_per_block.png", "results.csv", "results.json"]
    assert sorted(p.name for p in root.iterdir()) == sorted([*first, "run-2"])


def test_publishing_is_atomic_against_a_concurrent_run_and_odd_paths(tmp_path, monkeypatch):
    """Two runs that finish together into one empty workdir: one takes the workdir (claimed
    by creating results.csv exclusively), the other goes to run-2, each whole. A failed
    run's clean-up does not break a concurrent run of the same new workdir, and a workdir
    written with '..' leaves none of the folders it made."""
    from gne_jax.probes import job

    root = tmp_path / "wd"
    root.mkdir()

    def finished(tag):
        t = job._new_partial_dir(root)
        for n in ("phi_per_block.png", "results.json", "results.csv"):
            (t / n).write_text(tag)
        return t

    a, b = finished("A"), finished("B")
    real, where = os.replace, {}

    def interleaved(src, dst):  # B publishes right after A's first file is moved
        real(src, dst)
        if not where and str(src).startswith(str(a)):
            where["B"] = job.publish_run(b, root)

    monkeypatch.setattr(os, "replace", interleaved)
    where["A"] = job.publish_run(a, root)
    monkeypatch.setattr(os, "replace", real)
    assert sorted(where.values()) == sorted([root, root / "run-2"])
    for tag, folder in where.items():
        assert {p.read_text() for p in folder.iterdir() if p.is_file()} == {tag}
        assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [
            "phi_per_block.png", "results.csv", "results.json"]

    new = tmp_path / "new"
    made_a, made_b = job._missing_dirs(new), job._missing_dirs(new)
    job.prepare_workdir(new)
    job._remove_empty(made_a)  # run A failed; run B is still computing
    assert job._new_partial_dir(new).is_dir()
    del made_b

    monkeypatch.chdir(tmp_path)
    made = job._missing_dirs(pathlib.Path("x/../y"))
    job.prepare_workdir("x/../y")
    job._remove_empty(made)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_command_line_reports_a_bad_config_file_in_one_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GNE_JAX_CACHE_DIR": str(tmp_path / "cache")}
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "two.py").write_text("def get_config(a, b):\n    return None\n")
    cases = [("configs/probe/nope.py", "error: --config: configs/probe/nope.py: no such file"),
             (str(tmp_path / "syntax.py"), "syntax.py: syntax error at line 1"),
             (str(tmp_path / "empty.py"), "empty.py: defines no get_config()"),
             ("configs/probe/smoke.py:x", "get_config() cannot take the one argument ':x'"),
             (str(tmp_path / "two.py") + ":x", "get_config(a, b) cannot take the one argument"),
             # absl reads the last --config: the first one is not what is checked
             ("configs/probe/smoke.py --config configs/probe/nope.py", "nope.py: no such file")]
    for config, message in cases:
        bad = subprocess.run(
            [sys.executable, "-m", "gne_jax.probe", *sum((["--config", c] for c in
                                                          config.split(" --config ")), []),
             "--workdir", str(tmp_path / "w"), "--config.num_inits=1"],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert bad.returncode == 1, bad.stderr[-2000:]
        assert bad.stderr.strip().splitlines() == [bad.stderr.strip()], bad.stderr[-2000:]
        assert message in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "w").exists()
