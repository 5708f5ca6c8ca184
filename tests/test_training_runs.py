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
