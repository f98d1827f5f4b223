"""Dense hard negatives from the current model, re-mined periodically (ANCE-style refresh).

Xiong et al. 2021 (ANCE, arXiv 2007.00808, methods.md §B7.4) retrieve each training query's negatives
from an ANN index of the corpus built with a recent checkpoint of the model being trained, and use them
until the next refresh. :class:`FaissHardNegativeSampler` does this synchronously:
:meth:`~FaissHardNegativeSampler.refresh` (called by
:class:`~contrastive.callbacks.refresh.NegativeRefreshCallback` every N epochs or steps)

1. encodes every training query and document with the given callables (the current model);
2. builds an index of the documents with :func:`contrastive.index.build_index` (``exact`` torch
   brute force, or FAISS ``flat`` / ``ivf_flat`` / ``hnsw`` / ``ivf_pq``; the FAISS backend uses a GPU
   when one is present);
3. searches the top ``range_max + 1 + (largest duplicate group) + search_slack`` documents per query
   (so the window survives the removal of the positive and its duplicates, the sentence-transformers
   #3872 pitfall);
4. applies the optional false-negative :class:`~contrastive.filters.FilterChain` and the mining controls
   of :func:`~contrastive.samplers.mining.select_negatives` (rank window, margins against the pair's own
   score, score bounds, top/random/softmax sampling), dedup by id
   (:func:`contrastive.samplers.table.mine_table`).

Before the first refresh (``warmup``): ``"random"`` negatives (default), ``"bm25"`` negatives (ANCE's
BM25 warm-up, computed in ``setup``), or ``"none"`` (in-batch only until the first refresh).
"""
from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS
from contrastive.samplers.mining import MiningSettings
from contrastive.samplers.base import Encode, RefreshSchedule
from contrastive.samplers.table import (MinedTable, TableSampler, candidate_depth, checked_mining, mine_table,
                                       resolve_filters, utc_now)

log = logging.getLogger(__name__)

INDEX_KINDS = ("exact", "flat", "ivf_flat", "hnsw", "ivf_pq")


def make_index(kind: str, dim: int, metric: str, **kwargs: Any) -> Any:
    """An empty :class:`contrastive.index.base.Index` of ``kind`` (:func:`contrastive.index.build_index`)."""
    from contrastive.index import build_index

    return build_index(kind, dim, metric, **kwargs)


def _as_embeddings(x: Any, n: int, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[0] != n:
        raise ValueError(f"sampler 'faiss_hard': {what} encoder returned shape {tuple(x.shape)}, expected ({n}, d)")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError(f"sampler 'faiss_hard': the {what} embeddings contain NaN or inf (diverged model?)")
    return x


@SAMPLERS.register("faiss_hard")
class FaissHardNegativeSampler(TableSampler):
    """Hard negatives mined with the current model from an index of the training documents.

    Args:
        mining: the :class:`~contrastive.samplers.mining.MiningSettings`, or its fields as keyword arguments
            (``num_negatives=2, range_max=50``, as in YAML): the rank window over the ranking without the
            positive and its known duplicates (``range_max=None`` = ``range_min + num_negatives``, 10x that
            with margins, score bounds or filters; ``range_min=3, range_max=50, sampling=random`` is the
            ANCE / FlagEmbedding recipe of skipping the very top), margins against the query–positive
            score (NV-Retriever TopK-MarginPos / -PercPos), score bounds, sampling, ``strict``.
        filters: false-negative filters (``NegativeFilter`` objects) applied to the
            retrieved candidates before the window; the filtered candidates get ``anchor_embeddings``
            (queries) and ``corpus_embeddings`` (documents) for embedding-based filters.
        fill_random: top short rows up with random negatives.
        index_kind: ``"exact"``, ``"flat"``, ``"ivf_flat"``, ``"hnsw"`` or ``"ivf_pq"``.
        metric: ``"ip"`` or ``"cosine"``.
        index_kwargs: extra keyword arguments of the index (``nlist``, ``m``, ``nprobe``, ...).
        search_slack: extra candidates retrieved per query beyond the window and the duplicates.
        warmup: negatives before the first refresh: ``"random"``, ``"bm25"`` or ``"none"``.
        refresh_every_n_epochs, refresh_every_n_steps, refresh_start_epoch: the refresh schedule read by
            ``build_callbacks`` (first refresh at the start of ``refresh_start_epoch``; 0 = mine with the
            initial weights before training).
        exclude_duplicates: never mine a known duplicate of the positive.
        seed: seed of the random sampling, the random top-up and the warm-up negatives.
    """

    name = "faiss_hard"
    needs_model = True

    def __init__(
        self,
        mining: Optional[MiningSettings] = None,
        filters: Optional[list[Any]] = None,
        fill_random: bool = False,
        index_kind: Literal["exact", "flat", "ivf_flat", "hnsw", "ivf_pq"] = "exact",
        metric: Literal["ip", "cosine"] = "ip",
        index_kwargs: Optional[dict[str, Any]] = None,
        search_slack: int = 8,
        warmup: Literal["random", "bm25", "none"] = "random",
        refresh_every_n_epochs: Optional[int] = 1,
        refresh_every_n_steps: Optional[int] = None,
        refresh_start_epoch: int = 1,
        exclude_duplicates: bool = True,
        seed: int = 0,
        **mining_fields: Any,
    ) -> None:
        self.mining = checked_mining(MiningSettings.of(mining, mining_fields, f"sampler {self.name!r}: "), self.name)
        super().__init__(num_negatives=self.mining.num_negatives, exclude_duplicates=exclude_duplicates, seed=seed)
        if index_kind not in INDEX_KINDS:
            raise ValueError(f"sampler 'faiss_hard': index_kind must be one of {INDEX_KINDS}; got {index_kind!r}")
        if metric not in ("ip", "cosine"):
            raise ValueError(f"sampler 'faiss_hard': metric must be 'ip' or 'cosine'; got {metric!r}")
        if warmup not in ("random", "bm25", "none"):
            raise ValueError(f"sampler 'faiss_hard': warmup must be 'random', 'bm25' or 'none'; got {warmup!r}")
        if isinstance(search_slack, bool) or not isinstance(search_slack, int) or search_slack < 0:
            raise ValueError(f"sampler 'faiss_hard': search_slack must be an integer >= 0; got {search_slack!r}")
        for setting, v in (("refresh_every_n_epochs", refresh_every_n_epochs), ("refresh_every_n_steps", refresh_every_n_steps)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"sampler 'faiss_hard': {setting} must be a positive integer or null; got {v!r}")
        if refresh_every_n_epochs is None and refresh_every_n_steps is None:
            raise ValueError("sampler 'faiss_hard': set refresh_every_n_epochs or refresh_every_n_steps (both are null)")
        if isinstance(refresh_start_epoch, bool) or not isinstance(refresh_start_epoch, int) or refresh_start_epoch < 0:
            raise ValueError(f"sampler 'faiss_hard': refresh_start_epoch must be an integer >= 0; got {refresh_start_epoch!r}")
        self.filters = resolve_filters(filters, "sampler.filters")
        self.fill_random = bool(fill_random)
        self.index_kind, self.metric = index_kind, metric
        self.index_kwargs = dict(index_kwargs or {})
        self.search_slack, self.warmup = search_slack, warmup
        self.schedule = RefreshSchedule(refresh_every_n_epochs, refresh_every_n_steps, refresh_start_epoch)
        self._warmup_sampler: Optional[Any] = None
        self.last_stats: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.mining.as_dict(),
                "filters": [repr(f) for f in (self.filters.filters if self.filters else [])],
                "fill_random": self.fill_random, "index_kind": self.index_kind, "metric": self.metric,
                "index_kwargs": self.index_kwargs, "search_slack": self.search_slack}

    def setup(self, ids: Tensor, groups: Optional[Tensor] = None,
              texts: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        """Store the corpus, check the window against it and prepare the warm-up negatives."""
        super().setup(ids, groups, texts)
        candidate_depth(self.mining, self.num_rows, self.max_group_size, self.search_slack,
                        self.filters is not None, self.name)  # raises on a window beyond the corpus
        self.table, self._lookup = None, None
        if self.warmup == "random":
            from contrastive.samplers.random import RandomNegativeSampler

            self._warmup_sampler = RandomNegativeSampler(self.num_negatives, self.exclude_duplicates, self.seed)
        elif self.warmup == "bm25":
            from contrastive.samplers.bm25 import BM25NegativeSampler

            self._warmup_sampler = BM25NegativeSampler(num_negatives=self.num_negatives, exclude_duplicates=self.exclude_duplicates,
                                                       seed=self.seed)
        else:
            self._warmup_sampler = None
        if self._warmup_sampler is not None:
            self._warmup_sampler.setup(ids, groups, texts)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._warmup_sampler is not None:
            self._warmup_sampler.set_epoch(epoch)

    def warmup_sample(self, rows: Tensor) -> Tensor:
        if self._warmup_sampler is None:
            return super().warmup_sample(rows)
        return self._warmup_sampler.sample(rows)

    def search_depth(self) -> int:
        """Candidates retrieved per query (see :func:`contrastive.samplers.table.candidate_depth`)."""
        return candidate_depth(self.mining, self.num_rows, self.max_group_size, self.search_slack,
                               self.filters is not None, self.name)

    def mine_embeddings(self, query_emb: Tensor, doc_emb: Tensor, step: int = 0) -> tuple[MinedTable, dict[str, float]]:
        """Mine from precomputed embeddings ``(N, d)`` of the training queries and documents."""
        n = self.num_rows
        q = _as_embeddings(query_emb, n, "query")
        d = _as_embeddings(doc_emb, n, "document")
        if q.shape[1] != d.shape[1]:
            raise ValueError(f"sampler 'faiss_hard': query dim {q.shape[1]} != document dim {d.shape[1]}")
        index = make_index(self.index_kind, d.shape[1], self.metric, **self.index_kwargs)
        index.add(d)
        depth = self.search_depth()
        scores, ids = index.search(q, depth, allow_fewer=True)
        if self.metric == "cosine":
            qn, dn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(d, dim=1)
            pos = (qn * dn).sum(dim=1)
        else:
            qn, dn = q, d
            pos = (q * d).sum(dim=1)
        rows = torch.arange(n)
        table, stats = mine_table(self, scores, ids.long(), rows, pos, mining=self.mining, filters=self.filters,
                                  seed=self.seed + 1_000_003 * int(step), fill_random=self.fill_random,
                                  anchor_embeddings=qn, corpus_embeddings=dn)
        table.header.update({"sampler": {"name": self.name, "settings": self.settings()},
                             "corpus": {"size": n, "fingerprint": self.corpus_fingerprint()},
                             "created": utc_now(), "stats": stats,
                             "info": {"candidates": depth, "index": self.index_kind, "metric": self.metric,
                                      "step": int(step)}})
        return table, stats

    @property
    def refresh_schedule(self) -> RefreshSchedule:
        return self.schedule

    def refresh(self, encode: Encode, step: int) -> dict[str, float]:
        """Encode the training rows with the current model, re-mine and install the new table."""
        self._check_ready()
        rows = torch.arange(self.num_rows)
        q = encode(rows, "anchor")
        d = encode(rows, "candidate")
        table, stats = self.mine_embeddings(q, d, step)
        self.set_table(table)
        self.last_stats = stats
        log.info("faiss_hard refresh at step %d: %d queries, %.1f%% short, mean negative score %.3f", step,
                 self.num_rows, 100 * stats["short_fraction"], float(table.scores.nanmean()) if table.scores.numel() else float("nan"))
        return stats
