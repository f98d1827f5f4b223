"""A MoCo-style FIFO memory queue of past candidate embeddings (He et al. 2020, "Momentum Contrast for
Unsupervised Visual Representation Learning", arXiv 1911.05722).

The queue stores **detached** embeddings together with their ``pair_id`` and ``dup_group`` so that the
masks of queued candidates are derived from ids exactly like those of in-batch candidates
(:meth:`MemoryQueue.masks`). It is an :class:`torch.nn.Module` whose whole state lives in registered
buffers, so it follows ``.to(device/dtype)`` and is saved in (and restored from) every checkpoint.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class MemoryQueue(nn.Module):
    """Fixed-size FIFO (ring buffer) of ``(embedding, pair_id, dup_group)`` triples.

    Args:
        size: capacity ``S`` (number of embeddings kept); the oldest entries are overwritten first.
        dim: embedding size ``d``.

    Buffers (all saved in ``state_dict``): ``embeddings`` ``(S, d)`` float, ``ids`` ``(S,)`` long,
    ``groups`` ``(S,)`` long, ``ptr`` ``()`` long (next slot to write) and ``count`` ``()`` long (filled
    slots, ``<= S``).

    Masking rule (see :meth:`masks`): a queued entry is **never a positive and never a negative** of an
    anchor whose ``pair_id`` it carries: it is a stale copy (encoded by an older encoder) of that anchor's
    own positive, so it is treated as a *false negative* and removed from the denominator. Entries in the
    anchor's duplicate group are masked the same way when ``mask_known_duplicates`` is on.

    Under DDP enqueue the **gathered** (all-rank, rank-ordered) keys on every rank, so that every rank holds
    an identical queue (:class:`~contrastive.models.contrastive.ContrastiveModule` does this).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if int(size) <= 0:
            raise ValueError(f"queue size must be a positive integer; got {size}")
        if int(dim) <= 0:
            raise ValueError(f"queue dim must be a positive integer; got {dim}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("embeddings", torch.zeros(self.size, self.dim))
        self.register_buffer("ids", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("groups", torch.full((self.size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.count.item())

    @torch.no_grad()
    def enqueue(self, emb: Tensor, ids: Tensor, groups: Optional[Tensor] = None) -> None:
        """Append ``K`` entries, overwriting the oldest ones when full.

        Args:
            emb: ``(K, d)`` embeddings (detached and cast to the queue's dtype/device here).
            ids: ``(K,)`` integer ``pair_id`` of each entry.
            groups: ``(K,)`` integer ``dup_group``; ``None`` uses ``ids``. With ``K > S`` only the last
                ``S`` entries are kept.
        """
        groups = ids if groups is None else groups
        if emb.dim() != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"queue expects embeddings of shape (K, {self.dim}); got {tuple(emb.shape)}")
        k = emb.shape[0]
        if tuple(ids.shape) != (k,) or tuple(groups.shape) != (k,):
            raise ValueError(f"ids and groups must have shape ({k},); got {tuple(ids.shape)} and {tuple(groups.shape)}")
        if ids.is_floating_point() or groups.is_floating_point():
            raise ValueError(f"ids and groups must be integer tensors; got {ids.dtype} and {groups.dtype}")
        if k == 0:
            return
        if k > self.size:
            emb, ids, groups, k = emb[-self.size:], ids[-self.size:], groups[-self.size:], self.size
        slots = (int(self.ptr.item()) + torch.arange(k, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = emb.detach().to(self.embeddings.device, self.embeddings.dtype)
        self.ids[slots] = ids.to(self.ids.device, torch.long)
        self.groups[slots] = groups.to(self.groups.device, torch.long)
        self.ptr.fill_((int(self.ptr.item()) + k) % self.size)
        self.count.fill_(min(self.size, int(self.count.item()) + k))

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """The filled entries, oldest first: ``(embeddings (n, d), ids (n,), groups (n,))``, ``n = len(self)``.

        Returned tensors are detached (no gradient ever flows into the queue)."""
        n, p = len(self), int(self.ptr.item())
        if n < self.size:
            order = torch.arange(n, device=self.ids.device)
        else:
            order = (p + torch.arange(self.size, device=self.ids.device)) % self.size
        return self.embeddings[order].detach(), self.ids[order], self.groups[order]

    def reset(self) -> None:
        """Empty the queue (e.g. after changing the encoder)."""
        self.ptr.zero_()
        self.count.zero_()
        self.ids.fill_(-1)
        self.groups.fill_(-1)

    @staticmethod
    def masks(anchor_ids: Tensor, anchor_groups: Tensor, queue_ids: Tensor, queue_groups: Tensor,
              mask_known_duplicates: bool = True) -> tuple[Tensor, Tensor]:
        """``(positive (B, n), false_negative (B, n))`` bool masks of anchors against queued entries.

        ``positive`` is all False (a queued key is a stale copy, never a target); ``false_negative`` marks
        entries with the anchor's own ``pair_id`` (always) or, with ``mask_known_duplicates``, its
        ``dup_group``.
        """
        same = anchor_ids[:, None] == queue_ids[None, :]
        if mask_known_duplicates:
            same = same | (anchor_groups[:, None] == queue_groups[None, :])
        return torch.zeros_like(same), same

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
