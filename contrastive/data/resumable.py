"""A seeded shuffling batch sampler that can start an epoch part-way (exact mid-epoch resume).

:class:`ShuffleBatchSampler` shuffles with a generator seeded from ``(seed, epoch)`` alone (SplitMix64, as
:class:`contrastive.samplers.collate.SamplerBatchSampler`), not from a generator whose state depends on
how far the earlier epochs were iterated (that of ``DataLoader(shuffle=True, generator=g)``), so a resumed
run shuffles its epochs exactly as the interrupted one. Lightning calls :meth:`set_epoch` at each epoch
start; :meth:`skip_next` makes the next iteration start after the batches a resumed run has already
trained on.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from contrastive.samplers.table import _splitmix64


class _EpochSetter:
    """Forwards Lightning's ``batch_sampler.sampler.set_epoch(epoch)`` to the batch sampler."""

    def __init__(self, owner: "ShuffleBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.owner.n


class ShuffleBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` positions of a shuffled ``range(n)``, reproducible per ``(seed, epoch)``.

    Args:
        n: dataset size.
        batch_size: rows per batch.
        seed: the seed of the shuffle.
        drop_last: drop a last batch smaller than ``batch_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = True) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"ShuffleBatchSampler: n must be a positive integer; got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ShuffleBatchSampler: batch_size must be a positive integer; got {batch_size!r}")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, int(seed), bool(drop_last)
        self.epoch = 0
        self._skip = 0
        self.sampler = _EpochSetter(self)  # Lightning calls set_epoch on ``batch_sampler.sampler``

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, batches: int) -> None:
        """Start the next iteration after its first ``batches`` batches (its length is unchanged)."""
        if batches < 0:
            raise ValueError(f"ShuffleBatchSampler.skip_next: batches must be >= 0; got {batches}")
        self._skip = int(batches)

    def permutation(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of ``range(n)``."""
        mixed = _splitmix64(np.asarray(self.seed, dtype=np.uint64) ^ _splitmix64(np.asarray(epoch, dtype=np.uint64)))
        g = torch.Generator().manual_seed(int(mixed) & ((1 << 63) - 1))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.permutation(self.epoch)
        skip, self._skip = self._skip, 0
        for i, start in enumerate(range(0, self.n, self.batch_size)):
            batch = perm[start:start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
