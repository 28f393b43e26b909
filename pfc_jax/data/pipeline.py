"""The input pipeline: grain over any source, to this process's share of each global batch.

Positions ``0, 1, 2, ...`` run over the data forever: with the uniform sampler position
``i`` is example ``order_e[i mod N]`` of epoch ``e = i // N`` (a fresh seeded permutation
per epoch); with the identity-balanced sampler each global batch is P identities x K
images; with the dual sampler (F²C's identity-based and instance-based loaders) each
global batch is P identity pairs, then ``B - 2P`` images of the uniform order. Global
batch ``b`` is positions ``[b*B, (b+1)*B)``; process ``p`` of ``P`` reads
the slice ``[b*B + p*B/P, b*B + (p+1)*B/P)``, so processes are disjoint and together
cover the batch. Each example is decoded and augmented with a generator seeded from
``(seed, position)``: the batches are a pure function of the position, whatever the
number of threads or worker processes.

The iterator's state is the number of global batches read (identical on every process,
whatever the number of processes) and is saved in the checkpoint: a resumed run sees
exactly the batches an uninterrupted one would. Images stay uint8 until the device (4x
less host-to-device traffic); the train step normalizes them to [-1, 1].
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from pfc_jax.data.augment import Augment, decode
from pfc_jax.data.sources import SourceError

_FOREVER = 1 << 50  # positions; grain datasets need a length


class _UniformOrder:
    """Position -> example index: a fresh seeded permutation every epoch."""

    def __init__(self, num_examples: int, seed: int):
        self.order = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(None)

    def __call__(self, position: int) -> int:
        return int(self.order[position])


class _BalancedOrder:
    """Position -> example index: each global batch is P random identities x K images."""

    def __init__(self, labels: np.ndarray, global_batch: int, per_identity: int, seed: int):
        by_label = np.argsort(labels, kind="stable")
        counts = np.bincount(labels)
        self.identities = np.flatnonzero(counts)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.members = by_label.astype(np.int64)
        self.global_batch, self.k, self.seed = global_batch, per_identity, seed
        self.p = global_batch // per_identity
        if self.p > len(self.identities):
            raise SourceError(
                f"identity-balanced batches need {self.p} identities per batch "
                f"(global batch {global_batch} / {per_identity} images each) but the dataset has "
                f"{len(self.identities)}; raise config.data.images_per_identity_in_batch"
            )
        self._cache = (-1, None)

    def _batch(self, b: int) -> np.ndarray:
        if self._cache[0] != b:
            rng = np.random.default_rng([self.seed, b, 1])
            chosen = rng.choice(self.identities, self.p, replace=False)
            table = []
            for identity in chosen:
                pool = self.members[self.starts[identity] : self.starts[identity + 1]]
                table.append(rng.choice(pool, self.k, replace=len(pool) < self.k))
            self._cache = (b, np.concatenate(table))
        return self._cache[1]

    def __call__(self, position: int) -> int:
        b, j = divmod(position, self.global_batch)
        return int(self._batch(b)[j])


class _DualOrder:
    """Position -> example index: each global batch is ``pairs`` identity pairs (positions
    ``2j, 2j + 1``), then ``global_batch - 2 * pairs`` instances.

    The identity-based stream takes the identities in a fresh seeded order every pass over
    them, one pair each: two different images, or one image twice for an identity that
    has one (as the official code's pair loader). The instance-based stream is the uniform
    sampler's order, every example once per pass. Global pair ``t = b * pairs + j`` and
    global instance ``u = b * instances + i`` make both a pure function of the batch.
    """

    def __init__(self, labels: np.ndarray, global_batch: int, identity_fraction: float, seed: int):
        self.pairs = int(round(identity_fraction * global_batch / 2))
        self.instances = global_batch - 2 * self.pairs
        if self.pairs < 1 or self.instances % 2:
            raise SourceError(
                f"the dual sampler needs an even global batch with at least one pair, got {global_batch} "
                f"images with identity_fraction {identity_fraction}"
            )
        by_label = np.argsort(labels, kind="stable")
        counts = np.bincount(labels)
        self.identities = np.flatnonzero(counts)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.members = by_label.astype(np.int64)
        identity_seed = int(np.random.SeedSequence([seed, 3]).generate_state(1)[0])
        self.identity_order = grain.MapDataset.range(len(self.identities)).shuffle(seed=identity_seed).repeat(None)
        self.instance_order = _UniformOrder(len(labels), seed)
        self.global_batch, self.seed = global_batch, seed
        self._cache = (-1, None)

    def _pairs(self, b: int) -> np.ndarray:
        if self._cache[0] != b:
            table = []
            for t in range(b * self.pairs, (b + 1) * self.pairs):
                identity = self.identities[self.identity_order[t]]
                pool = self.members[self.starts[identity] : self.starts[identity + 1]]
                rng = np.random.default_rng([self.seed, t, 3])
                table.append(rng.choice(pool, 2, replace=False) if len(pool) >= 2 else pool[[0, 0]])
            self._cache = (b, np.concatenate(table))
        return self._cache[1]

    def __call__(self, position: int) -> int:
        b, j = divmod(position, self.global_batch)
        if j < 2 * self.pairs:
            return int(self._pairs(b)[j])
        return self.instance_order(b * self.instances + j - 2 * self.pairs)


# config.data.sampler -> (source, global batch, images per identity, seed, identity
# fraction) -> the order of positions (position -> example index).
SAMPLERS = {
    "uniform": lambda source, global_batch, k, seed, fraction: _UniformOrder(len(source), seed),
    "identity_balanced": lambda source, global_batch, k, seed, fraction: _BalancedOrder(
        np.asarray(source.labels()), global_batch, k, seed
    ),
    "dual": lambda source, global_batch, k, seed, fraction: _DualOrder(
        np.asarray(source.labels()), global_batch, fraction, seed
    ),
}


@dataclasses.dataclass
class _Load:
    """Local index -> (image, label): global position, example, decode, augment."""

    source: object
    order: object
    global_batch: int
    local_batch: int
    process_index: int
    image_size: int
    augment: Augment
    seed: int

    def position(self, local_index: int) -> int:
        b, j = divmod(local_index, self.local_batch)
        return b * self.global_batch + self.process_index * self.local_batch + j

    def __call__(self, local_index: int) -> dict:
        position = self.position(local_index)
        example = self.source[self.order(position)]
        label = int(example["label"])
        if not 0 <= label < self.source.num_classes:
            raise SourceError(
                f"example {self.order(position)} has label {label}, outside [0, "
                f"{self.source.num_classes}): the dataset's labels do not match its class count"
            )
        image = decode(example, self.image_size)
        image = self.augment(image, np.random.default_rng([self.seed, position, 2]))
        return {"image": image, "label": np.int32(label)}


class DataIterator:
    """``next()`` -> (images uint8 [B/P, S, S, 3], labels int32 [B/P]); resumable.

    ``build(b)`` makes the dataset of this process's slices of global batches ``b, b+1,
    ...``; the state is ``b``, the number of global batches read, which does not depend on
    the number of processes, threads or workers.
    """

    def __init__(self, build, fingerprint: dict):
        self._build = build
        self._batches = 0
        self._iterator = None  # started by the first next(): a restore first costs nothing
        self._fingerprint = fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(self._build(self._batches))
        batch = next(self._iterator)
        self._batches += 1
        return batch["image"], batch["label"]

    def state(self) -> dict:
        """JSON-serializable position (the same on every process, for any process count)."""
        return {"batches": self._batches, **self._fingerprint}

    def restore(self, state: dict) -> None:
        for key, mine in self._fingerprint.items():
            if state.get(key) != mine:
                raise SourceError(
                    f"cannot resume the data order: the checkpoint was written with {key}="
                    f"{state.get(key)!r}, this run has {key}={mine!r}. Resume with the same dataset, "
                    "seed, batch size and sampler, or start a new workdir."
                )
        batches = state.get("batches")
        if not isinstance(batches, int) or batches < 0:
            raise SourceError(f"the checkpoint's data position {batches!r} is not a batch count")
        self.close()
        self._iterator = None
        self._batches = batches

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close:
            close()


def make_iterator(
    source,
    *,
    global_batch: int,
    seed: int,
    image_size: int,
    augment: Augment = Augment(),  # noqa: B008 - frozen dataclass, never mutated
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 8,
    workers: int = 0,
    sampler: str = "uniform",
    images_per_identity: int = 4,
    identity_fraction: float = 0.5,
) -> DataIterator:
    """This process's batches of ``source`` (see module docstring).

    Args:
      threads: reader threads per process (decoding releases the GIL).
      workers: additional worker processes (grain multiprocessing prefetch); 0 = none.
      sampler: ``uniform``, ``identity_balanced`` (``global_batch / images_per_identity``
        identities per batch, ``images_per_identity`` images each) or ``dual``
        (``identity_fraction`` of each batch's images as identity pairs, the rest uniform).
    """
    if global_batch % process_count:
        raise SourceError(f"global batch {global_batch} is not divisible by {process_count} processes")
    if len(source) < global_batch:
        raise SourceError(
            f"the dataset has {len(source)} examples, fewer than one global batch of "
            f"{global_batch}; lower config.global_batch_size"
        )
    if sampler not in SAMPLERS:
        raise SourceError(f"unknown sampler {sampler!r} (choose one of {', '.join(SAMPLERS)})")
    if sampler == "identity_balanced" and global_batch % images_per_identity:
        raise SourceError(f"global batch {global_batch} is not a multiple of images_per_identity {images_per_identity}")
    order = SAMPLERS[sampler](source, global_batch, images_per_identity, seed, identity_fraction)
    local = global_batch // process_count
    load = _Load(source, order, global_batch, local, process_index, image_size, augment, seed)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use their defaults

    def build(first_batch: int):
        dataset = (
            grain.MapDataset.range(first_batch * local, _FOREVER)
            .map(load)
            .to_iter_dataset(grain.ReadOptions(num_threads=max(1, threads), prefetch_buffer_size=2 * local))
            .batch(local, drop_remainder=True)
        )
        if workers > 0:
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        return dataset

    fingerprint = {
        # Not the path: a dataset copied elsewhere (e.g. to local disk per job) still resumes.
        "dataset": f"{len(source)} examples, {source.num_classes} classes",
        "seed": seed,
        "global_batch": global_batch,
        "sampler": {"uniform": sampler, "dual": f"dual/{identity_fraction}"}.get(
            sampler, f"{sampler}/{images_per_identity}"
        ),
    }
    return DataIterator(build, fingerprint)
