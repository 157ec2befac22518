"""Deterministic, resumable data order.

An interrupted and resumed run must see exactly the batches an uninterrupted run sees. Three things
make that true regardless of worker count or where the run stopped:

* :class:`ResumableSampler` draws the epoch's permutation from ``(seed, epoch)`` alone, shards it over
  ranks, and can start part-way through an epoch (``skip``) without touching the skipped samples.
* :class:`SeededDataset` runs every ``__getitem__`` under an RNG seeded from ``(seed, epoch, index)``,
  so random augmentations depend on the sample, not on which worker loads it or what it loaded before.
  The caller's RNG streams are restored afterwards, leaving the main process's stream (dropout) alone.
* :func:`rebuild_loader` gives every loader its own ``generator``: a DataLoader otherwise draws its
  workers' base seed from the global torch RNG each time it is iterated, which would shift dropout.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK63


class ResumableSampler(Sampler[tuple[int, int]]):
    """Shuffled, rank-sharded indices whose order is a function of ``(seed, epoch)``.

    Yields ``(epoch, index)`` pairs; :class:`SeededDataset` uses the epoch to seed augmentations.
    The tail that does not divide evenly over ranks is dropped (a different tail every epoch), so every
    rank runs the same number of steps and DDP never waits on a rank that ran out of data.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.per_rank = n // world
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Start ``epoch``'s order ``skip`` samples in (the samples this rank consumed before a stop)."""
        if not 0 <= skip <= self.per_rank:
            raise ValueError(f"skip={skip} outside [0, {self.per_rank}]")
        self.epoch, self.skip = epoch, skip

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()[: self.per_rank * self.world]
        mine = order[self.rank :: self.world][self.skip :]
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in mine.tolist()])

    def __len__(self) -> int:
        return self.per_rank - self.skip


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``, in order, without padding: evaluation counts each sample once."""

    def __init__(self, n: int, *, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def _seed_all(seed: int) -> None:
    # the CPU generator only: torch.manual_seed also queues lazy CUDA seeding, ~0.3-0.8 ms a sample
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(epoch, i)]`` is ``base[i]`` loaded under a per-sample seed."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = mix_seed(self.seed, epoch, index)
        if get_worker_info() is not None:
            # A worker's RNGs serve only data loading: seeding is enough, nothing to restore.
            _seed_all(s)
            return self.base[index]
        # In the main process (num_workers=0) the three RNGs transforms use (torch, random, numpy)
        # are the streams dropout and the rest of training draw from: save and restore them.
        torch_state = torch.get_rng_state()
        py_state = random.getstate()
        np_state = np.random.get_state()
        try:
            _seed_all(s)
            return self.base[index]
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


def rebuild_loader(
    loader: DataLoader,
    *,
    dataset: Dataset,
    sampler: Sampler,
    batch_size: int,
    drop_last: bool,
    generator_seed: int,
) -> DataLoader:
    """``loader`` with our dataset view and sampler, keeping its workers, collate and pinning settings."""
    workers = loader.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=torch.Generator().manual_seed(generator_seed),
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        persistent_workers=loader.persistent_workers if workers > 0 else False,
        pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )
