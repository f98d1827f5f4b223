"""kNN indexes for mining and evaluation: one interface, an exact torch backend and a FAISS backend.

- :class:`ExactIndex` / :func:`exact_topk`: brute force in torch, chunked (memory ``O(chunk**2)``),
  CPU or CUDA, deterministic ties (lower id first).
- :class:`FaissIndex`: FAISS flat / IVF-Flat / HNSW / IVF-PQ, optional GPU(s); FAISS is imported lazily.
- :func:`rank_of`: exact rank of a gold row among all database rows (retrieval metrics).

Build by name with :func:`build_index` (``"exact"``, ``"flat"``, ``"ivf_flat"``, ``"hnsw"``, ``"ivf_pq"``)
or through the registry: ``INDEXES.build("faiss", dim=768, kind="hnsw")``.
"""
from __future__ import annotations

from typing import Any

from contrastive.index.base import Index, IndexFileError, IndexInputError
from contrastive.index.exact import ExactIndex, exact_topk, rank_of, rank_pair
from contrastive.index.faiss_index import GPU_MAX_K, KINDS, FaissIndex, faiss_num_gpus, import_faiss
from contrastive.registry import INDEXES

INDEXES.register("exact")(ExactIndex)
INDEXES.register("faiss")(FaissIndex)

BUILD_KINDS = ("exact",) + KINDS


def build_index(kind: str, dim: int, metric: str = "ip", **kwargs: Any) -> Index:
    """An empty index of ``kind`` (``"exact"`` or a FAISS kind in ``("flat", "ivf_flat", "hnsw", "ivf_pq")``).

    ``kwargs`` go to :class:`ExactIndex` (``chunk_size``, ``device``) or :class:`FaissIndex` (``nlist``,
    ``nprobe``, ``use_gpu``, ...).
    """
    if kind == "exact":
        return ExactIndex(dim, metric, **kwargs)
    if kind in KINDS:
        return FaissIndex(dim, metric, kind=kind, **kwargs)
    raise IndexInputError(f"unknown index kind {kind!r}; valid kinds: {', '.join(BUILD_KINDS)}")


__all__ = [
    "BUILD_KINDS",
    "ExactIndex",
    "FaissIndex",
    "GPU_MAX_K",
    "Index",
    "IndexFileError",
    "IndexInputError",
    "KINDS",
    "build_index",
    "exact_topk",
    "faiss_num_gpus",
    "import_faiss",
    "rank_of",
    "rank_pair",
]
