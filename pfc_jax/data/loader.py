"""Seeded, shuffled, resumable batches of a random-access source, one process's share.

Epoch ``e`` visits the source in the order of a permutation drawn from ``(seed, e)``;
global batch ``b`` of that epoch is positions ``[b*B, (b+1)*B)`` of the permutation and
process ``p`` of ``P`` gets the contiguous slice ``[p*B/P, (p+1)*B/P)`` of it, so the
processes' shares are disjoint and together form the global batch. The last partial
batch of an epoch is dropped. The position (epoch, batch) is the iterator's whole state:
a run resumed from it sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np


class Loader:
    """Iterator over ``(images uint8 [B/P, H, W, 3], labels int32 [B/P])``."""

    def __init__(
        self,
        source: Any,
        global_batch: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 2,
    ):
        if global_batch % process_count:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {process_count} processes"
            )
        if len(source) < global_batch:
            raise ValueError(
                f"the dataset has {len(source)} examples, fewer than one global batch of "
                f"{global_batch}; lower config.global_batch_size"
            )
        self.source = source
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.seed = seed
        self.process_index = process_index
        self.batches_per_epoch = len(source) // global_batch
        self._epoch = 0
        self._batch = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

    # ---- state ---------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-serializable position of the next batch."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "global_batch": self.global_batch, "num_examples": len(self.source)}

    def restore(self, state: dict) -> None:
        for key in ("seed", "global_batch", "num_examples"):
            mine = self.state()[key]
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume the data order: the checkpoint was written with "
                    f"{key}={state[key]}, this run has {key}={mine}. Resume with the same "
                    f"dataset, seed and global batch size, or start a new workdir."
                )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    def skip_to_step(self, step: int) -> None:
        """Position the iterator at global step ``step`` from the start."""
        self._epoch, self._batch = divmod(step, self.batches_per_epoch)

    # ---- iteration -----------------------------------------------------------------

    def _indices(self, epoch: int, batch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.source)))
        start = batch * self.global_batch + self.process_index * self.local_batch
        return self._order[1][start : start + self.local_batch]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        indices = self._indices(self._epoch, self._batch)
        examples = list(self._pool.map(self.source.__getitem__, indices))
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        images = np.stack([image for image, _ in examples])
        labels = np.asarray([label for _, label in examples], np.int64)
        bad = (labels < 0) | (labels >= self.source.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"example {int(indices[i])} has label {int(labels[i])}, outside [0, "
                f"{self.source.num_classes}) (the dataset's class count): the dataset is "
                "inconsistent; rebuild it or fix its class count"
            )
        return images, labels.astype(np.int32)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
