"""Failures of a training run: bad values refused before any work (library and CLI), a
finite-loss divergence of the state stopping with the last good checkpoint, resuming with
recorded changes, extending a finished run, workdir problems."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gne_jax.training import train
from gne_jax.training.checkpoint import Checkpointer, NonFiniteError, all_finite

jax.config.update("jax_disable_most_optimizations", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_train import TinyCNN, small_config  # noqa: E402

BAD_VALUES = [
    ("eval_every_epochs", 0, r"config\.eval_every_epochs=0 must be an integer >= 1"),
    ("log_every_steps", 0, r"config\.log_every_steps=0 must be an integer >= 1"),
    ("num_epochs", 0, r"config\.num_epochs=0 must be a finite number > 0"),
    ("optimizer.learning_rate", -0.1, r"config\.optimizer\.learning_rate=-0\.1 must be .* > 0"),
    ("seed", -1, r"config\.seed=-1 must be an integer >= 0"),
    ("dataset.image_size", 0, r"config\.dataset\.image_size=0 must be an integer >= 1"),
    ("dataset.num_classes", 0, r"config\.dataset\.num_classes=0 must be an integer >= 1"),
    ("checkpoint_every_steps", -1, r"config\.checkpoint_every_steps=-1 must be"),
    ("optimizer.momentum", 1.5, r"config\.optimizer\.momentum=1\.5 must be .* < 1"),
    ("unroll_scans", "sometimes", r"config\.unroll_scans='sometimes' is unknown"),
    ("dataset.name", "image_folder", r"config\.dataset\.path='' is not a directory"),
    ("foo", 1, r"config field\(s\) \['foo'\] are unknown"),
]


def _set(c, key, value):
    node = c
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    with node.unlocked() if isinstance(node, ml_collections.ConfigDict) else nullcontext():
        node[last] = value


class nullcontext:  # noqa: N801
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if training gets as far as initializing (compiling) the model."""

    def boom(*a, **k):
        raise AssertionError("compiled before the bad value was reported")

    monkeypatch.setattr(train, "create_train_state", boom)


@pytest.mark.parametrize("key,value,match", BAD_VALUES)
def test_bad_value_is_named_before_any_work(key, value, match, tmp_path, no_compile):
    c = small_config()
    _set(c, key, value)
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_workdir_that_is_a_file_is_refused(tmp_path, no_compile):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"--workdir=.*file.* is a file, not a directory"):
        train.train_and_evaluate(small_config(), str(f), model=TinyCNN())


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_unwritable_workdir_is_refused(tmp_path, no_compile):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"--workdir=.*ro.* is not writable"):
            train.train_and_evaluate(small_config(), str(d / "sub"), model=TinyCNN())
    finally:
        d.chmod(0o700)


def test_workdir_stays_usable_after_a_bad_value(tmp_path):
    w = str(tmp_path / "w")
    with pytest.raises(ValueError, match="eval_every_epochs"):
        train.train_and_evaluate(small_config(eval_every_epochs=0), w, model=TinyCNN())
    result = train.train_and_evaluate(small_config(num_epochs=1), w, model=TinyCNN())
    assert [r["step"] for r in result.history] == [8]


@jax.custom_vjp
def _silent(p):
    """Returns 0 whatever ``p`` is; its gradient is -1 until p > 0.42, then +inf."""
    return jnp.zeros(())


def _silent_fwd(p):
    return jnp.zeros(()), p


def _silent_bwd(p, ct):
    return (jnp.where(p > 0.42, jnp.inf, -1.0) * jnp.ones_like(p),)


_silent.defvjp(_silent_fwd, _silent_bwd)


class DivergingCNN(nn.Module):
    """TinyCNN plus a scalar that never touches the loss but whose update overflows."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.param("drift", nn.initializers.zeros, ())
        return TinyCNN(norm="none")(x, train) + _silent(p)


def test_state_divergence_with_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    # lr 0.05, gradient -1: drift = 0.05 k after k steps, so the gradient of step 9
    # (drift 0.45) is +inf and the state after step 9 holds -inf while every loss is finite.
    c = small_config(**{"optimizer.clip": "none", "log_every_steps": 2,
                        "checkpoint_every_steps": 4, "optimizer.momentum": 0.0,
                        "optimizer.weight_decay": 0.0})
    with pytest.raises(NonFiniteError,
                       match=r"non-finite parameters .*loss was finite.* at step 9 .*"
                             r"last good checkpoint \(step 8\)"):
        train.train_and_evaluate(c, str(tmp_path), model=DivergingCNN())
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 8
    state, meta = ckpt.restore(None)
    assert all_finite(state) and meta["step"] == 8
    np.testing.assert_allclose(state["params"]["drift"], 0.4, rtol=1e-6)
    ckpt.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [8]
    # The corrected run resumes from the good checkpoint with the change recorded.
    c.optimizer.learning_rate = 0.002  # drift reaches 0.416 < 0.42 by step 16
    with pytest.raises(FileExistsError, match=r"resume_with_changes=True"):
        train.train_and_evaluate(c, str(tmp_path), model=DivergingCNN())
    c.resume_with_changes = True
    result = train.train_and_evaluate(c, str(tmp_path), model=DivergingCNN())
    assert [r["step"] for r in result.history] == [8, 16]
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert saved["optimizer"]["learning_rate"] == 0.002
    assert saved["config_history"] == [
        {"step": 8, "changes": {"optimizer.learning_rate": [0.05, 0.002]}}]


def test_extending_a_finished_run_equals_the_longer_run(tmp_path):
    straight = train.train_and_evaluate(small_config(num_epochs=2), str(tmp_path / "a"),
                                        model=TinyCNN())
    train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path / "b"), model=TinyCNN())
    extended = train.train_and_evaluate(small_config(num_epochs=2), str(tmp_path / "b"),
                                        model=TinyCNN())
    for a, b in zip(jax.tree.leaves(straight.state.params),
                    jax.tree.leaves(extended.state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in extended.history] == [8, 16]
    with open(tmp_path / "b" / "config.json") as f:
        assert json.load(f)["config_history"] == [{"step": 8, "changes": {"num_epochs": [1, 2]}}]
    # Nothing left to do: a second call returns at once with the same rows.
    again = train.train_and_evaluate(small_config(num_epochs=2), str(tmp_path / "b"),
                                     model=TinyCNN())
    assert [r["step"] for r in again.history] == [8, 16]


_CLI = textwrap.dedent("""
    import sys
    from absl import flags
    from gne_jax import train as cli
    cli.define_flags()
    for extra in {cases!r}:
        argv = ["gne-train", "--config=configs/train/synthetic_smoke.py",
                "--workdir={workdir}", *extra]
        message = cli.unknown_override(argv)
        if message is None:
            flags.FLAGS.unparse_flags()
            sys.argv = argv  # ml_collections reads the overrides from sys.argv
            flags.FLAGS(argv)
            try:
                cli.main(argv[:1])
                message = "ok"
            except SystemExit as e:
                message = str(e.code)
        print("CASE", repr(extra), "->", message.replace(chr(10), " "))
""")


def test_command_line_names_the_bad_field(tmp_path):
    """The CLI's messages (one subprocess for all cases; no model is compiled)."""
    (tmp_path / "file").write_text("x")
    cases = [["--config.foo=1"], ["--config.optimizer.learnng_rate=1"],
             ["--config.eval_every_epochs=0"], ["--config.seed=-1"],
             ["--config.dataset.image_size=0"], ["--config.optimizer.learning_rate=-1"]]
    script = _CLI.format(cases=cases, workdir=tmp_path / "w")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("CASE")]
    assert len(lines) == len(cases), out.stdout
    want = ["config has no field 'foo'", "did you mean --config.optimizer.learning_rate",
            "error: config.eval_every_epochs=0", "error: config.seed=-1",
            "error: config.dataset.image_size=0", "error: config.optimizer.learning_rate=-1"]
    for line, w in zip(lines, want, strict=True):
        assert w in line, line
    assert not os.path.exists(tmp_path / "w" / "config.json")
    # The real entry point: exit status and no traceback.
    bad = subprocess.run([sys.executable, "-m", "gne_jax.train", f"--workdir={tmp_path / 'file'}",
                          "--config=configs/train/synthetic_smoke.py"], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         timeout=300)
    assert bad.returncode != 0 and "is a file, not a directory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_resume_into_a_different_model_fails_clearly_and_keeps_config_json(tmp_path):
    train.train_and_evaluate(small_config(num_epochs=1), str(tmp_path), model=TinyCNN())
    with open(tmp_path / "config.json") as f:
        before = f.read()
    with pytest.raises(ValueError, match="does not fit the configured model.*new --workdir"):
        train.train_and_evaluate(small_config(num_epochs=2), str(tmp_path),
                                 model=TinyCNN(width=4))
    with open(tmp_path / "config.json") as f:
        assert f.read() == before
