"""Input pipeline: order, per-process sharding, augmentation and TFDS mock data (no TensorFlow)."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from gne_jax.training import input_pipeline as ip
from gne_jax.training.config import base_config

SPEC_PLAIN = ip.DatasetSpec(None, "train", "test", 10, 4, 1, (0.0,), (1.0,), "none")
SPEC_CIFAR = ip.DatasetSpec(None, "train", "test", 10, 6, 1, (0.0,), (1.0,), "cifar")


class IndexSource:
    """Image pixels and label both encode the example index, so batches can be traced."""

    def __init__(self, n, size=4):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def get(self, idx):
        idx = np.asarray(idx)
        images = np.broadcast_to(idx[:, None, None, None].astype(np.float32),
                                 (len(idx), self.size, self.size, 1)).copy()
        return images, idx.astype(np.int32)


def _labels(it):
    return [b["label"] for b in it]


def test_each_epoch_is_a_seeded_permutation():
    src = IndexSource(40)
    batches = _labels(ip.train_batches(src, SPEC_PLAIN, global_batch=8, seed=3, start_step=0,
                                       num_steps=10, process_index=0, process_count=1))
    e0, e1 = np.concatenate(batches[:5]), np.concatenate(batches[5:])
    np.testing.assert_array_equal(np.sort(e0), np.arange(40))
    np.testing.assert_array_equal(np.sort(e1), np.arange(40))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, ip.epoch_permutation(3, 0, 40))
    again = _labels(ip.train_batches(src, SPEC_PLAIN, global_batch=8, seed=3, start_step=0,
                                     num_steps=10, process_index=0, process_count=1))
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))


def test_resume_continues_the_same_order():
    src = IndexSource(45)  # 5 full batches of 8 per epoch, 5 examples dropped
    kw = dict(global_batch=8, seed=1, num_steps=12, process_index=0, process_count=1)
    full = list(ip.train_batches(src, SPEC_CIFAR, start_step=0, **kw))
    tail = list(ip.train_batches(src, SPEC_CIFAR, start_step=7, **kw))
    for a, b in zip(full[7:], tail, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize("spec", [SPEC_PLAIN, SPEC_CIFAR])
def test_processes_read_disjoint_parts_of_the_same_global_batch(spec):
    src = IndexSource(64, size=6)
    kw = dict(global_batch=16, seed=0, start_step=0, num_steps=3)
    single = list(ip.train_batches(src, spec, process_index=0, process_count=1, **kw))
    parts = [list(ip.train_batches(src, spec, process_index=p, process_count=4, **kw))
             for p in range(4)]
    for t in range(3):
        for key in ("image", "label"):
            joined = np.concatenate([parts[p][t][key] for p in range(4)])
            np.testing.assert_array_equal(joined, single[t][key])
    with pytest.raises(ValueError, match="not divisible by the process count"):
        next(ip.train_batches(src, spec, process_index=0, process_count=3, **kw))


def test_cifar_augment_is_a_padded_crop_or_its_mirror():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 255, (32, 8, 8, 3)).astype(np.uint8)
    out = ip.cifar_augment(images, np.random.default_rng(5))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for img, pad, o in zip(images, padded, out, strict=True):
        crops = [pad[y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
        plain = any(np.array_equal(o, c) for c in crops)
        mirror = any(np.array_equal(o, c[:, ::-1]) for c in crops)
        assert plain or mirror
        flips += mirror and not plain
        # Unshifted, unflipped crops reproduce the image.
        np.testing.assert_array_equal(pad[4:12, 4:12], img)
    assert 4 <= flips <= 28  # Binomial(32, 1/2): far outside means no/constant flipping


def test_eval_batches_cover_the_split_once():
    src = IndexSource(21)
    batches = list(ip.eval_batches(src, SPEC_PLAIN, global_batch=8, process_index=0,
                                   process_count=1))
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(labels) == 24 and mask.sum() == 21
    np.testing.assert_array_equal(np.sort(labels[mask > 0]), np.arange(21))


def test_synthetic_labels_come_from_a_linear_teacher():
    a = ip.SyntheticSource(256, 4, 2, 5, seed=0, split="train")
    b = ip.SyntheticSource(64, 4, 2, 5, seed=0, split="test")
    # A least-squares linear classifier on one-hot targets fitted on train must beat chance
    # clearly on test: the labelling is a fixed linear function of the pixels.
    x, y = a.images.reshape(256, -1), a.labels
    w, *_ = np.linalg.lstsq(x, np.eye(5)[y], rcond=None)
    acc = np.mean(np.argmax(b.images.reshape(64, -1) @ w, 1) == b.labels)
    assert acc > 0.5, acc
    assert len(np.unique(y)) == 5
    c = ip.SyntheticSource(256, 4, 2, 5, seed=0, split="train")
    np.testing.assert_array_equal(a.images, c.images)


def test_unknown_dataset_lists_the_known_ones():
    c = base_config()
    c.dataset.name = "cifar11"
    with pytest.raises(ValueError, match="cifar11.*cifar10"):
        ip.dataset_spec(c)


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 1))])
def test_tfds_mock_data_without_tensorflow(name, shape):
    c = base_config()
    c.dataset.name = name
    spec = ip.dataset_spec(c)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        src = ip.make_source(c, "train")
        batch = next(ip.train_batches(src, spec, global_batch=4, seed=0, start_step=0,
                                      num_steps=1, process_index=0, process_count=1))
    assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].max() < 10
    assert "tensorflow" not in sys.modules


def test_imagenet_crops_have_the_configured_size():
    c = base_config()
    c.dataset.name = "imagenet2012"
    c.dataset.image_size = 24
    spec = ip.dataset_spec(c)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = ip.make_source(c, "eval")  # random image sizes
        images, _ = src.get(np.arange(6))
    train = ip.preprocess(images, spec, train=True, rng=np.random.default_rng(0))
    evals = ip.preprocess(images, spec, train=False, rng=None)
    assert train.shape == evals.shape == (6, 24, 24, 3)


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    c = base_config()
    c.dataset.data_dir = str(tmp_path)
    with pytest.raises(ip.DatasetNotPreparedError) as err:
        ip.make_source(c, "train")
    msg = str(err.value)
    assert "tfds build cifar10 --file_format=array_record" in msg
    assert str(tmp_path) in msg
    if "tensorflow" not in sys.modules:
        assert "requirements-prepare.txt" in msg


# --------------------------------------------------------------------------- Grain loader


@pytest.mark.parametrize("spec", [SPEC_PLAIN, SPEC_CIFAR])
@pytest.mark.parametrize("threads", [1, 3])
def test_grain_loader_gives_the_numpy_loaders_batches(spec, threads):
    from gne_jax.training import grain_loader

    src = IndexSource(45, size=6)  # 5 batches of 8 per epoch, 3 epochs
    kw = dict(global_batch=8, seed=2, num_steps=15)
    for start in (0, 7):  # from the beginning and resumed mid-epoch
        for p, count in ((0, 1), (1, 2)):
            want = list(ip.train_batches(src, spec, start_step=start, process_index=p,
                                         process_count=count, **kw))
            got = list(grain_loader.train_batches(src, spec, start_step=start, process_index=p,
                                                  process_count=count, num_threads=threads,
                                                  **kw))
            assert len(got) == len(want) == 15 - start
            for a, b in zip(want, got, strict=True):
                np.testing.assert_array_equal(a["image"], b["image"])
                np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.slow  # ~20 s: the worker processes import JAX
def test_grain_loader_worker_processes_keep_the_order():
    from gne_jax.training import grain_loader

    src = IndexSource(40)
    kw = dict(global_batch=8, seed=5, start_step=3, num_steps=12, process_index=0,
              process_count=1)
    want = np.concatenate(_labels(ip.train_batches(src, SPEC_CIFAR, **kw)))
    got = np.concatenate(_labels(grain_loader.train_batches(src, SPEC_CIFAR, num_workers=2,
                                                            **kw)))
    np.testing.assert_array_equal(got, want)
