"""Batch integration of negative samplers: :func:`attach_sampler`, the one way a datamodule wires a sampler
into its training loader, a collate that appends extra negatives, and a batch sampler that lets a sampler
order the batches (NGAME).

How a datamodule wires a sampler (``sampler: NegativeSampler | None = None`` constructor argument)
-------------------------------------------------------------------------------------------------
Training rows are the positions ``0..N-1`` of the training dataset; dataset item ``i`` is row ``i``::

    def setup(self, stage):
        ...
        self.train_loader = attach_sampler(
            self.sampler, self.train_set, ids=train_ids, groups=train_groups,
            base_collate=self.collate,                        # items -> the setting's batch dict
            candidate_inputs=self.candidate_rows,             # rows -> candidate-tower inputs
            generated_inputs=self.render,                     # generated items -> inputs (optional)
            texts={"anchor": ..., "candidate": ...},          # text settings only (BM25)
            batch_size=self.batch_size, seed=self.seed)

and, for samplers refreshed with the model, implements
:meth:`~contrastive.samplers.base.SamplerData.row_inputs`.

Rows of a batch: dataset items that are plain ints are the rows themselves; dict items may carry
``item["row"]``; otherwise the batch's ``pair_id`` is mapped back to rows (ids must be those given to
``setup``).

Staleness and worker processes: the collate runs in the dataloader workers, which hold a *copy* of the
sampler made when they start. Lightning starts them at each epoch (after ``on_train_epoch_start``, where
the refresh callback mines) unless ``persistent_workers=True``: with persistent workers refreshed
negatives would never reach them (the refresh callback raises). A refresh every N *steps* reaches the
workers at the next epoch only (``num_workers=0`` uses it from the next batch but one: Lightning
prefetches one batch).

Distributed training: :class:`SamplerBatchSampler` shards the batches over ranks itself (every rank
gets a full local batch; consecutive batches go to consecutive ranks, so NGAME's global batch stays
cluster-coherent), so run with ``Trainer(use_distributed_sampler=False)``. The model gathers extra
negatives with gradient, which needs the same count on every rank: :class:`NegativeCollate` then
(``fixed_size``, on by default under ``torch.distributed``) always emits ``batch_size * num_negatives``
corpus negatives, topping up with random rows (a sampler's generated negatives must then also come in a
fixed number per batch).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from contrastive.samplers.base import NegativeSampler, as_sampled
from contrastive.samplers.table import _splitmix64, hashed_randint


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NegativeCollate:
    """Wrap a collate function and append the sampler's extra negatives to every batch.

    Added keys (``K`` = number of extra negatives of the batch, possibly 0):

    - ``neg_<key>`` for every key of the candidate-tower inputs (e.g. ``neg_ids`` / ``neg_mask`` ``(K, L)``
      for text), present when ``K > 0``: corpus rows first (``candidate_inputs``), then generated items
      (``generated_inputs``), concatenated with :func:`cat_inputs`;
    - ``neg_pair_id`` ``(K,)`` long corpus ids (``-1`` for generated items) and ``neg_dup_group`` ``(K,)``
      long duplicate groups, with which the model masks a negative that is (a duplicate of) some anchor's
      positive;
    - ``neg_row`` ``(K,)`` long training rows (``-1`` for generated items);
    - ``neg_owner`` ``(K,)`` long: ``-1``, or the batch position of the anchor a generated item belongs to;
    - ``neg_weight`` / ``neg_difficulty`` ``(K,)`` float, when the generated negatives carry them (1 and 0
      for corpus rows).

    ``-1`` padding from the sampler is dropped. With ``dedup`` a corpus negative that is already in the
    batch (its row is in the batch) or repeated across anchors appears once.

    Args:
        base_collate: the datamodule's collate (list of items → batch dict with ``pair_id``).
        sampler: a set-up :class:`NegativeSampler`.
        corpus_ids: ``(N,)`` corpus id (``pair_id``) of every row.
        corpus_groups: ``(N,)`` duplicate group of every row (``None``: the ids).
        candidate_inputs: rows (list of ints) → candidate-tower inputs (tensors ``(K, ...)``).
        generated_inputs: generated items → candidate-tower inputs; needed only by samplers that generate.
        dedup: drop negatives already in the batch and repeats.
        fixed_size: always ``B * num_negatives`` corpus negatives (random top-up; needed under DDP).
            ``None`` = on iff ``torch.distributed`` is initialised with more than one process.
        row_key: the item key holding the row position.
        seed: seed of the top-up draws.
    """

    def __init__(
        self,
        base_collate: Callable[[list[Any]], dict[str, Tensor]],
        sampler: NegativeSampler,
        corpus_ids: Tensor,
        corpus_groups: Optional[Tensor],
        candidate_inputs: Callable[[list[int]], Mapping[str, Tensor]],
        generated_inputs: Optional[Callable[[list[Any]], Mapping[str, Tensor]]] = None,
        dedup: bool = True,
        fixed_size: Optional[bool] = None,
        row_key: str = "row",
        seed: int = 0,
    ) -> None:
        self.base_collate, self.sampler = base_collate, sampler
        self.candidate_inputs, self.generated_inputs = candidate_inputs, generated_inputs
        self.corpus_ids = torch.as_tensor(corpus_ids).long().view(-1)
        n = self.corpus_ids.shape[0]
        if n == 0:
            raise ValueError("NegativeCollate: the training corpus is empty (corpus_ids has no entries)")
        self.num_rows = n
        self.corpus_groups = self.corpus_ids.clone() if corpus_groups is None else torch.as_tensor(corpus_groups).long().view(-1)
        if self.corpus_groups.shape[0] != n:
            raise ValueError(f"NegativeCollate: corpus_groups has {self.corpus_groups.shape[0]} entries for {n} rows")
        self._sorted_ids, self._sorted_rows = torch.sort(self.corpus_ids)
        self.dedup = bool(dedup)
        self.fixed_size = _is_distributed() if fixed_size is None else bool(fixed_size)
        self.row_key, self.seed = row_key, int(seed)

    def rows_of(self, items: Sequence[Any], batch: dict[str, Tensor]) -> Tensor:
        """``(B,)`` training rows of a batch: ``item[row_key]`` if items carry it, else via ``pair_id``."""
        if items and isinstance(items[0], dict) and self.row_key in items[0]:
            return torch.as_tensor([int(it[self.row_key]) for it in items], dtype=torch.long)
        if items and all(isinstance(it, (int, np.integer)) for it in items):  # items are the rows themselves
            return torch.as_tensor([int(it) for it in items], dtype=torch.long)
        if "pair_id" not in batch:
            raise KeyError(f"NegativeCollate: items carry no {self.row_key!r} and the batch has no 'pair_id'")
        ids = torch.as_tensor(batch["pair_id"]).long().view(-1)
        pos = torch.searchsorted(self._sorted_ids, ids).clamp(max=len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        if not bool(found.all()):
            bad = ids[~found][:5].tolist()
            raise KeyError(f"NegativeCollate: pair ids {bad} are not in the training corpus given to the collate")
        return self._sorted_rows[pos]

    def negative_rows(self, rows: Tensor) -> Tensor:
        """The ``(K,)`` rows of the corpus negatives of a batch whose anchors are ``rows`` ``(B,)``."""
        return self._corpus_rows(rows, as_sampled(self.sampler.sample(rows)).rows)

    def _corpus_rows(self, rows: Tensor, neg: Tensor) -> Tensor:
        want = rows.shape[0] * self.sampler.num_negatives
        flat = neg.reshape(-1)
        flat = flat[flat >= 0]
        if self.dedup and flat.numel():
            flat = flat[~torch.isin(flat, rows)]
            uniq, first = np.unique(flat.numpy(), return_index=True)
            flat = flat[torch.from_numpy(np.sort(first))]  # first occurrence, original order
        if self.fixed_size and flat.numel() != want:
            flat = self._fix_size(rows, flat, want)
        return flat

    def _fix_size(self, rows: Tensor, flat: Tensor, want: int) -> Tensor:
        if flat.numel() > want:
            return flat[:want]
        n = self.num_rows
        h = int(_splitmix64(np.asarray(int(rows.sum()) * 1_000_003 + rows.numel(), dtype=np.uint64)))
        taken = set(rows.tolist()) | set(flat.tolist())
        extra: list[int] = []
        for attempt in range(8):
            draws = hashed_randint((self.seed, h, attempt), torch.arange(1), torch.arange(4 * want + 16), n).view(-1)
            for r in draws.tolist():
                if r not in taken:
                    taken.add(r)
                    extra.append(r)
                    if flat.numel() + len(extra) == want:
                        return torch.cat([flat, torch.tensor(extra, dtype=torch.long)])
        out = torch.cat([flat, torch.tensor(extra, dtype=torch.long)])
        if out.numel() == 0:
            raise ValueError(f"NegativeCollate(fixed_size=True): no document outside the batch can serve as a negative "
                             f"({n} training documents, batch of {rows.numel()}); lower num_negatives or the batch size")
        reps = -(-want // out.numel())
        return out.repeat(reps)[:want]  # a tiny corpus: repeat negatives rather than change K across ranks

    def __call__(self, items: list[Any]) -> dict[str, Tensor]:
        batch = self.base_collate(items)
        rows = self.rows_of(items, batch)
        sampled = as_sampled(self.sampler.sample(rows))
        neg = self._corpus_rows(rows, sampled.rows)
        gen = sampled.generated
        parts = []
        if neg.numel():
            parts.append(self.candidate_inputs(neg.tolist()))
        k_gen = 0 if gen is None else len(gen.items)
        if k_gen:
            if self.generated_inputs is None:
                raise ValueError(f"{type(self.sampler).__name__} generates negatives but the datamodule passed no "
                                 "generated_inputs to turn them into tower inputs")
            parts.append(self.generated_inputs(list(gen.items)))
        if parts:
            inputs = parts[0] if len(parts) == 1 else cat_inputs(parts[0], parts[1])
            for key, value in inputs.items():
                batch[f"neg_{key}"] = torch.as_tensor(value)
        minus = torch.full((k_gen,), -1, dtype=torch.long)
        batch["neg_pair_id"] = torch.cat([self.corpus_ids[neg], minus])
        batch["neg_dup_group"] = torch.cat([self.corpus_groups[neg], minus])
        batch["neg_row"] = torch.cat([neg, minus])
        if gen is not None:
            batch["neg_owner"] = torch.cat([torch.full((neg.numel(),), -1, dtype=torch.long), gen.owner])
            if gen.weights is not None:
                batch["neg_weight"] = torch.cat([torch.ones(neg.numel()), gen.weights.float()])
            if gen.difficulty is not None:
                batch["neg_difficulty"] = torch.cat([torch.zeros(neg.numel()), gen.difficulty.float()])
        return batch


def cat_inputs(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate two tower-input dicts along the item dimension, zero-padding trailing dimensions that
    differ (token sequences of different lengths: id 0 is padding, mask False)."""
    if set(a) != set(b):
        raise ValueError(f"cannot concatenate tower inputs with keys {sorted(a)} and {sorted(b)}")
    out = {}
    for k in a:
        x, y = torch.as_tensor(a[k]), torch.as_tensor(b[k])
        if x.dim() != y.dim():
            raise ValueError(f"tower input {k!r}: {tuple(x.shape)} and {tuple(y.shape)} cannot be concatenated")
        shape = [max(i, j) for i, j in zip(x.shape[1:], y.shape[1:])]
        pad = lambda t: torch.nn.functional.pad(t, [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])])  # noqa: E731
        out[k] = torch.cat([pad(x), pad(y).to(x.dtype)])
    return out


class TextRows:
    """``candidate_inputs`` of a text setting: rows → ``{"ids", "mask"}`` of their texts, tokenized by
    ``encode`` (e.g. :class:`TokenizerEncoder`); a class so that it pickles into worker processes."""

    def __init__(self, texts: Sequence[str], encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> None:
        self.texts, self.encode = list(texts), encode

    def __call__(self, rows: list[int]) -> dict[str, Tensor]:
        ids, mask = self.encode([self.texts[i] for i in rows])
        return {"ids": torch.as_tensor(ids), "mask": torch.as_tensor(mask)}


class TextItems:
    """``generated_inputs`` of a text setting: generated strings → ``{"ids", "mask"}``."""

    def __init__(self, encode: Callable[[list[str]], tuple[Tensor, Tensor]]) -> None:
        self.encode = encode

    def __call__(self, items: list[Any]) -> dict[str, Tensor]:
        ids, mask = self.encode([str(t) for t in items])
        return {"ids": torch.as_tensor(ids), "mask": torch.as_tensor(mask)}


class TokenizerEncoder:
    """Text encoding for :class:`TextRows` / :class:`TextItems`: ``texts -> tokenizer.encode_batch(texts, max_length)``
    as an ``(ids, mask)`` pair (a class, not a lambda, so that it pickles into worker processes)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        ids, mask = self.tokenizer.encode_batch(list(texts), self.max_length)
        return torch.as_tensor(ids), torch.as_tensor(mask)


def shapes_batches(sampler: Optional[NegativeSampler]) -> bool:
    """Whether ``sampler`` orders the batches itself (overrides ``batch_order``, e.g. NGAME)."""
    return sampler is not None and type(sampler).batch_order is not NegativeSampler.batch_order


def generates(sampler: Optional[NegativeSampler]) -> bool:
    """Whether ``sampler`` may add negatives to a batch (corpus rows or generated items)."""
    return sampler is not None and (sampler.num_negatives > 0 or type(sampler).sample is not NegativeSampler.sample)


def shuffled_loader(dataset: Dataset, collate: Callable[[list[Any]], Any], batch_size: int, seed: int,
                    drop_last: bool, num_workers: int, persistent: bool) -> DataLoader:
    """Seeded shuffle of whole batches, reproducible per epoch and resumable mid-epoch
    (:class:`~contrastive.data.resumable.ShuffleBatchSampler`); under DDP a plain shuffled loader that
    Lightning shards with its distributed sampler."""
    from contrastive.data.resumable import ShuffleBatchSampler

    g = torch.Generator().manual_seed(int(seed))
    if _is_distributed():
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=g,
                          collate_fn=collate, num_workers=num_workers, persistent_workers=persistent)
    batches = ShuffleBatchSampler(len(dataset), batch_size, seed=int(seed), drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batches, generator=g, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=persistent)


def attach_sampler(
    sampler: Optional[NegativeSampler],
    dataset: Dataset,
    *,
    ids: Tensor,
    groups: Optional[Tensor],
    base_collate: Callable[[list[Any]], Any],
    candidate_inputs: Optional[Callable[[list[int]], Mapping[str, Tensor]]],
    batch_size: int,
    generated_inputs: Optional[Callable[[list[Any]], Mapping[str, Tensor]]] = None,
    texts: Optional[Mapping[str, Sequence[str]]] = None,
    setup: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """The training loader of a datamodule with ``sampler`` wired in (the one place that does it).

    Sets the sampler up on the training rows (``setup``: row ``r`` = dataset item ``r`` with id ``ids[r]``
    and group ``groups[r]``; pass ``setup=False`` when the same rows were already given), appends its
    negatives to every batch (:class:`NegativeCollate`) and lets it order the batches
    (:class:`SamplerBatchSampler`, also used for per-epoch negatives on a single process). Without a
    sampler (or with one that adds nothing and keeps the order) it is a seeded shuffling loader.
    """
    if sampler is None:
        return shuffled_loader(dataset, base_collate, batch_size, seed, drop_last, num_workers, num_workers > 0)
    if setup:
        sampler.setup(ids, groups, texts)
    collate: Any = base_collate
    extra = generates(sampler)
    if extra:
        if candidate_inputs is None:
            raise ValueError(f"{type(sampler).__name__} adds negatives: the datamodule must pass candidate_inputs")
        collate = NegativeCollate(base_collate, sampler, ids, groups, candidate_inputs, generated_inputs, seed=seed)
    if not (shapes_batches(sampler) or (extra and not _is_distributed())):
        return shuffled_loader(dataset, collate, batch_size, seed, drop_last, num_workers,
                               num_workers > 0 and not extra)
    # per-epoch / refreshed negatives must reach the workers: no persistent workers with extra negatives
    batches = SamplerBatchSampler(sampler, len(dataset), batch_size, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0 and not extra)


class _EpochRows(Sampler[int]):
    """The rows of a :class:`SamplerBatchSampler`'s batches, flattened; Lightning calls ``set_epoch`` on
    ``batch_sampler.sampler`` at every epoch, which this forwards to the batch sampler."""

    def __init__(self, owner: "SamplerBatchSampler") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for b in self.owner:
            yield from b

    def __len__(self) -> int:
        return sum(len(b) for b in self.owner.local_batches())


class SamplerBatchSampler(Sampler[list[int]]):
    """Batches of training rows: ``sampler.batch_order(epoch, ...)`` when it returns batches (NGAME),
    otherwise a seeded shuffle cut into ``batch_size`` pieces.

    The epoch's generator is seeded from ``(seed, epoch)``, so an epoch's batches are reproducible and
    differ between epochs. ``set_epoch`` (called by Lightning through :attr:`sampler`) also forwards the
    epoch to the negative sampler (per-epoch random negatives).

    Args:
        sampler: the negative sampler (``None``: plain shuffling).
        n: number of training rows.
        batch_size: rows per (local) batch.
        seed: the seed.
        drop_last: drop the epoch's last batch when it is smaller than ``batch_size``.
        num_replicas, rank: shard the batches over processes (batch ``i`` goes to rank ``i % num_replicas``;
            the count is truncated to a multiple of ``num_replicas``). ``None`` = from ``torch.distributed``
            when initialised, else a single process.
    """

    def __init__(self, sampler: Optional[NegativeSampler], n: int, batch_size: int, seed: int = 0,
                 drop_last: bool = False, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"SamplerBatchSampler: n must be a positive integer (the training set is empty?); got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"SamplerBatchSampler: batch_size must be a positive integer; got {batch_size!r}")
        if num_replicas is None or rank is None:
            if _is_distributed():
                import torch.distributed as dist

                num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
                rank = dist.get_rank() if rank is None else rank
            else:
                num_replicas, rank = num_replicas or 1, rank or 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"SamplerBatchSampler: rank must be in [0, num_replicas={num_replicas}); got {rank}")
        self.negative_sampler, self.n, self.batch_size = sampler, n, batch_size
        self.seed, self.drop_last = int(seed), bool(drop_last)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._skip = 0
        self.sampler = _EpochRows(self)

    def skip_next(self, batches: int) -> None:
        """Start the next iteration after its first ``batches`` local batches (exact mid-epoch resume;
        :class:`~contrastive.callbacks.resume.ResumeStateCallback` calls it). The length is unchanged."""
        if batches < 0:
            raise ValueError(f"SamplerBatchSampler.skip_next: batches must be >= 0; got {batches}")
        self._skip = int(batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.negative_sampler is not None:
            self.negative_sampler.set_epoch(self.epoch)

    def generator(self, epoch: int) -> torch.Generator:
        s = int(_splitmix64(np.asarray(self.seed, dtype=np.uint64) ^ _splitmix64(np.asarray(epoch, dtype=np.uint64))))
        return torch.Generator().manual_seed(s & ((1 << 63) - 1))

    def global_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """All batches of ``epoch`` (every rank's), before sharding."""
        epoch = self.epoch if epoch is None else epoch
        g = self.generator(epoch)
        order = None
        if self.negative_sampler is not None:
            order = self.negative_sampler.batch_order(epoch, self.batch_size, g)
        if order is None:
            perm = torch.randperm(self.n, generator=g).tolist()
            order = [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        else:
            order = [list(map(int, b)) for b in order if len(b)]
            flat = np.fromiter((i for b in order for i in b), dtype=np.int64)
            if flat.size and (flat.min() < 0 or flat.max() >= self.n or np.unique(flat).size != flat.size):
                raise ValueError(f"{type(self.negative_sampler).__name__}.batch_order returned rows outside [0, {self.n}) "
                                 "or repeated rows; batches must be disjoint sets of training rows")
        if self.drop_last and order and len(order[-1]) < self.batch_size:
            order = order[:-1]
        return order

    def local_batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        order = self.global_batches(epoch)
        usable = len(order) - len(order) % self.num_replicas
        return order[self.rank:usable:self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._skip = self._skip, 0
        yield from self.local_batches()[skip:]

    def __len__(self) -> int:
        return len(self.local_batches())
