"""The training loader on Grain: the same batches as the numpy loader, read in parallel.

Grain (``grain.MapDataset``) runs the reading and augmentation of whole batches in
background threads (``num_threads``) or worker processes (``num_workers``, through
``IterDataset.mp_prefetch``), in order. Each element of the dataset is one global step
``t``: its batch is :func:`gne_jax.training.input_pipeline.load_train_batch` of
``(seed, t)`` restricted to this process's rows, so the guarantees of the numpy loader
carry over unchanged:

* deterministic order: epoch ``e`` visits the split in the seeded permutation of
  ``(seed, e)``, batch ``b`` is its slice ``[bB, (b+1)B)``;
* exact resume mid-epoch: the dataset starts at the resumed step (``MapDataset.range``);
* the same global batch for any number of processes: process ``p`` of ``P`` reads rows
  ``[pB/P, (p+1)B/P)``, and the augmentation's random numbers are drawn for the whole
  global batch from ``(seed, epoch, b)``.

Grain's own ``IndexSampler`` shards *records* over processes, which would change the
global batch with the process count; the seeded index order is therefore ours, and
Grain supplies the parallel, ordered execution.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from gne_jax.training import input_pipeline as ip


class _LoadBatch:
    """``step -> this process's rows of global batch step`` (picklable for workers)."""

    def __init__(self, source, spec, global_batch, seed, augment, rows):
        self.source, self.spec, self.global_batch = source, spec, int(global_batch)
        self.seed, self.augment, self.rows = int(seed), bool(augment), rows
        self._cached = (-1, None)  # (epoch, permutation), replaced as one tuple (threads)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        spe = ip.steps_per_epoch(len(self.source), self.global_batch)
        epoch = int(step) // spe
        cached_epoch, perm = self._cached
        if epoch != cached_epoch:  # one permutation per epoch and worker
            perm = ip.epoch_permutation(self.seed, epoch, len(self.source))
            self._cached = (epoch, perm)
        return ip.load_train_batch(self.source, self.spec, global_batch=self.global_batch,
                                   seed=self.seed, step=int(step), augment=self.augment,
                                   rows=self.rows, perm=perm)


def train_batches(source, spec: ip.DatasetSpec, *, global_batch: int, seed: int,
                  start_step: int, num_steps: int, augment: bool = True, num_threads: int = 2,
                  num_workers: int = 0, buffer: int = 4, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The batches of :func:`gne_jax.training.input_pipeline.train_batches`, read by Grain.

    ``num_threads`` batches are prepared concurrently in this process (``buffer`` ahead);
    ``num_workers > 0`` moves the work into that many worker processes (the source and
    spec are pickled to them).
    """
    import grain  # noqa: PLC0415

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    rows = ip.process_slice(global_batch, pi, pc)
    if ip.steps_per_epoch(len(source), global_batch) == 0:
        raise ValueError(
            f"batch_size={global_batch} is larger than the training split ({len(source)} examples)"
        )
    if num_steps <= start_step:
        return iter(())
    ds = grain.MapDataset.range(start_step, num_steps).map(
        _LoadBatch(source, spec, global_batch, seed, augment, rows))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(num_threads), 1),
                                              prefetch_buffer_size=max(int(buffer), 1)))
    if num_workers > 0:
        from absl import flags  # noqa: PLC0415

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (notebooks, tests)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers),
                                                         per_worker_buffer_size=1))
    return iter(it)
