"""Lexical hard negatives: BM25 top-k of each training query over the training documents (DPR).

Karpukhin et al. 2020 (DPR, arXiv 2004.04906) train with, per question, one "BM25 negative": a top
passage of BM25 that does not contain the answer. Here the BM25 ranking of every training query over
the training documents is computed **once** in :meth:`BM25NegativeSampler.setup` (with the ``bm25s``
package, Lù 2024, arXiv 2407.03618), then turned into negatives by the same controls as every other
miner (:func:`contrastive.samplers.table.mine_table`: the positive and its known duplicates removed by
id, rank window, score bounds, top/random/softmax sampling, optional false-negative filters).

Tokenisation is code-aware: identifiers are split at ``_`` and camelCase boundaries and lower-cased
(``parseJSONFile`` → ``parse json file``), numbers kept, one-letter tokens and a short English stop-word
list dropped, so natural-language queries match code documents.

Candidates with a BM25 score of 0 (no shared term) are not lexical neighbours; ``min_score`` defaults
to a tiny positive value so they are never mined, and ``fill_random`` tops short rows up with random
negatives instead.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from contrastive.registry import SAMPLERS
from contrastive.samplers.table import (
    MinedTable,
    TableSampler,
    candidate_depth,
    mine_table,
    mining_settings,
    resolve_filters,
    utc_now,
)

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_STOP = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with from its".split()
)


def code_tokens(text: str) -> list[str]:
    """Lower-cased word pieces of ``text`` with identifiers split (``load_JSONConfig2`` → ``load json config 2``)."""
    return [w for w in (m.lower() for m in _WORD.findall(text)) if (len(w) > 1 or w.isdigit()) and w not in _STOP]


class BM25Scorer:
    """BM25 over a list of documents (``bm25s`` backend, Lucene variant).

    Args:
        documents: the ``N`` documents.
        k1, b: BM25 parameters.
    """

    def __init__(self, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        from contrastive.baselines.bm25 import import_bm25s

        bm25s = import_bm25s()
        self.num_docs = len(documents)
        tokens = [code_tokens(d) for d in documents]
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` documents of each query: ``(scores (Q, k) float32, ids (Q, k) long)``, best first."""
        k = min(int(k), self.num_docs)
        toks = [code_tokens(q) or ["\0"] for q in queries]
        # backend "numpy", not bm25s' default "auto", which runs the top-k in JAX when JAX is installed
        # (see import_bm25s for what JAX does to the GPU); numpy also keeps the selection, and so the mined
        # table, the same on every machine.
        ids, scores = self.retriever.retrieve(toks, k=k, show_progress=False, backend_selection="numpy")
        return torch.from_numpy(np.asarray(scores, dtype=np.float32)), torch.from_numpy(np.asarray(ids, dtype=np.int64))

    def pair_scores(self, queries: Sequence[str], doc_ids: Sequence[int]) -> Tensor:
        """``(Q,)`` BM25 score of query ``i`` for document ``doc_ids[i]``."""
        out = np.zeros(len(queries), dtype=np.float32)
        for i, (q, d) in enumerate(zip(queries, doc_ids)):
            toks = code_tokens(q)
            if toks:
                out[i] = self.retriever.get_scores(toks)[int(d)]
        return torch.from_numpy(out)


@SAMPLERS.register("bm25")
class BM25NegativeSampler(TableSampler):
    """BM25 hard negatives, mined once in :meth:`setup` (DPR-style lexical negatives).

    Args:
        num_negatives: extra negatives per training pair.
        range_min, range_max: rank window over the BM25 ranking without the positive (and its known
            duplicates); ``range_max=None`` = all retrieved candidates.
        sampling: ``"top"``, ``"random"`` or ``"softmax"`` over the window (see ``select_negatives``).
        absolute_margin, relative_margin: keep ``s <= p - margin`` / ``s <= p - |p| * margin`` where ``p`` is
            the BM25 score of the pair itself.
        max_score, min_score: BM25 score bounds; the default ``min_score`` drops zero-score candidates.
        strict: raise when a query gets fewer than ``num_negatives`` (otherwise ``-1`` padding or a
            random top-up with ``fill_random``).
        window_after_filters, temperature: as in ``select_negatives``.
        filters: optional false-negative filters (objects or specs) applied before the window.
        fill_random: top short rows up with random negatives (score NaN in the table).
        candidates: BM25 depth per query; ``None`` = derived from the window (``candidate_depth``).
        k1, b: BM25 parameters.
        exclude_duplicates: never mine a known duplicate of the positive.
        seed: seed of the random sampling and of the random top-up.
    """

    name = "bm25"

    def __init__(
        self,
        num_negatives: int = 1,
        range_min: int = 0,
        range_max: Optional[int] = None,
        sampling: Literal["top", "random", "softmax"] = "top",
        absolute_margin: Optional[float] = None,
        relative_margin: Optional[float] = None,
        max_score: Optional[float] = None,
        min_score: Optional[float] = 1e-6,
        strict: bool = False,
        window_after_filters: bool = False,
        temperature: float = 1.0,
        filters: Optional[list[Any]] = None,
        fill_random: bool = True,
        candidates: Optional[int] = None,
        k1: float = 1.5,
        b: float = 0.75,
        exclude_duplicates: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_negatives=num_negatives, exclude_duplicates=exclude_duplicates, seed=seed)
        self.mining = mining_settings(
            num_negatives=num_negatives, range_min=range_min, range_max=range_max, sampling=sampling,
            absolute_margin=absolute_margin, relative_margin=relative_margin, max_score=max_score,
            min_score=min_score, strict=strict, window_after_filters=window_after_filters,
            temperature=temperature, sampler_name=self.name,
        )
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1):
            raise ValueError(f"sampler 'bm25': candidates must be a positive integer or null; got {candidates!r}")
        self.filter_spec = list(filters) if filters else []
        self.filters = resolve_filters(filters, "sampler.filters")
        self.fill_random, self.candidates, self.k1, self.b = bool(fill_random), candidates, float(k1), float(b)
        self.last_stats: dict[str, float] = {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.mining, "filters": [repr(f) for f in (self.filters.filters if self.filters else [])],
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
        scorer = BM25Scorer(self.row_texts("candidate"), k1=self.k1, b=self.b)
        scores, ids = scorer.search(queries, depth)
        rows = torch.arange(n)
        pos = scorer.pair_scores(queries, rows.tolist())
        table, stats = mine_table(self, scores, ids, rows, pos, mining=self.mining, filters=self.filters,
                                  seed=self.seed, fill_random=self.fill_random)
        table.header.update({"sampler": {"name": self.name, "settings": self.settings()}, "checkpoint": None,
                             "corpus": {"size": n, "fingerprint": self.corpus_fingerprint()},
                             "created": utc_now(), "stats": stats, "info": {"candidates": depth, "scores": "bm25"}})
        log.info("bm25 negatives: %d queries, %.1f%% short, %d random top-ups", n, 100 * stats["short_fraction"],
                 int(stats["filled_random"]))
        return table, stats
