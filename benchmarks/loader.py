"""Images/s of the training loader alone on ImageNet-sized synthetic JPEGs.

Writes ``--num-images`` JPEGs (``--height`` × ``--width``, smooth random content, quality
90) to a temporary folder, then reads ImageNet training batches from them: JPEG decode
(PIL), Inception random-resized crop to 224 + flip, normalization, as float32 NHWC.
Compares the numpy loader (one batch at a time in the calling thread) with the Grain
loader in threads and in worker processes; the batches are identical (tested).

  python benchmarks/loader.py                         # 256 images, batch 32
  python benchmarks/loader.py --workers 4 --threads 4  # a larger machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from gne_jax.training import grain_loader
from gne_jax.training import input_pipeline as ip


class JpegFiles:
    """Decodes JPEG files on access (like TFDS ImageNet records: varying sizes, uint8)."""

    def __init__(self, files):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def get(self, indices):
        images = []
        for i in np.asarray(indices):
            with Image.open(self.files[int(i)]) as im:
                images.append(np.asarray(im.convert("RGB")))
        return images, np.zeros(len(images), np.int32)


def write_jpegs(folder, n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        small = rng.integers(0, 256, (h // 16, w // 16, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        path = os.path.join(folder, f"{i:05d}.jpg")
        img.save(path, quality=90)
        files.append(path)
    return files


def rate(make_iter, batch, steps):
    it = make_iter()
    next(it)  # start-up (threads, worker processes) left out
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        next(it)
    return batch * (steps - 1) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    spec = ip.DATASETS["imagenet2012"]
    with tempfile.TemporaryDirectory() as d:
        src = JpegFiles(write_jpegs(d, args.num_images, args.height, args.width))
        kw = dict(global_batch=args.batch, seed=0, start_step=0, num_steps=args.steps,
                  process_index=0, process_count=1)
        print(f"{args.num_images} JPEGs {args.width}x{args.height}, batch {args.batch}, "
              f"{args.steps - 1} timed batches, {os.cpu_count()} CPUs")
        runs = {
            "numpy (today's loader)": lambda: ip.train_batches(src, spec, **kw),
            "grain, 1 thread": lambda: grain_loader.train_batches(src, spec, num_threads=1,
                                                                   **kw),
            f"grain, {args.threads} threads": lambda: grain_loader.train_batches(
                src, spec, num_threads=args.threads, **kw),
            f"grain, {args.workers} worker processes": lambda: grain_loader.train_batches(
                src, spec, num_threads=1, num_workers=args.workers, **kw),
        }
        for name, make in runs.items():
            print(f"{name:<32} {rate(make, args.batch, args.steps):8.1f} images/s")


if __name__ == "__main__":
    main()
