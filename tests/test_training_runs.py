"""Aggregation of run directories into the papers' figures (fake runs with known numbers)."""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training_runs.figures import aggregate, last_mean_2sigma, run_dirs, slug  # noqa: E402
from training_runs.groups import GROUPS, run_config  # noqa: E402


def _fake_run(d, acc, loss, grads):
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for e, (a, lo) in enumerate(zip(acc, loss, strict=True)):
            f.write(json.dumps({"step": e + 1, "epoch": e + 1, "eval_accuracy": a,
                                "train_loss": lo}) + "\n")
    np.savez(os.path.join(d, "grad_norms.npz"), names=np.array(["a", "b", "c"]),
             steps=np.arange(len(grads)), values=np.asarray(grads))


def test_legend_is_mean_of_last_10_plus_two_sigma():
    rng = np.random.default_rng(0)
    acc = rng.uniform(50, 60, (3, 14))
    m, s2 = last_mean_2sigma(acc)
    assert np.isclose(m, acc[:, -10:].mean())
    assert np.isclose(s2, 2 * np.mean([np.std(acc[:, e], ddof=1) for e in range(4, 14)]))
    assert last_mean_2sigma(acc[:1])[1] == 0.0


def test_aggregate_writes_the_figures_and_summary(tmp_path):
    out = str(tmp_path)
    rng = np.random.default_rng(1)
    for label in ("BN", "SMN"):
        for seed in range(2):
            _fake_run(os.path.join(out, "normalization", slug(label), f"seed{seed}"),
                      list(rng.uniform(0.4, 0.9, 12)), list(rng.uniform(0.1, 2, 12)),
                      rng.uniform(1e-4, 1e-2, (5, 3)))
    assert len(run_dirs(out, "normalization", "BN")) == 2
    paths = aggregate(out, "normalization", ["BN", "SMN", "sWS"])  # sWS: no runs yet
    assert {"accuracy", "gradients", "loss", "summary"} <= set(paths)
    with open(paths["summary"]) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("label,repeats,epochs") and len(lines) == 3


def test_small_configs_are_valid():
    from gne_jax.training.train import validate_config

    for group, runs in GROUPS.items():
        for run in runs:
            c = run_config(group, run, size="small", dataset=None, seed=0)
            c.dataset.name = "synthetic"
            validate_config(c)
            assert c.num_epochs == 15


def test_small_imagenet_group_is_the_cpu_resnet50_on_an_npz(tmp_path):
    """The ImageNet group's small version: ResNet-50's configs shrunk to a bottleneck
    ResNet-14 on 32×32 images of the given .npz, no decoding workers; the paper size keeps
    the config file (ImageNet, ResNet-50, 90 epochs, batch 256)."""
    import jax
    import jax.numpy as jnp

    from gne_jax.training import train

    path = str(tmp_path / "d.npz")
    np.savez(path, x_train=np.zeros((8, 8, 8), np.uint8), y_train=np.arange(8) % 4,
             x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.arange(4))
    labels = [r.label for r in GROUPS["imagenet"]]
    assert labels == ["BN", "BN + mixup", "SMN", "SMN + mixup"]
    for run in GROUPS["imagenet"]:
        small = run_config("imagenet", run, size="small", dataset=path, seed=1)
        paper = run_config("imagenet", run, size="paper", dataset=None, seed=1,
                           data_dir=str(tmp_path))
        assert (small.dataset.name, small.dataset.path, small.dataset.channels) == ("npz", path, 1)
        assert small.dataset.image_size == 32 and small.loader_workers == 0
        assert tuple(small.model.stage_sizes) == (1, 1, 1, 1) and small.batch_size == 64
        assert small.mixup_alpha == paper.mixup_alpha == (0.2 if "mixup" in run.label else 0.0)
        assert small.model.normalization == paper.model.normalization
        assert paper.dataset.name == "imagenet2012" and paper.num_epochs == 90
        assert paper.dataset.data_dir == str(tmp_path) and paper.loader_workers == 8
        assert tuple(paper.model.stage_sizes) == (3, 4, 6, 3) and paper.batch_size == 256
    # 32×32 inputs: the stem (÷4) and three strided stages (÷8) end at 1×1, then 10 logits.
    model = train.create_model(small, 10)
    x = jnp.zeros((2, 32, 32, 1))
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    kernels = [a for a in jax.tree.leaves(v["params"]) if a.ndim == 4]
    assert len(kernels) == 1 + 4 * 3 + 4  # stem, 3 convs per block, 4 projection shortcuts
    assert jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x).shape == (2, 10)


def _main(argv, capsys):
    """``python -m training_runs`` in process: (exit status, stdout, stderr)."""
    import pytest

    from training_runs.__main__ import main

    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_bad_run_arguments_are_one_line_errors_before_anything_is_created(tmp_path, capsys):
    out = str(tmp_path / "out")
    for args, message in [
            (["--only", "XX"], "error: argument --only: 'XX' is not a run of group "
                               "'normalization'; expected labels among ['BN', 'SMN'"),
            (["--repeats", "0"], "error: argument --repeats: expected a positive integer, "
                                 "got '0'"),
            (["--repeats", "-2"], "error: argument --repeats: expected a positive integer, "
                                  "got '-2'"),
            (["--dataset", "/nope.npz"], "error: argument --dataset: '/nope.npz' does not exist"),
            (["--dataset", str(tmp_path)], "error: normalization | BN: config.dataset.path=")]:
        code, stdout, stderr = _main(["run", "normalization", "--out", out, *args], capsys)
        assert code == 2, (args, stderr)
        assert stderr.startswith(message) and stderr.count("\n") == 1, (args, stderr)
        assert not os.path.exists(out), args


def test_a_failed_training_run_exits_nonzero_after_the_others(tmp_path, capsys, monkeypatch):
    from gne_jax.training import train

    done = []

    def fake_train(config, workdir):
        if "smn" in workdir:
            raise FloatingPointError("diverged")
        if not os.path.exists(workdir):
            _fake_run(workdir, [0.5] * 12, [1.0] * 12, np.ones((2, 3)))
        done.append(workdir)
        return train.TrainResult(None, [{"eval_accuracy": 0.5}])

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    out = str(tmp_path / "out")
    code, stdout, stderr = _main(["run", "normalization", "--out", out, "--only", "BN", "SMN",
                                  "--repeats", "1"], capsys)
    assert code == 1, stderr
    assert len(done) == 1 and "normalization | SMN | seed 0: FAILED FloatingPointError" in stdout
    assert "accuracy:" in stdout  # the runs that worked are still aggregated
    assert stderr.startswith("error: 1 training run(s) of 'normalization' failed:\n")
    code, stdout, stderr = _main(["run", "normalization", "--out", out, "--only", "BN",
                                  "--repeats", "1"], capsys)
    assert code == 0 and stderr == ""
