"""Pure tensor helpers shared by the false-negative filters and the hard-negative miner.

Conventions used throughout :mod:`contrastive.filters` and :mod:`contrastive.samplers.mining`:

- ids are ``long`` row indices into a corpus of ``N`` items; any negative id (``-1``) is padding and
  never matches anything, not even another ``-1``;
- a score of ``-inf`` or ``NaN`` is padding (a FAISS search that returned fewer than ``k`` hits, or an
  entry masked upstream); padding is never a candidate and never counted as removed.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

IdsLike = Union[Tensor, Sequence[Sequence[int]]]
ScoresLike = Union[Tensor, Sequence[Sequence[float]]]


def pad_ids(ids: IdsLike, num_rows: int, *, name: str, device: torch.device | None = None) -> Tensor:
    """Normalise per-row id sets to a padded ``(Q, P)`` long tensor with ``-1`` padding.

    Accepts a list of lists (ragged), a ``(Q, P)`` integer tensor with ``-1`` padding, or a ``(Q,)``
    tensor (one id per row). ``P`` may be 0 (no ids at all).
    """
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor; got {ids.dtype}")
        if ids.dim() == 1:
            ids = ids.unsqueeze(1)
        if ids.dim() != 2 or ids.shape[0] != num_rows:
            raise ValueError(f"{name} must have shape (Q, P) with Q = {num_rows}; got {tuple(ids.shape)}")
        out = ids.to(dtype=torch.long, device=device)
        return torch.where(out < 0, torch.full_like(out, -1), out)
    rows = list(ids)
    if len(rows) != num_rows:
        raise ValueError(f"{name} must have one id list per query (Q = {num_rows}); got {len(rows)} lists")
    width = max((len(r) for r in rows), default=0)
    out = torch.full((num_rows, width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    out = torch.where(out < 0, torch.full_like(out, -1), out)
    return out.to(device) if device is not None else out


def pad_scores(scores: ScoresLike, shape: tuple[int, int], *, name: str, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalise per-row scores to a ``(Q, P)`` float tensor aligned with :func:`pad_ids` (NaN padding)."""
    q, p = shape
    if isinstance(scores, Tensor):
        if not scores.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor; got {scores.dtype}")
        if scores.dim() == 1:
            scores = scores.unsqueeze(1)
        if tuple(scores.shape) != (q, p):
            raise ValueError(f"{name} must have shape (Q, P) = {(q, p)} to match the positive ids; got {tuple(scores.shape)}")
        return scores.to(device) if device is not None else scores
    rows = list(scores)
    if len(rows) != q:
        raise ValueError(f"{name} must have one score list per query (Q = {q}); got {len(rows)} lists")
    out = torch.full((q, p), float("nan"), dtype=dtype)
    for i, r in enumerate(rows):
        if len(r) > p:
            raise ValueError(f"{name}[{i}] has {len(r)} scores but only {p} positive ids")
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=dtype)
    return out.to(device) if device is not None else out


def rowwise_isin(values: Tensor, sets: Tensor) -> Tensor:
    """``(Q, K)`` bool: ``values[q, k]`` is one of the ids in ``sets[q, :]``.

    Negative entries of either tensor are padding and never match. Vectorised with a batched
    ``searchsorted`` (``O(Q K log P)`` time, ``O(Q K)`` memory), no Python loop over rows.

    Args:
        values: ``(Q, K)`` long.
        sets: ``(Q, P)`` long, ``-1`` padding; ``P`` may be 0.
    """
    if sets.shape[1] == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if sets.shape[1] <= 8:  # a few ids per row: a broadcast compare beats sorting
        return (values.unsqueeze(2) == sets.unsqueeze(1)).any(dim=2) & (values >= 0)
    sorted_sets = sets.sort(dim=1).values.contiguous()
    idx = torch.searchsorted(sorted_sets, values.contiguous()).clamp_(max=sets.shape[1] - 1)
    return (sorted_sets.gather(1, idx) == values) & (values >= 0)


def duplicate_mask(ids: Tensor) -> Tensor:
    """``(Q, K)`` bool: True at every repeat of an id already seen earlier in the same row.

    The first occurrence in column order is kept (so sort the row by score first to keep the best-scored
    copy). Negative ids (padding) are never flagged. Dedup is by **id**, never by text.
    """
    sorted_ids, perm = ids.sort(dim=1, stable=True)
    rep = torch.zeros_like(sorted_ids, dtype=torch.bool)
    rep[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    out = torch.zeros_like(rep).scatter_(1, perm, rep)
    return out & (ids >= 0)


def min_positive_score(positive_scores: Tensor, positive_ids: Tensor | None = None) -> Tensor:
    """``(Q,)`` minimum over each row's positive scores, ignoring padding; NaN where a row has none.

    Padding is a non-finite score (NaN, ``-inf``) or, when ``positive_ids`` is given, a ``-1`` id. The
    minimum is used with several positives (as sentence-transformers' ``mine_hard_negatives``): a
    negative must sit below *every* positive to be trusted.

    Args:
        positive_scores: ``(Q, P)`` or ``(Q,)`` float.
        positive_ids: ``(Q, P)`` long or ``None``.
    """
    s = positive_scores if positive_scores.dim() == 2 else positive_scores.unsqueeze(1)
    valid = torch.isfinite(s)
    if positive_ids is not None:
        pid = positive_ids if positive_ids.dim() == 2 else positive_ids.unsqueeze(1)
        if pid.shape != s.shape:
            raise ValueError(f"positive_ids {tuple(pid.shape)} and positive_scores {tuple(s.shape)} must have the same shape")
        valid = valid & (pid >= 0)
    if s.shape[1] == 0:
        return torch.full((s.shape[0],), float("nan"), dtype=s.dtype, device=s.device)
    m = torch.where(valid, s, torch.full_like(s, float("inf"))).amin(dim=1)
    return torch.where(valid.any(dim=1), m, torch.full_like(m, float("nan")))


def absolute_threshold(positive_score: Tensor, margin: float) -> Tensor:
    """``p - margin``: a negative is trusted iff its score is ``<=`` this (TopK-MarginPos, Moreira et al. 2024)."""
    return positive_score - margin


def relative_threshold(positive_score: Tensor, margin: float) -> Tensor:
    """Sign-safe relative threshold ``p - |p| * margin``.

    Equal to the textbook ``p * (1 - margin)`` for ``p >= 0``; for ``p < 0`` the textbook form would move
    the threshold *above* the positive (``-0.5 * 0.95 = -0.475 > -0.5``), letting negatives that outscore
    the positive through. This form always stays at or below ``p`` for ``margin >= 0``
    (sentence-transformers issue #3819 / PR #3821; NV-Retriever TopK-PercPos with ``margin = 1 - perc``).
    """
    return positive_score - positive_score.abs() * margin


def valid_candidates(scores: Tensor, candidate_ids: Tensor | None) -> Tensor:
    """``(Q, K)`` bool: non-padding candidates (id ``>= 0`` and a score that is neither NaN nor ``-inf``)."""
    valid = ~torch.isnan(scores) & (scores != float("-inf"))
    if candidate_ids is not None:
        valid = valid & (candidate_ids >= 0)
    return valid


def gather_corpus(values: Tensor, ids: Tensor, fill: int | float = -1) -> Tensor:
    """Look up a per-corpus-item tensor ``values (N, ...)`` at ``ids (...)``; ``-1`` ids give ``fill``.

    Raises ``IndexError`` naming the offending id when an id is ``>= N``.
    """
    n = values.shape[0]
    if ids.numel() and int(ids.max()) >= n:
        raise IndexError(f"id {int(ids.max())} is out of range for a corpus of {n} items")
    safe = ids.clamp_min(0)
    out = values[safe]
    pad = (ids < 0).view(*ids.shape, *([1] * (out.dim() - ids.dim())))
    return torch.where(pad, torch.full_like(out, fill), out)
