"""Hard-negative mining controls: turn an index search's candidate scores into mined negatives.

This is the control set of sentence-transformers' ``mine_hard_negatives`` (methods.md §B7.6) as a
pure, vectorised tensor function, with the pitfalls users hit fixed (peers.md §3, §5.2):

- positives (several per query) are never negatives, and dedup is by **id**, never by text;
- the relative margin is sign-safe (ST #3819 / PR #3821): ``p - |p| * margin``, never ``p * (1 - margin)``;
- a query short of negatives is padded with ``-1`` and counted (ST PR #3504), or raises when ``strict``;
- NaN / ``-inf`` scores and ``-1`` ids (FAISS padding) are never mined (ST PR #3872).

Order of operations for each query (every step is counted in :attr:`MinedNegatives.stats`):

1. drop padding (id ``< 0``, score NaN or ``-inf``);
2. sort by score, descending (ties keep the input column order);
3. drop the query's positives and ``exclude_ids`` (by id), then repeated ids (the best-scored copy stays);
4. **rank window** ``[range_min, range_max)``: ranks are 0-based positions in the ranking of step 3,
   i.e. *with the query's positives removed*, so ``range_min=2`` skips the two hardest non-positives
   whatever the filters below do (NV-Retriever's "top-k shifted by N", FlagEmbedding's
   ``range_for_sampling``). ``window_after_filters=True`` instead ranks the survivors of step 5,
   which is what sentence-transformers does;
5. score filters against ``p``, the query's **minimum** positive score (a negative must sit below every
   positive): ``absolute_margin`` keeps ``s <= p - absolute_margin``; ``relative_margin`` keeps
   ``s <= p - |p| * relative_margin`` (equal to ``p * (1 - margin)`` for ``p >= 0``, and still below
   ``p`` for ``p < 0``); ``max_score`` keeps ``s <= max_score``; ``min_score`` keeps ``s >= min_score``.
   Both margins may be set: both apply, so the stricter one binds. Each control's count is the number of
   candidates it removed that the earlier controls (in the order listed) had not;
6. sample ``num_negatives`` survivors: ``"top"`` (the highest), ``"random"`` (uniform without
   replacement) or ``"softmax"`` (without replacement, probability ``∝ exp(s / temperature)``, the
   NV-Retriever "sampled top-k" when combined with ``range_max``); output is sorted by descending score.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from contrastive.filters.functional import (
    IdsLike,
    ScoresLike,
    absolute_threshold,
    duplicate_mask,
    min_positive_score,
    pad_ids,
    pad_scores,
    relative_threshold,
    rowwise_isin,
    valid_candidates,
)

Sampling = Literal["top", "random", "softmax"]
_SAMPLINGS = ("top", "random", "softmax")
_COUNT_KEYS = (
    "padding",
    "removed_positives",
    "removed_excluded",
    "removed_duplicates",
    "removed_window",
    "removed_absolute_margin",
    "removed_relative_margin",
    "removed_max_score",
    "removed_min_score",
    "survivors",
    "selected",
    "queries_short",
    "queries_empty",
)


@dataclass
class MinedNegatives:
    """Mined negatives for ``Q`` queries.

    Attributes:
        ids: ``(Q, num_negatives)`` long corpus ids, sorted by descending score, ``-1`` padding at the end
            of rows that had fewer survivors than asked.
        scores: ``(Q, num_negatives)`` their scores, ``-inf`` at padding.
        counts: ``(Q,)`` long number of real negatives per row.
        stats: counts of what each control removed (``padding``, ``removed_positives``,
            ``removed_excluded``, ``removed_duplicates``, ``removed_window``, ``removed_absolute_margin``,
            ``removed_relative_margin``, ``removed_max_score``, ``removed_min_score``), ``survivors``
            (candidates left to sample from), ``selected``, ``queries``, ``queries_short`` (rows with
            fewer than ``num_negatives``), ``queries_empty`` (rows with none) and ``short_fraction``.
    """

    ids: Tensor
    scores: Tensor
    counts: Tensor
    stats: dict[str, Union[int, float]] = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        """``(Q, num_negatives)`` bool: real (non-padding) negatives."""
        return self.ids >= 0


def _check_int(value: object, setting: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{setting} must be an integer >= {minimum}; got {value!r}")
    return value


def _check_float(value: Optional[float], setting: str, non_negative: bool = False) -> Optional[float]:
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{setting} must be finite; got {value!r}")
    if non_negative and v < 0:
        raise ValueError(f"{setting} must be >= 0; got {value!r}")
    return v


@dataclass(frozen=True)
class MiningSettings:
    """The mining controls of :func:`select_negatives`, validated at construction (a bad config fails
    before any mining, with an error naming the setting). Every miner and corpus sampler takes them.

    Attributes:
        num_negatives: negatives per query, ``>= 1``.
        range_min, range_max: rank window ``[range_min, range_max)`` over the positive-free ranking
            (``range_max=None``: to the end).
        sampling: ``"top"`` (best first), ``"random"`` (uniform in the window) or ``"softmax"``
            (``exp(s / temperature)``).
        absolute_margin, relative_margin: keep ``s <= p - absolute_margin`` / ``s <= p - |p| *
            relative_margin``, ``p`` the query's lowest positive score (NV-Retriever's TopK-MarginPos /
            TopK-PercPos).
        max_score, min_score: keep ``min_score <= s <= max_score``.
        strict: raise when a query gets fewer than ``num_negatives`` (default: pad with ``-1``).
        window_after_filters: rank the window over the score-filter survivors (sentence-transformers'
            semantics) instead of over the positive-free ranking.
        temperature: ``> 0``, for ``sampling="softmax"``.
    """

    num_negatives: int = 1
    range_min: int = 0
    range_max: Optional[int] = None
    sampling: Sampling = "top"
    absolute_margin: Optional[float] = None
    relative_margin: Optional[float] = None
    max_score: Optional[float] = None
    min_score: Optional[float] = None
    strict: bool = False
    window_after_filters: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check_int(self.num_negatives, "num_negatives", 1)
        _check_int(self.range_min, "range_min", 0)
        if self.range_max is not None:
            _check_int(self.range_max, "range_max", 1)
            if self.range_max <= self.range_min:
                raise ValueError(f"range_max must be > range_min (the window is [range_min, range_max)); got "
                                 f"range_min={self.range_min}, range_max={self.range_max}")
        if self.sampling not in _SAMPLINGS:
            raise ValueError(f"sampling must be one of {_SAMPLINGS}; got {self.sampling!r}")
        _check_float(self.absolute_margin, "absolute_margin", non_negative=True)
        _check_float(self.relative_margin, "relative_margin", non_negative=True)
        hi, lo = _check_float(self.max_score, "max_score"), _check_float(self.min_score, "min_score")
        if hi is not None and lo is not None and lo > hi:
            raise ValueError(f"min_score must be <= max_score; got min_score={lo}, max_score={hi}")
        t = _check_float(self.temperature, "temperature")
        if t is None or t <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature!r}")

    @classmethod
    def of(cls, settings: Optional["MiningSettings"], fields: dict[str, Any], where: str = "") -> "MiningSettings":
        """``settings``, or settings built from keyword ``fields`` (not both); errors prefixed by ``where``."""
        if settings is not None and fields:
            raise TypeError(f"{where}pass MiningSettings or its fields ({', '.join(sorted(fields))}), not both")
        if settings is not None:
            return settings
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{where}unknown mining setting(s) {', '.join(unknown)}")
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rank_window(mask: Tensor, range_min: int, range_max: Optional[int]) -> Tensor:
    """Keep the entries of ``mask`` whose 0-based rank among the True entries of their row is in the window."""
    rank = mask.cumsum(dim=1) - 1
    keep = mask & (rank >= range_min)
    if range_max is not None:
        keep &= rank < range_max
    return keep


def _select_block(
    scores: Tensor,
    candidate_ids: Tensor,
    pos: Tensor,
    excl: Optional[Tensor],
    p_min: Optional[Tensor],
    m: MiningSettings,
    generator: Optional[torch.Generator],
) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
    """:func:`select_negatives` on one block of queries (already validated); see the module docstring."""
    num_negatives, range_min, range_max, sampling = m.num_negatives, m.range_min, m.range_max, m.sampling
    absolute_margin, relative_margin, max_score, min_score = m.absolute_margin, m.relative_margin, m.max_score, m.min_score
    window_after_filters, temperature = m.window_after_filters, float(m.temperature)
    q, k = scores.shape
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    stats: dict[str, int] = {}

    # 1-2. padding out, sort descending (stable: ties keep column order)
    valid = valid_candidates(scores, candidate_ids)
    stats["padding"] = int((~valid).sum())
    masked = torch.where(valid, scores, neg_inf)
    if bool((masked[:, 1:] <= masked[:, :-1]).all()):  # index-search output is usually sorted already
        s, ids = scores, candidate_ids
    else:
        order = masked.argsort(dim=1, descending=True, stable=True)
        s = scores.gather(1, order)
        ids = candidate_ids.gather(1, order)
        valid = valid.gather(1, order)

    # 3. positives, excluded ids, duplicates (by id)
    is_pos = rowwise_isin(ids, pos) & valid
    stats["removed_positives"] = int(is_pos.sum())
    rest = valid & ~is_pos
    if excl is not None:
        is_excl = rowwise_isin(ids, excl) & rest
        rest &= ~is_excl
        stats["removed_excluded"] = int(is_excl.sum())
    else:
        stats["removed_excluded"] = 0
    is_dup = duplicate_mask(torch.where(rest, ids, torch.full_like(ids, -1)))
    stats["removed_duplicates"] = int(is_dup.sum())
    eligible = rest & ~is_dup

    # 4-5. rank window and score filters
    filters: list[tuple[str, Tensor]] = []
    if absolute_margin is not None:
        filters.append(("absolute_margin", s <= absolute_threshold(p_min, absolute_margin).view(-1, 1).to(s.dtype)))
    if relative_margin is not None:
        filters.append(("relative_margin", s <= relative_threshold(p_min, relative_margin).view(-1, 1).to(s.dtype)))
    if max_score is not None:
        filters.append(("max_score", s <= max_score))
    if min_score is not None:
        filters.append(("min_score", s >= min_score))
    for name in ("absolute_margin", "relative_margin", "max_score", "min_score"):
        stats[f"removed_{name}"] = 0

    cur = eligible
    if not window_after_filters:
        win = _rank_window(cur, range_min, range_max)
        stats["removed_window"] = int(cur.sum() - win.sum())
        cur = win
    for name, passes in filters:
        stats[f"removed_{name}"] = int((cur & ~passes).sum())
        cur = cur & passes
    if window_after_filters:
        win = _rank_window(cur, range_min, range_max)
        stats["removed_window"] = int(cur.sum() - win.sum())
        cur = win
    survivors = cur
    stats["survivors"] = int(survivors.sum())

    # 6. sampling: a key per survivor, top-k of the keys, then back to score order
    if sampling == "top":
        key = (k - torch.arange(k, device=s.device, dtype=torch.float64)).expand(q, k)
    elif sampling == "random":
        key = torch.rand(q, k, generator=generator, device=s.device, dtype=torch.float64)
    else:  # Gumbel-top-k: sampling without replacement with probability softmax(s / temperature)
        u = torch.rand(q, k, generator=generator, device=s.device, dtype=torch.float64)
        u = u.clamp(torch.finfo(torch.float64).tiny, 1.0 - torch.finfo(torch.float64).eps)
        key = torch.where(survivors, s.double(), torch.zeros_like(u)) / temperature - torch.log(-torch.log(u))
    key = torch.where(survivors, key, torch.full_like(key, float("-inf")))
    m = min(num_negatives, k)
    top_vals, top_pos = key.topk(m, dim=1)
    picked = torch.where(top_vals > float("-inf"), top_pos, torch.full_like(top_pos, k)).sort(dim=1).values
    real = picked < k
    idx = picked.clamp(max=k - 1)
    out_ids = torch.where(real, ids.gather(1, idx), torch.full_like(idx, -1))
    out_scores = torch.where(real, s.gather(1, idx), neg_inf)
    if m < num_negatives:
        out_ids = torch.cat([out_ids, out_ids.new_full((q, num_negatives - m), -1)], dim=1)
        out_scores = torch.cat([out_scores, out_scores.new_full((q, num_negatives - m), float("-inf"))], dim=1)
    counts = real.sum(dim=1)
    stats["selected"] = int(counts.sum())
    stats["queries_short"] = int((counts < num_negatives).sum())
    stats["queries_empty"] = int((counts == 0).sum())
    return out_ids, out_scores, counts, stats


def select_negatives(
    scores: Tensor,
    candidate_ids: Tensor,
    positive_ids: IdsLike,
    positive_scores: Optional[ScoresLike] = None,
    settings: Optional[MiningSettings] = None,
    *,
    generator: Optional[torch.Generator] = None,
    exclude_ids: Optional[IdsLike] = None,
    chunk_size: Optional[int] = 16384,
    **fields: Any,
) -> MinedNegatives:
    """Mine ``num_negatives`` negatives per query from index-search candidates (see the module docstring
    for the exact order of operations; cf. sentence-transformers ``mine_hard_negatives``, NV-Retriever).

    Args:
        scores: ``(Q, K)`` float query–candidate scores, in any order; NaN / ``-inf`` = padding.
        candidate_ids: ``(Q, K)`` long corpus ids of the candidates; ``-1`` = padding.
        positive_ids: each query's positive ids: a ragged list of lists, a ``(Q, P)`` long tensor with
            ``-1`` padding, or a ``(Q,)`` tensor. Positives are never mined.
        positive_scores: scores of those positives, ``(Q, P)`` aligned with ``positive_ids`` (or a ragged
            list); NaN / ``-inf`` = padding. Needed only by the margins, which use the per-query minimum.
        settings: the :class:`MiningSettings` (or pass its fields as keyword arguments). A window wider
            than the candidates uses what exists; with ``strict`` the error names the window,
            ``num_negatives``, ``K`` and the first short queries, otherwise short rows are padded with
            ``-1`` and counted in ``stats["queries_short"]``.
        generator: RNG for ``"random"``/``"softmax"`` (on the scores' device); ``None`` = global RNG.
        exclude_ids: extra ids never to mine per query (same formats as ``positive_ids``), e.g. the
            query's own corpus id or known duplicates of its positives.
        chunk_size: queries processed per vectorised block (bounds peak memory to a few ``chunk_size x K``
            tensors); ``None`` = all at once. Random draws depend on it only through the block layout.

    Returns:
        :class:`MinedNegatives`.
    """
    m = MiningSettings.of(settings, fields)
    num_negatives, range_min, range_max, sampling = m.num_negatives, m.range_min, m.range_max, m.sampling
    absolute_margin, relative_margin, max_score, min_score = m.absolute_margin, m.relative_margin, m.max_score, m.min_score
    strict, window_after_filters, temperature = m.strict, m.window_after_filters, m.temperature
    if chunk_size is not None:
        _check_int(chunk_size, "chunk_size", 1)
    if not isinstance(scores, Tensor) or not isinstance(candidate_ids, Tensor):
        raise TypeError("scores and candidate_ids must be tensors")
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (Q, K) tensor; got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point; got {scores.dtype}")
    if tuple(candidate_ids.shape) != tuple(scores.shape):
        raise ValueError(f"candidate_ids must have the shape of scores {tuple(scores.shape)}; got {tuple(candidate_ids.shape)}")
    if candidate_ids.is_floating_point() or candidate_ids.dtype == torch.bool:
        raise TypeError(f"candidate_ids must be an integer tensor; got {candidate_ids.dtype}")
    scores = scores.detach()
    if torch.isposinf(scores).any():
        raise ValueError("scores contain +inf; use NaN or -inf for padding")
    q, k = scores.shape
    dev = scores.device
    candidate_ids = candidate_ids.to(torch.long)
    pos = pad_ids(positive_ids, q, name="positive_ids", device=dev)
    excl = pad_ids(exclude_ids, q, name="exclude_ids", device=dev) if exclude_ids is not None else None

    p_min = None
    if absolute_margin is not None or relative_margin is not None:
        setting = "absolute_margin" if absolute_margin is not None else "relative_margin"
        if positive_scores is None:
            raise ValueError(f"{setting} needs positive_scores (the margins are relative to the positive's score)")
        ps = pad_scores(positive_scores, tuple(pos.shape), name="positive_scores", device=dev, dtype=scores.dtype)
        p_min = min_positive_score(ps.detach(), pos)
        missing = torch.isnan(p_min).nonzero().flatten()
        if missing.numel():
            raise ValueError(
                f"{setting} needs a finite positive score for every query; queries {missing[:5].tolist()} have none"
            )

    step = q if chunk_size is None else chunk_size
    parts = []
    totals = dict.fromkeys(_COUNT_KEYS, 0)
    for start in range(0, q, step):
        sl = slice(start, start + step)
        out = _select_block(
            scores[sl], candidate_ids[sl], pos[sl], None if excl is None else excl[sl],
            None if p_min is None else p_min[sl], m, generator,
        )
        parts.append(out[:3])
        for key, v in out[3].items():
            totals[key] += v
    ids = torch.cat([p[0] for p in parts])
    out_scores = torch.cat([p[1] for p in parts])
    counts = torch.cat([p[2] for p in parts])
    stats: dict[str, Union[int, float]] = {"queries": q, "candidates": q * k, **totals}
    stats["short_fraction"] = totals["queries_short"] / q

    if strict and totals["queries_short"]:
        short = (counts < num_negatives).nonzero().flatten()
        first = short[:5].tolist()
        removed = {key: v for key, v in totals.items() if key.startswith("removed_") and v}
        raise ValueError(
            f"select_negatives(strict=True): {len(short)} of {q} queries got fewer than num_negatives={num_negatives} "
            f"negatives (query index {first[0]} got {int(counts[first[0]])}; first short queries {first}) with "
            f"range_min={range_min}, range_max={range_max} over K={k} candidates per query; removed: {removed}. "
            f"Lower num_negatives, widen [range_min, range_max), relax the margins, retrieve more candidates "
            f"(K >= range_min + num_negatives + number of positives), or pass strict=False to pad with -1."
        )
    return MinedNegatives(ids=ids, scores=out_scores, counts=counts, stats=stats)


class HardNegativeMiner:
    """Thin, configurable shell over :func:`select_negatives` (settings are validated at construction).

    Args:
        settings: the :class:`MiningSettings` (or pass its fields as keyword arguments).
        seed: seed of a private RNG for ``"random"``/``"softmax"`` sampling (``None`` = the global RNG).
        chunk_size: queries per vectorised block.

    Call it as ``miner(scores, candidate_ids, positive_ids, positive_scores=None, exclude_ids=None)``.
    """

    def __init__(self, settings: Optional[MiningSettings] = None, seed: Optional[int] = None,
                 chunk_size: Optional[int] = 16384, **fields: Any) -> None:
        self.settings = MiningSettings.of(settings, fields)
        self.seed, self.chunk_size = seed, chunk_size
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def __call__(
        self,
        scores: Tensor,
        candidate_ids: Tensor,
        positive_ids: IdsLike,
        positive_scores: Optional[ScoresLike] = None,
        exclude_ids: Optional[IdsLike] = None,
    ) -> MinedNegatives:
        return select_negatives(scores, candidate_ids, positive_ids, positive_scores, self.settings,
                                exclude_ids=exclude_ids, generator=self._generator(scores.device),
                                chunk_size=self.chunk_size)

    def __repr__(self) -> str:
        return f"HardNegativeMiner({self.settings!r}, seed={self.seed!r}, chunk_size={self.chunk_size!r})"
