"""A researcher's own data: image folders and .npz arrays made here (small random images)
train end to end; statistics, resizing and class mapping against numpy; any TFDS dataset
on disk through the generic ``tfds`` route (mock data, no TensorFlow)."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from gne_jax.training import datasets, input_pipeline, train

jax.config.update("jax_disable_most_optimizations", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_train import TinyCNN, small_config  # noqa: E402


def _make_folder(root, classes=("cat", "dog", "owl"), per_class=(12, 4), seed=0):
    """Class c: images of brightness ~ 60 + 60 c (learnable), sizes and formats vary."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name)
            for i in range(n):
                h, w = rng.integers(10, 24, 2)
                img = np.clip(rng.normal(60 + 60 * c, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(img).save(root / split / name / f"{i}.{ext}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_lists_classes_and_fits_images(tmp_path):
    root = _make_folder(tmp_path / "data")
    src = datasets.ImageFolderSource(str(root), "train", 8)
    assert src.classes == ["cat", "dog", "owl"] and len(src) == 36
    np.testing.assert_array_equal(np.bincount(src.labels), [12, 12, 12])
    images, labels = src.get(np.array([0, 13, 35]))
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, [0, 1, 2])
    # The fit: short side to 8, centre crop, as PIL's ImageOps.fit.
    from PIL import ImageOps

    with Image.open(src.files[13]) as im:
        want = np.asarray(ImageOps.fit(im.convert("RGB"), (8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(images[1], want)
    gray = datasets.ImageFolderSource(str(root), "test", 8, 1, classes=src.classes)
    assert gray.get(np.arange(2))[0].shape == (2, 8, 8, 1)


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 4, 4, 3)).astype(np.uint8)
    mean, std = datasets.channel_stats(datasets.ArraySource(x, np.zeros(50)), batch=7)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std((0, 1, 2)), rtol=1e-10)


def test_test_split_with_an_unknown_class_is_refused(tmp_path):
    root = _make_folder(tmp_path / "data")
    os.makedirs(root / "test" / "zebra")
    c = small_config(**{"dataset.name": "image_folder", "dataset.path": str(root)})
    with pytest.raises(ValueError, match=r"test/ has class folders \['zebra'\]"):
        train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())


def test_image_folder_trains_end_to_end(tmp_path):
    root = _make_folder(tmp_path / "data")
    c = small_config(**{"dataset.name": "image_folder", "dataset.path": str(root),
                        "dataset.image_size": 8, "batch_size": 12, "eval_batch_size": 8,
                        "num_epochs": 2})
    result = train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())
    assert [r["step"] for r in result.history] == [3, 6]
    assert all(np.isfinite(r["eval_loss"]) for r in result.history)
    spec = input_pipeline.dataset_spec(c)
    assert (spec.num_classes, spec.image_size, spec.channels) == (3, 8, 3)
    # Normalization statistics from the training images.
    src = input_pipeline.make_source(c, "train")
    mean, std = datasets.channel_stats(src)
    np.testing.assert_allclose(spec.mean, mean)
    x = src.get(np.arange(len(src)))[0] / 255.0
    np.testing.assert_allclose(spec.mean, x.mean((0, 1, 2)), rtol=1e-6)
    assert "tensorflow" not in sys.modules


def test_image_folder_config_file(tmp_path):
    from gne_jax.training.config import from_file

    root = _make_folder(tmp_path / "data")
    c = from_file(os.path.join(REPO, "configs", "train", "image_folder_smoke.py"), str(root))
    assert c.dataset.path == str(root)
    train.validate_config(c)


def _make_npz(path, n_train=40, n_test=16, size=6, seed=0):
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, 4, n_train), rng.integers(0, 4, n_test)
    x_train = rng.integers(0, 256, (n_train, size, size, 3)).astype(np.uint8)
    x_test = rng.integers(0, 256, (n_test, size, size, 3)).astype(np.uint8)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_train, y_train


def test_npz_trains_end_to_end(tmp_path):
    x, y = _make_npz(tmp_path / "d.npz")
    c = small_config(**{"dataset.name": "npz", "dataset.path": str(tmp_path / "d.npz"),
                        "dataset.image_size": 6, "batch_size": 8, "eval_batch_size": 8,
                        "num_epochs": 1})
    result = train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())
    (row,) = result.history
    assert row["step"] == 5 and np.isfinite(row["eval_loss"])
    spec = input_pipeline.dataset_spec(c)
    assert spec.num_classes == int(y.max()) + 1 == 4
    np.testing.assert_allclose(spec.mean, (x / 255.0).mean((0, 1, 2)), rtol=1e-6)
    with open(tmp_path / "w" / "config.json") as f:
        assert json.load(f)["dataset"]["name"] == "npz"


def test_npz_with_missing_arrays_names_them(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 2, 2), np.uint8), y_train=np.zeros(4))
    c = small_config(**{"dataset.name": "npz", "dataset.path": str(tmp_path / "d.npz")})
    with pytest.raises(ValueError, match=r"lacks the arrays \['x_test', 'y_test'\]"):
        train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())


def test_npz_grayscale_is_resized_to_image_size(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 10, 10)).astype(np.uint8)
    np.savez(tmp_path / "g.npz", x_train=x, y_train=np.arange(5), x_test=x, y_test=np.arange(5))
    src = datasets.load_npz(str(tmp_path / "g.npz"), "train", 4)
    images, labels = src.get(np.arange(5))
    assert images.shape == (5, 4, 4, 1)
    want = np.asarray(Image.fromarray(x[2]).resize((4, 4), Image.BILINEAR))
    np.testing.assert_array_equal(images[2, ..., 0], want)


def test_any_tfds_dataset_on_disk(tmp_path):
    import tensorflow_datasets as tfds

    c = small_config(**{"dataset.name": "tfds", "dataset.tfds_name": "mnist",
                        "dataset.image_size": 8, "dataset.channels": 1, "batch_size": 8,
                        "eval_batch_size": 8, "num_epochs": 1})
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        input_pipeline._open.cache_clear()
        result = train.train_and_evaluate(c, str(tmp_path / "w"), model=TinyCNN())
        spec = input_pipeline.dataset_spec(c)
    input_pipeline._open.cache_clear()
    assert (spec.num_classes, spec.image_size, spec.channels) == (10, 8, 1)
    (row,) = result.history
    assert row["step"] == 2 and np.isfinite(row["eval_loss"])
    assert "tensorflow" not in sys.modules
