"""Input pipeline: TFDS array_record sources read with numpy, no TensorFlow at run time.

Reading goes through ``tfds.data_source`` (random access to prepared
array_record files) and a small numpy loader:

* **Deterministic order.** Epoch ``e`` visits the split in the permutation drawn
  from ``numpy.random.default_rng((seed, e))``; batch ``b`` of that epoch is
  ``perm[b*B:(b+1)*B]`` (B = global batch, last partial batch dropped). A resumed
  run therefore regenerates exactly the batches it has not consumed yet.
* **Per-process sharding.** Process ``p`` of ``P`` reads only rows
  ``[p*B/P, (p+1)*B/P)`` of every global batch, so the processes read disjoint
  data and the global batch is the same for any ``P``.
* **Augmentation in numpy**, with its random numbers drawn for the whole global
  batch from ``(seed, e, b)``: CIFAR pad-4 random crop + horizontal flip;
  ImageNet random resized crop + flip, resize + centre crop for evaluation.
* **Prefetch to device** with a background thread and
  ``jax.make_array_from_process_local_data``.

Preparing a TFDS dataset the first time needs TensorFlow; see
:func:`prepare_command`. The ``synthetic`` dataset needs nothing: fixed random
images labelled by a fixed random linear teacher, ``y = argmax(W x)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about a dataset: TFDS name, splits, classes, image size, augmentation."""

    tfds_name: str | None
    train_split: str
    eval_split: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "cifar" | "imagenet" | "none"


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", "train", "test", 10, 32, 3, CIFAR_MEAN, CIFAR_STD, "cifar"),
    "cifar100": DatasetSpec(
        "cifar100", "train", "test", 100, 32, 3, CIFAR_MEAN, CIFAR_STD, "cifar"
    ),
    "mnist": DatasetSpec("mnist", "train", "test", 10, 28, 1, (0.1307,), (0.3081,), "none"),
    "imagenet2012": DatasetSpec(
        "imagenet2012", "train", "validation", 1000, 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        "imagenet",
    ),
    "synthetic": DatasetSpec(None, "train", "test", 10, 32, 3, (0.0,), (1.0,), "none"),
}


# Datasets whose facts (classes, statistics) come from the data on disk.
DATA_DEFINED = ("image_folder", "npz", "tfds")
DATASET_NAMES = (*DATASETS, *DATA_DEFINED)


def _positive_int(d, key: str, minimum: int = 1) -> int:
    value = d.get(key)
    if (not isinstance(value, int | np.integer) or isinstance(value, bool)
            or value < minimum):
        raise ValueError(f"config.dataset.{key}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_dataset_config(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.dataset`` (names, sizes, paths) without reading any data."""
    d = config.dataset
    name = d.name
    if name not in DATASET_NAMES:
        raise ValueError(
            f"config.dataset.name={name!r} is unknown; expected one of {list(DATASET_NAMES)} "
            "(image_folder / npz read config.dataset.path, tfds config.dataset.tfds_name)"
        )
    if name == "synthetic":
        for key in ("image_size", "channels", "num_classes", "num_train", "num_eval"):
            _positive_int(d, key)
    if name in ("image_folder", "tfds", "imagenet2012") or (name == "npz" and d.get(
            "image_size")):
        _positive_int(d, "image_size")
    if name in ("image_folder", "tfds") and d.get("channels") not in (1, 3):
        raise ValueError(f"config.dataset.channels={d.get('channels')!r} must be 1 "
                         "(grayscale) or 3 (RGB)")
    path = d.get("path", "")
    if name == "image_folder":
        if not path or not os.path.isdir(path):
            raise ValueError(f"config.dataset.path={path!r} is not a directory; give the "
                             "folder holding train/<class>/ and test/<class>/ images")
        for split in ("train", "test"):
            if not os.path.isdir(os.path.join(path, split)):
                raise ValueError(f"config.dataset.path={path!r} has no {split}/ folder "
                                 f"(expected {split}/<class name>/<image files>)")
    if name == "npz" and (not path or not os.path.isfile(path)):
        raise ValueError(f"config.dataset.path={path!r} is not a file; give an .npz holding "
                         "x_train, y_train, x_test, y_test")
    if name == "tfds" and not d.get("tfds_name"):
        raise ValueError("config.dataset.tfds_name is empty; give the name of a TFDS dataset "
                         "prepared under config.dataset.data_dir")
    mean, std = tuple(d.get("mean", ()) or ()), tuple(d.get("std", ()) or ())
    if bool(mean) != bool(std) or (mean and len(mean) != len(std)):
        raise ValueError(f"config.dataset.mean={mean} and config.dataset.std={std} must both "
                         "be empty (computed) or give one value per channel")
    if std and min(std) <= 0:
        raise ValueError(f"config.dataset.std={std} must be positive")


@functools.lru_cache(maxsize=8)
def _open(kind: str, path: str, split: str, size: int, channels: int, tfds_name: str,
          data_dir: str, tfds_split: str):
    """The (cached) source of a data-defined dataset split."""
    from gne_jax.training import datasets  # noqa: PLC0415

    if kind == "image_folder":
        classes = None
        if split == "test":
            classes = _open(kind, path, "train", size, channels, "", "", "").classes
        return datasets.ImageFolderSource(path, split, size, channels, classes=classes)
    if kind == "npz":
        return datasets.load_npz(path, split, size or None)
    return datasets.ResizedTfdsSource(TfdsSource(tfds_name, tfds_split, data_dir or None),
                                      size, channels)


def _data_source(config, split: str):
    d = config.dataset
    tfds_split = d.get("train_split", "train") if split == "train" else d.get("eval_split",
                                                                                 "test")
    return _open(d.name, str(d.get("path", "")), split, int(d.get("image_size") or 0),
                 int(d.get("channels", 3)), str(d.get("tfds_name", "")),
                 str(d.get("data_dir", "")), tfds_split)


@functools.lru_cache(maxsize=8)
def _stats(source) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from gne_jax.training.datasets import channel_stats  # noqa: PLC0415

    return channel_stats(source)


def _num_classes(config, train_source) -> int:
    d = config.dataset
    if d.name == "image_folder":
        return len(train_source.classes)
    if d.name == "npz":
        test = _data_source(config, "test")
        return int(max(train_source.labels.max(), test.labels.max())) + 1
    try:  # tfds: the label feature's class count
        info = train_source.source.source.dataset_info
        return int(info.features[train_source.label_key].num_classes)
    except Exception:  # noqa: BLE001
        n = len(train_source)
        _, labels = train_source.source.get(np.arange(min(n, 10000)))
        return int(np.max(labels)) + 1


def dataset_spec(config: ml_collections.ConfigDict) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``config.dataset``; raises on an unknown name.

    For ``image_folder``, ``npz`` and ``tfds`` the classes and image size come from the
    data, and the normalization statistics from the training split unless
    ``config.dataset.mean/std`` are given (:func:`gne_jax.training.datasets.channel_stats`).
    """
    check_dataset_config(config)
    d = config.dataset
    name = d.name
    mean, std = tuple(d.get("mean", ()) or ()), tuple(d.get("std", ()) or ())
    if name in DATA_DEFINED:
        src = _data_source(config, "train")
        first, _ = src.get(np.arange(1))
        first = np.asarray(first)
        if not mean:
            mean, std = _stats(src)
        if len(mean) != first.shape[-1]:
            raise ValueError(f"config.dataset.mean={mean} has {len(mean)} values for "
                             f"{first.shape[-1]}-channel images")
        return DatasetSpec(None, "train", "test", _num_classes(config, src), first.shape[1],
                           first.shape[-1], mean, std, "cifar")
    spec = DATASETS[name]
    if name == "synthetic":
        spec = dataclasses.replace(
            spec, num_classes=int(d.get("num_classes", 10)),
            image_size=int(d.get("image_size", 32)), channels=int(d.get("channels", 3)),
        )
    elif name == "imagenet2012" and d.get("image_size"):
        spec = dataclasses.replace(spec, image_size=int(d.image_size))
    if mean:
        spec = dataclasses.replace(spec, mean=mean, std=std)
    return spec


# --------------------------------------------------------------------------- sources


class SyntheticSource:
    """Fixed random images ``x ~ N(0, 1)`` with labels ``argmax(W x)`` of a fixed teacher W.

    Everything is a function of ``seed`` so train and eval splits share the teacher
    (the labelling is learnable) but not the images.
    """

    def __init__(self, num_examples, image_size, channels, num_classes, *, seed, split):
        split_id = {"train": 0, "test": 1}[split]
        teacher_rng = np.random.default_rng((seed, 7919))
        dim = image_size * image_size * channels
        w = teacher_rng.standard_normal((dim, num_classes)).astype(np.float32) / np.sqrt(dim)
        rng = np.random.default_rng((seed, 104729, split_id))
        self.images = rng.standard_normal(
            (num_examples, image_size, image_size, channels)).astype(np.float32)
        self.labels = np.argmax(self.images.reshape(num_examples, -1) @ w, axis=1).astype(np.int32)

    def __len__(self):
        return len(self.labels)

    def get(self, indices: np.ndarray) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


class TfdsSource:
    """Random access to a prepared TFDS split (array_record) through ``tfds.data_source``."""

    def __init__(self, tfds_name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; only when reading TFDS)

        try:
            self.source = tfds.data_source(tfds_name, split=split, data_dir=data_dir,
                                           download=False)
            n = len(self.source)
        except Exception as err:  # noqa: BLE001  (tfds raises many types here)
            raise DatasetNotPreparedError(tfds_name, data_dir, err) from err
        if n == 0:
            raise DatasetNotPreparedError(tfds_name, data_dir, "the split is empty")

    def __len__(self):
        return len(self.source)

    def get(self, indices: np.ndarray):
        try:
            records = self.source.__getitems__([int(i) for i in indices])
        except TypeError:
            # tfds.testing.mock_data's source supports only single-item access.
            records = [self.source[int(i)] for i in indices]
        images = [np.asarray(r["image"]) for r in records]
        labels = np.asarray([r["label"] for r in records], np.int32)
        return images, labels


def prepare_command(tfds_name: str, data_dir: str | None) -> str:
    """The shell command that prepares ``tfds_name`` as array_record under ``data_dir``."""
    dd = f" --data_dir={data_dir}" if data_dir else ""
    manual = " --manual_dir=<dir with ILSVRC2012_img_*.tar>" if tfds_name == "imagenet2012" else ""
    return f"tfds build {tfds_name} --file_format=array_record{dd}{manual}"


class DatasetNotPreparedError(RuntimeError):
    """The TFDS dataset is missing (or not in array_record form); says how to prepare it."""

    def __init__(self, tfds_name, data_dir, cause):
        has_tf = importlib.util.find_spec("tensorflow") is not None
        steps = []
        if not has_tf:
            steps.append("pip install -r requirements-prepare.txt   # TensorFlow, only to prepare")
        steps.append(prepare_command(tfds_name, data_dir))
        super().__init__(
            f"Dataset {tfds_name!r} is not prepared for random access in data_dir={data_dir!r} "
            f"({cause}). Reading needs no TensorFlow, but preparing it once does. Run:\n  "
            + "\n  ".join(steps)
            + "\nor set config.dataset.name='synthetic' to train offline."
        )


def make_source(config: ml_collections.ConfigDict, split: str):
    """The train (``split='train'``) or eval (``split='eval'``) source of ``config.dataset``."""
    spec = dataset_spec(config)
    d = config.dataset
    if d.name in DATA_DEFINED:
        return _data_source(config, "train" if split == "train" else "test")
    if spec.tfds_name is None:
        n = int(d.get("num_train", 2048) if split == "train" else d.get("num_eval", 512))
        return SyntheticSource(n, spec.image_size, spec.channels, spec.num_classes,
                               seed=int(config.seed), split="train" if split == "train" else "test")
    name = spec.train_split if split == "train" else spec.eval_split
    return TfdsSource(spec.tfds_name, name, d.get("data_dir") or None)


# --------------------------------------------------------------------------- order


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng((int(seed), 1, int(epoch))).permutation(num_examples)


def process_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of a global batch that process ``process_index`` reads."""
    if global_batch % process_count:
        raise ValueError(
            f"batch_size={global_batch} is not divisible by the process count {process_count}"
        )
    per = global_batch // process_count
    return slice(process_index * per, (process_index + 1) * per)


# --------------------------------------------------------------------------- augmentation


def _normalize(images: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return ((images - mean) / std).astype(np.float32)


def cifar_augment(images: np.ndarray, rng: np.random.Generator,
                  rows: slice | None = None, total: int | None = None) -> np.ndarray:
    """Zero-pad 4 pixels, take a random 32×32 crop, flip horizontally with probability 1/2.

    The random numbers are drawn for ``total`` rows (default: the batch) and rows
    ``rows`` of them are used, so a process's part of a global batch gets the same
    crops as in a single-process run.
    """
    n, h, w, _ = images.shape
    total = n if total is None else total
    rows = slice(0, n) if rows is None else rows
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = rng.integers(0, 9, total)[rows]
    dx = rng.integers(0, 9, total)[rows]
    flip = (rng.random(total) < 0.5)[rows]
    ys = dy[:, None] + np.arange(h)[None]
    xs = dx[:, None] + np.arange(w)[None]
    xs = np.where(flip[:, None], xs[:, ::-1], xs)
    return padded[np.arange(n)[:, None, None], ys[:, :, None], xs[:, None, :]]


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    squeeze = img.shape[-1] == 1
    pil = Image.fromarray(img[..., 0] if squeeze else img)
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return out[..., None] if squeeze else out


def random_resized_crop(img, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style crop: area fraction in ``scale``, aspect ratio log-uniform in ``ratio``."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y = rng.integers(0, h - ch + 1)
            x = rng.integers(0, w - cw + 1)
            return _resize(img[y:y + ch, x:x + cw], (size, size))
    return center_crop(img, size)


def center_crop(img, size, crop_fraction=0.875):
    """Resize the shorter side to ``size / crop_fraction`` and take the centre ``size`` square."""
    h, w = img.shape[:2]
    short = size / crop_fraction
    scale = short / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    img = _resize(img, (nh, nw))
    y, x = (nh - size) // 2, (nw - size) // 2
    return img[y:y + size, x:x + size]


def preprocess(images, spec: DatasetSpec, *, train: bool, rng: np.random.Generator | None,
               augment: bool = True, rows: slice | None = None,
               total: int | None = None) -> np.ndarray:
    """Augments (when ``train`` and ``augment``) and normalizes a batch to float32 NHWC."""
    if spec.augment == "imagenet":
        if train and augment:
            # One generator per global row, so the crops do not depend on the process count.
            total = len(images) if total is None else total
            seeds = rng.integers(0, 2**63 - 1, total)[rows if rows is not None else slice(None)]
            out = []
            for img, s in zip(images, seeds, strict=True):
                r = np.random.default_rng(int(s))
                img = random_resized_crop(img, r, spec.image_size)
                out.append(img[:, ::-1] if r.random() < 0.5 else img)
            images = np.stack(out)
        else:
            images = np.stack([center_crop(img, spec.image_size) for img in images])
    else:
        images = np.stack(images) if isinstance(images, list) else images
        if images.ndim == 3:
            images = images[..., None]
        if train and augment and spec.augment == "cifar":
            images = cifar_augment(images, rng, rows, total)
    return _normalize(images, spec)


# --------------------------------------------------------------------------- batches


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped, as in the paper)."""
    return num_examples // global_batch


def load_train_batch(source, spec: DatasetSpec, *, global_batch: int, seed: int, step: int,
                     augment: bool = True, rows: slice | None = None,
                     perm: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Rows ``rows`` (default: all) of global training batch ``step``; see the module docstring.

    Batch ``t`` belongs to epoch ``t // steps_per_epoch`` and is fully determined by
    ``(seed, t)``; ``perm`` may pass that epoch's permutation in (it is drawn otherwise).
    """
    rows = slice(0, global_batch) if rows is None else rows
    spe = steps_per_epoch(len(source), global_batch)
    epoch, b = divmod(step, spe)
    if perm is None:
        perm = epoch_permutation(seed, epoch, len(source))
    idx = perm[b * global_batch:(b + 1) * global_batch]
    # Augmentation randomness for the whole global batch, then this process's rows.
    rng = np.random.default_rng((int(seed), 2, epoch, b))
    images, labels = source.get(idx[rows])
    out = preprocess(images, spec, train=True, rng=rng, augment=augment, rows=rows,
                     total=global_batch)
    return {"image": out, "label": np.asarray(labels, np.int32)}


def train_batches(source, spec: DatasetSpec, *, global_batch: int, seed: int, start_step: int,
                  num_steps: int, augment: bool = True, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of the global training batches ``start_step, ..., num_steps - 1``.

    Batch ``t`` belongs to epoch ``t // steps_per_epoch`` and is fully determined by
    ``(seed, t)``; see the module docstring. Read in this thread, one batch at a time
    (:func:`gne_jax.training.grain_loader.train_batches` reads the same batches in
    parallel).
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = process_slice(global_batch, pi, pc)
    spe = steps_per_epoch(len(source), global_batch)
    if spe == 0:
        raise ValueError(
            f"batch_size={global_batch} is larger than the training split ({len(source)} examples)"
        )
    perm, perm_epoch = None, -1
    for step in range(start_step, num_steps):
        epoch = step // spe
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_permutation(seed, epoch, len(source)), epoch
        yield load_train_batch(source, spec, global_batch=global_batch, seed=seed, step=step,
                               augment=augment, rows=rows, perm=perm)


def eval_batches(source, spec: DatasetSpec, *, global_batch: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split in order; the last batch is padded and carries ``mask = 0`` rows."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = process_slice(global_batch, pi, pc)
    n = len(source)
    for start in range(0, n, global_batch):
        idx = np.arange(start, start + global_batch)
        mask = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)[rows]
        images, labels = source.get(idx)
        out = preprocess(images, spec, train=False, rng=None)
        yield {"image": out, "label": labels, "mask": mask[rows]}


def prefetch_to_device(iterator: Iterator[dict[str, Any]], sharding, size: int = 2):
    """Moves batches to devices (sharded by ``sharding``) ``size`` batches ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=max(size, 1))
    sentinel = object()

    def put(batch):
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    def worker():
        try:
            for batch in iterator:
                q.put(put(batch))
        except BaseException as err:  # noqa: BLE001  (re-raised in the consumer)
            q.put(err)
        q.put(sentinel)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
