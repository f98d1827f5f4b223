"""A seeded shuffling batch sampler that can start an epoch part-way (exact mid-epoch resume).

:class:`ShuffleBatchSampler` gives epoch ``e`` exactly the batches that
``DataLoader(range(n), batch_size, shuffle=True, drop_last, generator=torch.Generator().manual_seed(seed))``
gives in its epoch ``e`` (so runs keep the order of a plain seeded loader), but computes them from
``(seed, e)`` alone by replaying the earlier epochs' draws, instead of depending on how far the earlier
epochs were actually iterated: a resumed run shuffles its epochs exactly as the interrupted one. Lightning calls :meth:`set_epoch` at each epoch
start; :meth:`skip_next` makes the next iteration start after the batches a resumed run has already
trained on.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


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
        self._cached: tuple[int, list[list[int]]] | None = None
        self.sampler = _EpochSetter(self)  # Lightning calls set_epoch on ``batch_sampler.sampler``

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, batches: int) -> None:
        """Start the next iteration after its first ``batches`` batches (its length is unchanged)."""
        if batches < 0:
            raise ValueError(f"ShuffleBatchSampler.skip_next: batches must be >= 0; got {batches}")
        self._skip = int(batches)

    def batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s batches: those of the plain seeded loader's epoch ``epoch``, replayed from the
        seed (``O(epoch * n)`` index work, negligible beside an epoch of training)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        reference = DataLoader(range(self.n), batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last,
                               generator=torch.Generator().manual_seed(self.seed), collate_fn=list)
        out: list[list[int]] = []
        for _ in range(epoch + 1):
            out = list(reference)
        self._cached = (epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        yield from self.batches(self.epoch)[skip:]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class EpochTaggedBatchSampler(ShuffleBatchSampler):
    """:class:`ShuffleBatchSampler` whose batches hold ``(epoch, position)`` pairs instead of positions, so
    that a dataset can draw an item's random augmentation from a generator seeded by ``(seed, epoch,
    position)`` (:func:`item_seed`): the augmentation then depends neither on the global random state nor
    on the number of loader workers, and a resumed run augments every item as the interrupted one did."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:  # type: ignore[override]
        epoch = self.epoch
        for batch in super().__iter__():
            yield [(epoch, i) for i in batch]


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for item ``position`` in epoch ``epoch`` of a run seeded with ``seed``."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(position)) % (2**63 - 1)
