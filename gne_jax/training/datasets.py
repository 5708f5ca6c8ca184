"""A researcher's own data: image folders, ``.npz`` arrays, any TFDS dataset on disk.

Every source has ``len(source)`` and ``source.get(indices) -> (images, labels)`` with
uint8 (or float) NHWC images of one size and int32 labels, the interface the loader
in :mod:`gne_jax.training.input_pipeline` reads. None of them needs TensorFlow.

* :class:`ImageFolderSource`: ``DIR/train/<class>/*.png|jpg|...`` and ``DIR/test/<class>/…``;
  classes are the sorted sub-folder names of ``train/``; each image is decoded with PIL,
  converted to RGB (or grayscale for ``channels=1``) and fitted to ``size × size``
  (shorter side resized to ``size``, centre crop). Decoded images are kept in memory
  while they fit in ``cache_bytes``.
* :class:`ArraySource`: in-memory arrays, e.g. from an ``.npz`` with ``x_train, y_train,
  x_test, y_test`` (:func:`load_npz`).
* :class:`ResizedTfdsSource`: any prepared TFDS dataset (``tfds.data_source``), each
  image fitted to ``size × size`` like the image folder.

:func:`channel_stats` gives the per-channel mean and standard deviation of the pixels
(in [0, 1] for uint8 images), ``mean_c = E[x_c]``, ``std_c = sqrt(E[x_c²] − mean_c²)``,
over the whole training split or a seeded subset of ``max_images`` images.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def fit_image(img, size: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 ``(size, size, channels)``: short side to ``size``, centre crop."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), Image.BILINEAR)
    out = np.asarray(img, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def list_image_folder(root: str, split: str,
                      classes: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """Files, labels and class names of ``root/split/<class>/*``.

    ``classes`` (from the training split) fixes the label of every class name; a class
    folder of another split that is not among them is an error.
    """
    base = os.path.join(root, split)
    if not os.path.isdir(base):
        raise ValueError(f"config.dataset.path={root!r} has no {split}/ folder (expected "
                         f"{split}/<class name>/<image files>)")
    found = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not found:
        raise ValueError(f"config.dataset.path={root!r}: {base} holds no class folders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"config.dataset.path={root!r}: {split}/ has class folders {unknown} "
                         "that train/ does not have")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        folder = os.path.join(base, c)
        for name in sorted(os.listdir(folder)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, name))
                labels.append(index[c])
    if not files:
        exts = ", ".join(IMAGE_EXTENSIONS)
        raise ValueError(f"config.dataset.path={root!r}: no image files ({exts}) under "
                         f"{base}/<class>/")
    return files, np.asarray(labels, np.int32), list(classes)


class ImageFolderSource:
    """Random access to an image folder split, decoded and fitted to ``size × size``."""

    def __init__(self, root: str, split: str, size: int, channels: int = 3, *,
                 classes: list[str] | None = None, cache_bytes: int = 2**30, threads: int = 4):
        self.files, self.labels, self.classes = list_image_folder(root, split, classes)
        self.size, self.channels, self.threads = int(size), int(channels), int(threads)
        n = len(self.files)
        fits = n * self.size * self.size * self.channels <= cache_bytes
        self._cache = np.zeros((n, self.size, self.size, self.channels), np.uint8) if fits else None
        self._have = np.zeros(n, bool)

    def __len__(self):
        return len(self.files)

    def _decode(self, i: int) -> np.ndarray:
        from PIL import Image  # noqa: PLC0415

        with Image.open(self.files[i]) as img:
            return fit_image(img, self.size, self.channels)

    def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        if self._cache is None:
            with ThreadPoolExecutor(self.threads) as pool:
                images = np.stack(list(pool.map(self._decode, idx.tolist())))
            return images, self.labels[idx]
        missing = np.unique(idx[~self._have[idx]])
        if len(missing):
            with ThreadPoolExecutor(self.threads) as pool:
                for i, img in zip(missing, pool.map(self._decode, missing.tolist()),
                                  strict=True):
                    self._cache[i] = img
            self._have[missing] = True
        return self._cache[idx], self.labels[idx]


class ArraySource:
    """Images ``(N, H, W, C)`` and labels ``(N,)`` held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        self.images, self.labels = images, np.asarray(labels).astype(np.int32).reshape(-1)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self):
        return len(self.labels)

    def get(self, indices):
        idx = np.asarray(indices, np.int64)
        return self.images[idx], self.labels[idx]


def load_npz(path: str, split: str, size: int | None = None) -> ArraySource:
    """``x_<split>, y_<split>`` of the ``.npz`` at ``path`` (split ``train`` or ``test``).

    Images are ``(N, H, W)`` or ``(N, H, W, C)``, uint8 in [0, 255] or float; uint8
    images of another size than ``size`` are fitted to ``size × size`` with PIL.
    """
    with np.load(path) as data:
        keys = (f"x_{split}", f"y_{split}")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"config.dataset.path={path!r} lacks the arrays {missing} "
                             f"(has {sorted(data.files)}; needs x_train, y_train, x_test, "
                             "y_test)")
        x, y = data[keys[0]], data[keys[1]]
    if x.ndim not in (3, 4):
        raise ValueError(f"config.dataset.path={path!r}: x_{split} has shape {x.shape}; "
                         "expected (N, H, W) or (N, H, W, C)")
    if x.ndim == 3:
        x = x[..., None]
    if size and x.shape[1:3] != (size, size):
        if x.dtype != np.uint8:
            raise ValueError(f"config.dataset.image_size={size} differs from the {x.shape[1]}x"
                             f"{x.shape[2]} float images of {path!r}; set it to "
                             f"{x.shape[1]} (only uint8 images are resized)")
        from PIL import Image  # noqa: PLC0415

        c = x.shape[-1]
        x = np.stack([fit_image(Image.fromarray(im[..., 0] if c == 1 else im), size, c)
                      for im in x])
    elif x.dtype != np.uint8:
        x = x.astype(np.float32)
    return ArraySource(x, y)


class ResizedTfdsSource:
    """A prepared TFDS split read with ``tfds.data_source``, images fitted to ``size``."""

    def __init__(self, source, size: int, channels: int, image_key: str = "image",
                 label_key: str = "label"):
        self.source, self.size, self.channels = source, int(size), int(channels)
        self.image_key, self.label_key = image_key, label_key

    def __len__(self):
        return len(self.source)

    def get(self, indices):
        from PIL import Image  # noqa: PLC0415

        images, labels = self.source.get(indices)
        out = []
        for im in images:
            im = np.asarray(im)
            if im.ndim == 3 and im.shape[-1] == 1:
                im = im[..., 0]
            out.append(fit_image(Image.fromarray(im), self.size, self.channels))
        return np.stack(out), labels


def channel_stats(source, *, max_images: int = 10000, batch: int = 256,
                  seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and standard deviation of ``source`` (uint8 scaled to [0, 1]).

    Uses every image when ``len(source) <= max_images``, else a seeded random subset.
    """
    n = len(source)
    idx = (np.arange(n) if n <= max_images else
           np.sort(np.random.default_rng((seed, 31)).choice(n, max_images, replace=False)))
    total = sq = count = 0.0
    for s in range(0, len(idx), batch):
        images, _ = source.get(idx[s:s + batch])
        x = np.asarray(images, np.float64)
        if np.asarray(images).dtype == np.uint8:
            x = x / 255.0
        if x.ndim == 3:
            x = x[..., None]
        total = total + x.sum((0, 1, 2))
        sq = sq + np.square(x).sum((0, 1, 2))
        count += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 0.0))
    std = np.where(std > 0, std, 1.0)  # a constant channel is only centred
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)
