"""Lexical hard negatives: BM25 top-k of each training query over the training documents (DPR).

Karpukhin et al. 2020 (DPR, arXiv 2004.04906) train with, per question, one "BM25 negative": a top
passage of BM25 that does not contain the answer. Here the BM25 ranking of every training query over
the training documents is computed **once** in :meth:`BM25NegativeSampler.setup` (with the ``bm25s``
package, Lù 2024, arXiv 2407.03618), then turned into negatives by the same controls as every other
miner (:func:`contrastive.samplers.table.mine_table`: the positive and its known duplicates removed by
id, rank window, score bounds, top/random/softmax sampling, optional false-negative filters).

Scoring is the library's one BM25 (:class:`contrastive.baselines.bm25.BM25Retriever`, with its code-aware
tokenizer :func:`~contrastive.baselines.bm25.code_tokens`), the same as the BM25 baseline of the test report.

Candidates with a BM25 score of 0 (no shared term) are not lexical neighbours; ``min_score`` defaults
to a tiny positive value so they are never mined, and ``fill_random`` tops short rows up with random
negatives instead.
"""
from __future__ import annotations

import logging
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor

from contrastive.baselines.bm25 import BM25Retriever
from contrastive.registry import SAMPLERS
from contrastive.samplers.mining import MiningSettings
from contrastive.samplers.table import (MinedTable, TableSampler, candidate_depth, checked_mining, mine_table,
                                       resolve_filters, utc_now)

log = logging.getLogger(__name__)


@SAMPLERS.register("bm25")
class BM25NegativeSampler(TableSampler):
    """BM25 hard negatives, mined once in :meth:`setup` (DPR-style lexical negatives).

    Args:
        mining: the :class:`~contrastive.samplers.mining.MiningSettings` (rank window over the BM25 ranking
            without the positive and its known duplicates, margins against the BM25 score of the pair
            itself, score bounds, sampling), or its fields as keyword arguments (``num_negatives=2``, as
            in YAML). Here ``min_score`` defaults to ``1e-6``, which drops zero-score candidates.
        filters: optional false-negative filters (``NegativeFilter`` objects) applied before the window.
        fill_random: top short rows up with random negatives (score NaN in the table).
        candidates: BM25 depth per query; ``None`` = derived from the window (``candidate_depth``).
        k1, b: BM25 parameters.
        exclude_duplicates: never mine a known duplicate of the positive.
        seed: seed of the random sampling and of the random top-up.
    """

    name = "bm25"

    def __init__(
        self,
        mining: Optional[MiningSettings] = None,
        filters: Optional[list[Any]] = None,
        fill_random: bool = True,
        candidates: Optional[int] = None,
        k1: float = 1.5,
        b: float = 0.75,
        exclude_duplicates: bool = True,
        seed: int = 0,
        **mining_fields: Any,
    ) -> None:
        if mining is None:  # zero-score candidates share no term with the query: not lexical neighbours
            mining_fields = {"min_score": 1e-6, **mining_fields}
        self.mining = checked_mining(MiningSettings.of(mining, mining_fields, f"sampler {self.name!r}: "), self.name)
        super().__init__(num_negatives=self.mining.num_negatives, exclude_duplicates=exclude_duplicates, seed=seed)
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
            raise ValueError(f"sampler 'bm25': candidates must be a positive integer or null; got {candidates!r}")
        self.filter_spec = list(filters) if filters else []
        self.filters = resolve_filters(filters, "sampler.filters")
        self.fill_random, self.candidates, self.k1, self.b = bool(fill_random), candidates, float(k1), float(b)
        self.last_stats: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.mining.as_dict(), "filters": [repr(f) for f in (self.filters.filters if self.filters else [])],
                "fill_random": self.fill_random, "candidates": self.candidates, "k1": self.k1, "b": self.b}

    def setup(self, ids: Tensor, groups: Optional[Tensor] = None,
              texts: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        """Store the corpus and mine the BM25 table of every training query (once); needs the row texts."""
        super().setup(ids, groups, texts)
        table, stats = self.mine()
        self.set_table(table)
        self.last_stats = stats

    def mine(self) -> tuple[MinedTable, dict[str, float]]:
        """BM25-rank every training query over the training documents and apply the mining controls."""
        n = self.num_rows
        depth = self.candidates or candidate_depth(self.mining, n, self.max_group_size, slack=8,
                                                   filtered=self.filters is not None, sampler_name=self.name)
        if self.candidates is not None:
            candidate_depth(self.mining, n, self.max_group_size, 0, False, self.name)  # validates the window
        queries = self.row_texts("anchor")
        retriever = BM25Retriever(k1=self.k1, b=self.b).fit(self.row_texts("candidate"))
        scores, ids = retriever.search(queries, depth)
        rows = torch.arange(n)
        pos = retriever.pair_scores(queries, rows.tolist())
        table, stats = mine_table(self, scores, ids, rows, pos, mining=self.mining, filters=self.filters,
                                  seed=self.seed, fill_random=self.fill_random)
        table.header.update({"sampler": {"name": self.name, "settings": self.settings()}, "checkpoint": None,
                             "corpus": {"size": n, "fingerprint": self.corpus_fingerprint()},
                             "created": utc_now(), "stats": stats, "info": {"candidates": depth, "scores": "bm25"}})
        log.info("bm25 negatives: %d queries, %.1f%% short, %d random top-ups", n, 100 * stats["short_fraction"],
                 int(stats["filled_random"]))
        return table, stats
