"""End-to-end training tests: TFDS mock data, learning on synthetic data, exact resume,
4 simulated devices vs 1, config errors before training, non-finite stop."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from gne_jax.training import input_pipeline, train
from gne_jax.training.checkpoint import Checkpointer, NonFiniteError, all_finite
from gne_jax.training.config import base_config
from gne_jax.training.optim import FIXUP_SCALAR_PATTERN

jax.config.update("jax_disable_most_optimizations", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyCNN(nn.Module):
    """conv-(BN)-relu-conv-(BN)-relu-pool-dense: small enough to compile in seconds."""

    norm: str = "batchnorm"
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(2):
            x = nn.Conv(self.width, (3, 3), strides=2, use_bias=self.norm == "none",
                        name=f"conv{i}")(x)
            if self.norm == "batchnorm":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(10, name="fc")(x.mean((1, 2)))


def small_config(**kw):
    c = base_config()
    c.dataset.name = "synthetic"
    c.dataset.image_size = 8
    c.dataset.channels = 3
    c.dataset.num_train = 256
    c.dataset.num_eval = 64
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_epochs = 2
    c.optimizer.learning_rate = 0.05
    c.optimizer.schedule = "constant"
    c.log_every_steps = 4
    c.checkpoint_every_steps = 0
    c.progress_bar = False
    c.tensorboard = True
    for k, v in kw.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


def _eval_reference(state, config):
    """Eval loss/accuracy computed directly with model.apply on the whole eval split."""
    spec = input_pipeline.dataset_spec(config)
    src = input_pipeline.make_source(config, "eval")
    images, labels = src.get(np.arange(len(src)))
    x = input_pipeline.preprocess(images, spec, train=False, rng=None)
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    logits = state.apply_fn(variables, jnp.asarray(x), train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return float(loss), float(np.mean(np.argmax(logits, -1) == labels))


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_mock_tfds_end_to_end(name, tmp_path):
    c = small_config(**{"dataset.name": name, "batch_size": 8, "eval_batch_size": 8,
                        "num_epochs": 1})
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        result = train.train_and_evaluate(c, str(tmp_path), model=TinyCNN())
        ref_loss, ref_acc = _eval_reference(result.state, c)
    (row,) = result.history
    assert row["step"] == 2 and row["epoch"] == 1  # 20 // 8 steps, last partial batch dropped
    np.testing.assert_allclose(row["eval_loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(row["eval_accuracy"], ref_acc)
    files = set(os.listdir(tmp_path))
    assert {"metrics.jsonl", "metrics.csv", "curves.png", "grad_norms.npz", "config.json",
            "tensorboard", "checkpoints"} <= files
    assert os.listdir(tmp_path / "tensorboard")
    assert "tensorflow" not in sys.modules


def test_gradient_norms_are_recorded_before_clipping(tmp_path):
    c = small_config(**{"num_epochs": 1, "optimizer.clip_value": 1e-3, "grad_norm_epochs": 1,
                        "dataset.augment": False})
    model = TinyCNN(norm="none")
    result = train.train_and_evaluate(c, str(tmp_path), model=model)
    rec = np.load(tmp_path / "grad_norms.npz")
    assert list(rec["names"]) == ["conv0/kernel", "conv1/kernel", "fc/kernel"]
    np.testing.assert_array_equal(rec["steps"], np.arange(8))
    # Reference: ‖∇_W L‖² of the first step from jax.grad at the initial parameters.
    spec = input_pipeline.dataset_spec(c)
    src = input_pipeline.make_source(c, "train")
    batch = next(input_pipeline.train_batches(src, spec, global_batch=32, seed=0, start_step=0,
                                              num_steps=1, augment=False))
    params = model.init(jax.random.split(jax.random.PRNGKey(0), 3)[0],
                        jnp.zeros((1, 8, 8, 3)), train=False)["params"]
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, batch["image"], train=True), batch["label"]).mean()
    g = jax.grad(loss)(params)
    want = [float(jnp.sum(g[k]["kernel"] ** 2)) for k in ("conv0", "conv1", "fc")]
    np.testing.assert_allclose(rec["values"][0], want, rtol=1e-4)
    assert max(want) > 1e-5  # far above clip_value² · size: the record is pre-clipping
    assert len(result.history) == 1


def test_eval_batch_larger_than_the_split_is_capped_to_it(tmp_path, monkeypatch):
    batches = []
    real = input_pipeline.eval_batches

    def spy(source, spec, *, global_batch, **kw):
        batches.append(global_batch)
        return real(source, spec, global_batch=global_batch, **kw)

    monkeypatch.setattr(input_pipeline, "eval_batches", spy)
    c = small_config(num_epochs=1, eval_batch_size=100000, tensorboard=False)
    result = train.train_and_evaluate(c, str(tmp_path), model=TinyCNN())
    assert batches == [64]  # the whole 64-image eval split in one batch, not 100000
    ref_loss, ref_acc = _eval_reference(result.state, c)
    (row,) = result.history
    np.testing.assert_allclose(row["eval_loss"], ref_loss, rtol=1e-5)
    np.testing.assert_allclose(row["eval_accuracy"], ref_acc)
    assert train.eval_batch_size(small_config(), 64) == 32  # a smaller batch is kept


def test_step_boundaries_rounding_to_one_step_apply_both_decays():
    # With 8 steps per epoch, epochs 1.0 and 1.01 both fall on step 8: lr × 0.1² from it on
    # (a dict keyed by step used to keep one of the two decays).
    c = small_config(**{"optimizer.schedule": "step", "optimizer.lr_decay_factor": 0.1,
                        "optimizer.lr_boundaries_epochs": (1.0, 1.01)})
    train.validate_config(c)
    schedule = train.optim.make_schedule(c, 8)
    np.testing.assert_allclose([float(schedule(t)) for t in (0, 7, 8, 40)],
                               [0.05, 0.05, 0.05 * 0.01, 0.05 * 0.01], rtol=1e-6)


def _loss_falls_config(model_name, **model_kw):
    from gne_jax.models import default_config

    c = small_config(**{"num_epochs": 25, "eval_every_epochs": 25, "batch_size": 16,
                        "eval_batch_size": 64, "dataset.num_train": 128,
                        "optimizer.learning_rate": 0.1, "dataset.augment": False,
                        "tensorboard": False})
    c.model = default_config(model_name)
    for k, v in model_kw.items():
        c.model[k] = v
    return c


def _assert_loss_falls(history):
    assert history[-1]["step"] == 200
    first = history[0]["train_loss"]
    late = np.mean([r["train_loss"] for r in history[-3:]])
    # Chance level is log(10) = 2.30 and the first epoch stays near it; fitting the
    # teacher's labels must cut the loss clearly within the 200 steps.
    assert late < 0.6 * first, [r["train_loss"] for r in history]
    # Chance accuracy 0.1 has SE 0.027 over the 128 examples of an epoch.
    assert history[-1]["train_accuracy"] > 0.1 + 4 * 0.027


@pytest.mark.parametrize("norm", ["batchnorm", "smn", "sws"])
def test_synthetic_loss_falls_serial_cnn(norm, tmp_path):
    c = _loss_falls_config("serial_cnn", depth=8, widths=(4, 8, 8), normalization=norm)
    _assert_loss_falls(train.train_and_evaluate(c, str(tmp_path)).history)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(normalization="batchnorm"), dict(normalization="smn"),
    dict(normalization="none", fixup_p=2.0, fixup_scalars=True),
])
def test_synthetic_loss_falls_resnet(kw, tmp_path):
    c = _loss_falls_config("resnet_cifar", depth=8, widths=(4, 8, 8), **kw)
    if kw.get("fixup_scalars"):
        c.optimizer.scalar_pattern = FIXUP_SCALAR_PATTERN
    _assert_loss_falls(train.train_and_evaluate(c, str(tmp_path)).history)


def test_resume_gives_identical_params_and_metrics(tmp_path):
    kw = {"num_epochs": 2, "checkpoint_every_steps": 5, "tensorboard": False,
          "optimizer.schedule": "cosine", "mixup_alpha": 0.5}
    straight = train.train_and_evaluate(small_config(**kw), str(tmp_path / "a"), model=TinyCNN())
    c_half = small_config(**kw, stop_after_steps=13)  # stops mid-epoch, after a checkpoint at 10
    train.train_and_evaluate(c_half, str(tmp_path / "b"), model=TinyCNN())
    # Simulate a kill after step 10's checkpoint: rows after it would be rewritten.
    ckpt = Checkpointer(str(tmp_path / "b"))
    assert ckpt.latest_step() == 13
    ckpt.manager.delete(13)
    ckpt.close()
    resumed = train.train_and_evaluate(small_config(**kw), str(tmp_path / "b"), model=TinyCNN())
    for a, b in zip(jax.tree.leaves(straight.state.params), jax.tree.leaves(resumed.state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(straight.state.batch_stats),
                    jax.tree.leaves(resumed.state.batch_stats), strict=True):
        np.testing.assert_array_equal(a, b)
    keys = ("step", "epoch", "train_loss", "train_accuracy", "learning_rate", "eval_loss",
            "eval_accuracy")
    rows_a = [{k: r[k] for k in keys} for r in straight.history]
    with open(tmp_path / "b" / "metrics.jsonl") as f:
        rows_b = [{k: json.loads(line)[k] for k in keys} for line in f]
    assert rows_a == rows_b
    ga, gb = np.load(tmp_path / "a" / "grad_norms.npz"), np.load(tmp_path / "b" / "grad_norms.npz")
    np.testing.assert_array_equal(ga["steps"], gb["steps"])
    np.testing.assert_array_equal(ga["values"], gb["values"])


def multi_device_run():
    """Rows and per-leaf |param| sums of a short BN run (called with 1 and 4 devices)."""
    import tempfile

    res = train.train_and_evaluate(small_config(num_epochs=2, tensorboard=False),
                                   tempfile.mkdtemp(), model=TinyCNN())
    return res.history, [float(jnp.abs(x).sum()) for x in jax.tree.leaves(res.state.params)]


_FOUR = textwrap.dedent("""
    import json, sys, tempfile
    import jax
    sys.path.insert(0, {tests!r})
    import test_train
    assert jax.device_count() == 4, jax.devices()
    try:
        test_train.train.train_and_evaluate(test_train.small_config(batch_size=30),
                                            tempfile.mkdtemp())
    except ValueError as e:
        print("BATCH_ERROR", e)
    rows, params = test_train.multi_device_run()
    print("ROWS", json.dumps(rows))
    print("PARAMS", json.dumps(params))
""")


def test_four_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _FOUR.format(tests=REPO + "/tests")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    four = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.stdout.splitlines()
            if ln.split(" ", 1)[0] in ("ROWS", "PARAMS", "BATCH_ERROR")}
    assert jax.device_count() == 1
    rows1, params1 = multi_device_run()
    assert "multiple of the device count 4" in four["BATCH_ERROR"]
    assert "--config.batch_size=28" in four["BATCH_ERROR"]
    rows4 = json.loads(four["ROWS"])
    for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy"):
        np.testing.assert_allclose([r[key] for r in rows4], [r[key] for r in rows1],
                                   rtol=2e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(json.loads(four["PARAMS"]), params1, rtol=1e-4)


@pytest.mark.parametrize("key,value,match", [
    ("dataset.name", "cifar11", "dataset.name='cifar11' is unknown.*cifar10"),
    ("model.normalization", "groupnorm", "normalization='groupnorm' is unknown.*smn"),
    ("batch_size", 0, "batch_size=0 must be a positive multiple"),
    ("optimizer.name", "rmsprop", "optimizer.name='rmsprop' is unknown"),
])
def test_bad_config_fails_before_training(key, value, match, tmp_path):
    c = small_config()
    c.model.normalization = "batchnorm"
    node = c
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())
    assert not os.path.exists(tmp_path / "w")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # The learning rate jumps to 5e36 after epoch 1 (step 8): the parameters then
    # overflow within two steps, so the last good state is the checkpoint of step 8.
    c = small_config(**{"optimizer.schedule": "step", "optimizer.lr_boundaries_epochs": (1,),
                        "optimizer.lr_decay_factor": 1e38, "optimizer.clip": "none",
                        "log_every_steps": 1, "checkpoint_every_steps": 4})
    with pytest.raises(NonFiniteError, match=r"last good checkpoint \(step 8\)"):
        train.train_and_evaluate(c, str(tmp_path), model=TinyCNN(norm="none"))
    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 8
    state, meta = ckpt.restore(None)
    assert meta["step"] == 8 and all_finite(state)
    ckpt.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [8]


def test_workdir_of_another_run_is_not_overwritten(tmp_path):
    c = small_config(num_epochs=1, tensorboard=False)
    train.train_and_evaluate(c, str(tmp_path), model=TinyCNN())
    with pytest.raises(FileExistsError, match="different config.*seed"):
        train.train_and_evaluate(small_config(num_epochs=1, seed=1), str(tmp_path),
                                 model=TinyCNN())
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1  # the first run's results are untouched
    again = train.train_and_evaluate(small_config(num_epochs=1, seed=1, overwrite=True),
                                     str(tmp_path), model=TinyCNN())
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [json.loads(json.dumps(r)) for r in again.history] and len(rows) == 1


def test_moments_hook_matches_exact_jacobian(tmp_path):
    from gne_jax.models import default_config
    from gne_jax.probes.moments import jacobian_moments

    c = small_config(**{"num_epochs": 1, "moments_every_steps": 8, "moments_batch": 2,
                        "moments_num_probes": 64, "tensorboard": False})
    c.model = default_config("serial_cnn")
    c.model.update(depth=8, widths=(4, 4, 4), normalization="batchnorm")
    result = train.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "moments.jsonl") as f:
        (row,) = [json.loads(line) for line in f]
    assert row["step"] == 8
    assert len(row["block_names"]) == len(row["block_phi"]) == 8  # stem + 6 convs + head
    # Exact φ of the trained network (eval mode) on the same two eval images.
    spec = input_pipeline.dataset_spec(c)
    first = next(input_pipeline.eval_batches(input_pipeline.make_source(c, "eval"), spec,
                                             global_batch=32))
    x = jnp.asarray(first["image"][:2])
    variables = {"params": result.state.params, "batch_stats": result.state.batch_stats}
    fn = lambda h: result.state.apply_fn(variables, h, train=False)
    exact = jacobian_moments(fn, x, key=jax.random.PRNGKey(0), method="exact")
    assert abs(row["phi"] - float(exact.phi)) < 4 * row["phi_sem"] + 1e-6, (row, exact.phi)


CONFIGS = [
    ("cifar10_serial.py", "kaiming_normal,relu,none"),
    ("cifar10_serial.py", "orthogonal,leaky_relu,none,0.3"),
    ("cifar10_serial.py", "kaiming_normal,relu,smn"),
    ("cifar10_serial_smoke.py", "delta_orthogonal,tanh,sws"),
    ("cifar10_resnet56.py", "bn_mixup"),
    ("cifar10_resnet56.py", "smn"),
    ("cifar10_resnet56.py", "fixup2_scalars_mixup"),
    ("cifar10_resnet56_smoke.py", "fixup1.5_scalars"),
    ("cifar10_densenet.py", "smn"),
    ("cifar10_densenet_smoke.py", None),
    ("imagenet_resnet50.py", "smn_mixup"),
    ("imagenet_resnet50_smoke.py", "bn"),
    ("synthetic_smoke.py", None),
]


@pytest.mark.parametrize("path,arg", CONFIGS)
def test_configs_build_valid_models(path, arg):
    from gne_jax import models
    from gne_jax.training.config import from_file

    try:
        c = from_file(os.path.join(REPO, "configs", "train", path), arg)
    except ValueError as err:
        if "Unknown model name" in str(err):
            pytest.skip(f"model family not in gne_jax.models yet: {err}")
        raise
    assert c.model.name in models.MODEL_NAMES
    train.validate_config(c)
    spec = input_pipeline.dataset_spec(c)
    model = train.create_model(c, spec.num_classes)
    x = jnp.zeros((2, spec.image_size, spec.image_size, spec.channels))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    tx, _ = train.optim.make_optimizer(c, shapes["params"], steps_per_epoch=10)
    assert tx is not None
    assert jax.eval_shape(model.apply, shapes, x).shape == (2, spec.num_classes)


def test_unknown_config_argument_says_what_is_valid():
    from gne_jax.training.config import from_file

    with pytest.raises(ValueError, match="fixup2_scalars"):
        from_file(os.path.join(REPO, "configs", "train", "cifar10_resnet56.py"), "gn")


def test_command_line(tmp_path):
    base = [sys.executable, "-m", "gne_jax.train", f"--workdir={tmp_path / 'w'}",
            "--config=configs/train/synthetic_smoke.py", "--config.num_epochs=1",
            "--config.dataset.num_train=64", "--config.progress_bar=False"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    bad = subprocess.run([*base, "--config.batch_size=0"], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=300)
    assert bad.returncode != 0
    assert "error: config.batch_size=0 must be a positive multiple" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = subprocess.run(base, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    with open(tmp_path / "w" / "metrics.jsonl") as f:
        (row,) = [json.loads(line) for line in f]
    assert row["step"] == 2 and np.isfinite(row["eval_loss"])


@pytest.mark.slow
def test_mock_imagenet_resnet50_smn_end_to_end(tmp_path):
    from gne_jax.training.config import from_file

    c = from_file(os.path.join(REPO, "configs", "train", "imagenet_resnet50.py"), "smn_mixup")
    c.dataset.image_size = 32
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 8
    c.batch_size = c.eval_batch_size = 8
    c.num_epochs = 1
    c.progress_bar = False
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        result = train.train_and_evaluate(c, str(tmp_path))
        ref_loss, _ = _eval_reference(result.state, c)
    (row,) = result.history
    assert row["step"] == 2
    np.testing.assert_allclose(row["eval_loss"], ref_loss, rtol=1e-5)
