"""Non-neural baselines: BM25 over code-aware tokens (:mod:`.bm25`)."""
from contrastive.baselines.bm25 import BM25Retriever, bm25_baseline, code_tokens

__all__ = ["BM25Retriever", "bm25_baseline", "code_tokens"]
