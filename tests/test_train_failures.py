"""Failures of a training run: bad values refused before any work (library and CLI), a
finite-loss divergence of the state stopping with the last good checkpoint, resuming with
recorded changes, extending a finished run, workdir problems."""

import collections
import json
import os
import struct
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
from gne_jax.training.metrics import MetricsWriter

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


# Values wrong only together with another field, and limits set by the split sizes
# (small_config: 256 training and 64 eval images).
BAD_COMBINATIONS = [
    ({"moments_every_steps": 4, "moments_num_probes": 1},
     r"config\.moments_num_probes=1 must be an integer >= 2"),
    ({"optimizer.warmup_epochs": 1.0, "optimizer.warmup_init_factor": -1.0},
     r"config\.optimizer\.warmup_init_factor=-1\.0 must be a finite number >= 0"),
    ({"optimizer.warmup_epochs": 1.0, "optimizer.warmup_init_factor": 1.5},
     r"config\.optimizer\.warmup_init_factor=1\.5 must be a finite number <= 1"),
    ({"optimizer.lr_boundaries_epochs": (-1.0, 0.5)},
     r"config\.optimizer\.lr_boundaries_epochs=\(-1\.0, 0\.5\) must be a sequence of epochs "
     r"> 0 in strictly increasing order"),
    ({"optimizer.lr_boundaries_epochs": (2.0, 1.0)},
     r"lr_boundaries_epochs=\(2\.0, 1\.0\) must be .* strictly increasing"),
    ({"moments_every_steps": 4, "moments_batch": 65},
     r"config\.moments_batch=65 exceeds the eval split size 64"),
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


@pytest.mark.parametrize("settings,match", BAD_COMBINATIONS)
def test_bad_combination_is_named_before_any_work(settings, match, tmp_path, no_compile):
    c = small_config()
    for key, value in settings.items():
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
        message = cli.config_error(argv)
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
             ["--config.dataset.image_size=0"], ["--config.optimizer.learning_rate=-1"],
             ["--config.moments_every_steps=4", "--config.moments_num_probes=1"],
             ["--config.optimizer.warmup_init_factor=-1.0"]]
    script = _CLI.format(cases=cases, workdir=tmp_path / "w")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("CASE")]
    assert len(lines) == len(cases), out.stdout
    want = ["config has no field 'foo'", "did you mean --config.optimizer.learning_rate",
            "error: config.eval_every_epochs=0", "error: config.seed=-1",
            "error: config.dataset.image_size=0", "error: config.optimizer.learning_rate=-1",
            "error: config.moments_num_probes=1 must be an integer >= 2",
            "error: config.optimizer.warmup_init_factor=-1.0 must be"]
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


# --------------------------------------------------------------------------- logs on resume

_TIMING = ("step_time_s", "images_per_s")  # wall-clock: differ between any two runs


def _tensorboard_scalars(workdir):
    """``{(tag, step): value}`` of every scalar in every event file of ``workdir``.

    Read raw, as any reader sees the files (no purge rule applied); fails if a (tag, step)
    occurs twice.
    """
    from tensorboardX.proto import event_pb2

    events = []
    tbdir = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(tbdir)):
        with open(os.path.join(tbdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):  # records: length (8), crc (4), event, crc (4)
            (n,) = struct.unpack("<Q", data[i:i + 8])
            e = event_pb2.Event()
            e.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            events += [(v.tag, e.step, v.simple_value) for v in e.summary.value]
    shown = collections.Counter((tag, step) for tag, step, _ in events)
    assert max(shown.values()) == 1, [k for k, c in shown.items() if c > 1]
    return {(tag, step): v for tag, step, v in events if tag not in _TIMING}


def _purge_steps(workdir):
    """Steps of the ``SessionLog.START`` events (tensorboardX's ``purge_step`` markers)."""
    from tensorboardX.proto import event_pb2

    tbdir = os.path.join(workdir, "tensorboard")
    steps = []
    for name in sorted(os.listdir(tbdir)):
        with open(os.path.join(tbdir, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            e = event_pb2.Event()
            e.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
                steps.append(e.step)
    return steps


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _metric_rows(workdir):
    """metrics.jsonl without the timing columns; checks metrics.csv holds the same rows."""
    rows = [{k: v for k, v in r.items() if k not in _TIMING}
            for r in _jsonl(os.path.join(workdir, "metrics.jsonl"))]
    with open(os.path.join(workdir, "metrics.csv")) as f:
        csv_steps = [int(line.split(",", 1)[0]) for line in f.readlines()[1:]]
    assert csv_steps == [r["step"] for r in rows]
    return rows


def test_resume_rewrites_every_log_after_the_checkpoint(tmp_path):
    # A finished run whose latest checkpoint (24) is deleted, as if killed after step 23:
    # the rerun resumes from the checkpoint at 12 (mid-epoch) and rewrites the epoch rows
    # at 16 and 24 and the moments rows at 16, 20, 24. Every log then equals the straight
    # run's, each step once.
    kw = {"num_epochs": 3, "checkpoint_every_steps": 12, "moments_every_steps": 4,
          "moments_batch": 2, "moments_num_probes": 2, "tensorboard": True}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = train.train_and_evaluate(small_config(**kw), a, model=TinyCNN())
    train.train_and_evaluate(small_config(**kw), b, model=TinyCNN())
    ckpt = Checkpointer(b)
    assert ckpt.latest_step() == 24
    ckpt.manager.delete(24)
    ckpt.close()
    resumed = train.train_and_evaluate(small_config(**kw), b, model=TinyCNN())
    for x, y in zip(jax.tree.leaves(straight.state.params),
                    jax.tree.leaves(resumed.state.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [r["step"] for r in _metric_rows(b)] == [8, 16, 24]
    assert _metric_rows(b) == _metric_rows(a)
    moments_a, moments_b = (_jsonl(os.path.join(w, "moments.jsonl")) for w in (a, b))
    assert [r["step"] for r in moments_b] == [4, 8, 12, 16, 20, 24]
    assert moments_b == moments_a
    tb_a, tb_b = _tensorboard_scalars(a), _tensorboard_scalars(b)
    assert sorted({step for _, step in tb_b}) == [8, 16, 24]
    assert tb_b == tb_a
    assert _purge_steps(b) == [12]  # for TensorBoard: rows from step 12 on were rewritten
    ga, gb = (np.load(os.path.join(w, "grad_norms.npz")) for w in (a, b))
    np.testing.assert_array_equal(gb["steps"], np.arange(24))
    np.testing.assert_array_equal(ga["values"], gb["values"])


def test_extending_a_run_stopped_mid_epoch_equals_the_longer_run(tmp_path):
    # 12 steps = 1.5 epochs (8 steps per epoch), then the same command with 16 steps: the
    # row of the partial epoch at step 12 is replaced by the row of the whole epoch at 16
    # (training sums over steps 9-16, carried in the checkpoint), as in the straight run.
    kw = {"tensorboard": True, "optimizer.schedule": "constant"}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    straight = train.train_and_evaluate(small_config(**kw, num_train_steps=16), a,
                                        model=TinyCNN())
    short = train.train_and_evaluate(small_config(**kw, num_train_steps=12), b, model=TinyCNN())
    assert [(r["step"], r["epoch"]) for r in short.history] == [(8, 1), (12, 1.5)]
    extended = train.train_and_evaluate(small_config(**kw, num_train_steps=16), b,
                                        model=TinyCNN())
    for x, y in zip(jax.tree.leaves(straight.state.params),
                    jax.tree.leaves(extended.state.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [r["step"] for r in _metric_rows(b)] == [8, 16]
    assert _metric_rows(b) == _metric_rows(a)
    assert [{k: v for k, v in r.items() if k not in _TIMING} for r in extended.history] == \
        _metric_rows(a)
    assert _tensorboard_scalars(b) == _tensorboard_scalars(a)
    assert _purge_steps(b) == [12]  # the row at 12 itself is rewritten (at 16)


@pytest.mark.parametrize("keep_row", [True, False])
def test_truncate_drops_later_rows_from_every_log(keep_row, tmp_path):
    # Rows at 8, 16, 24 and moments at 12, 24 logged, the event file ending in half a
    # record (killed mid-write); a resume from the checkpoint at 16 keeps the rows up to 16
    # (or up to 8 when the row at 16 is a partial epoch that is rewritten) and the moments
    # up to 16, in every file; TensorBoard is off for the resumed run, yet the earlier
    # event file must lose the dropped rows.
    w = str(tmp_path)
    first = MetricsWriter(w, tensorboard=True)
    for step in (8, 16, 24):
        first.write({"step": step, "epoch": step / 8, "train_loss": 1.0 / step})
    for step in (12, 24):
        first.write_moments({"step": step, "phi": float(step)})
    first.close()
    (event_file,) = os.listdir(os.path.join(w, "tensorboard"))
    with open(os.path.join(w, "tensorboard", event_file), "ab") as f:
        f.write(struct.pack("<Q", 100) + b"\0" * 10)
    resumed = MetricsWriter(w, tensorboard=False)
    resumed.truncate(16, keep_row_at_step=keep_row)
    resumed.close()
    kept = [8, 16] if keep_row else [8]
    assert [r["step"] for r in _metric_rows(w)] == kept
    assert [r["step"] for r in _jsonl(os.path.join(w, "moments.jsonl"))] == [12]
    assert sorted({step for _, step in _tensorboard_scalars(w)}) == kept
    assert not [n for d in (w, os.path.join(w, "tensorboard")) for n in os.listdir(d)
                if n.endswith(".tmp")]


def test_command_line_reports_a_bad_config_file_in_one_line(tmp_path):
    """A missing file, a file that is not Python and an unknown config argument: one line
    naming --config and the file, exit status 1, no traceback, no workdir."""
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    cases = [("configs/train/nope.py", "error: --config: configs/train/nope.py: no such file"),
             (str(tmp_path / "syntax.py"), "syntax.py: syntax error at line 1"),
             ("configs/train/cifar10_resnet56_smoke.py:foo",
              "error: --config: configs/train/cifar10_resnet56_smoke.py: cifar10_resnet56 run "
              "'foo' is unknown; use e.g. bn")]
    for config, message in cases:
        bad = subprocess.run([sys.executable, "-m", "gne_jax.train", f"--config={config}",
                              f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                             cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
        assert bad.returncode == 1, bad.stderr[-2000:]
        assert bad.stderr.strip().splitlines() == [bad.stderr.strip()], bad.stderr[-2000:]
        assert message in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "w").exists()
