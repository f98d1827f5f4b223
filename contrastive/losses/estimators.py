"""Similarity estimators for Soft-InfoNCE (Li et al. 2023, arXiv 2310.08069): three ways to get the
``(B, M)`` estimate ``r_ij`` of how related anchor ``i`` and candidate ``j`` are, from outside the model
being trained.

One hierarchy: every estimator is a :class:`SimilarityEstimator` (a plain class, not an ``nn.Module``, so
it is neither trained nor saved with the model) with two calls::

    estimator.estimate(anchors, candidates=None) -> Tensor (B, M)            # on raw inputs
    estimator.estimate_batch(module, batch) -> Tensor (B, M_batch + M_extra)  # in a training step

``anchors`` / ``candidates`` are whatever the estimator reads (texts for BM25, model inputs for the
encoders) and ``candidates=None`` means "the anchors themselves" (query-to-query similarity, as in the
paper's BM25 and SimCSE estimators). ``estimate_batch`` is what
:class:`~contrastive.models.contrastive.ContrastiveModule` calls with its
:class:`~contrastive.models.batch.ContrastiveBatch` (the registered, config-selectable estimators of
:mod:`contrastive.models.estimates` implement it); the result goes to the loss as ``similarity_estimate=``.

- :class:`BM25Estimator`: lexical BM25 of query ``i`` against the text standing for candidate ``j``.
- :class:`FrozenEncoderEstimator`: cosine (or dot) similarity from any frozen encoder (SimCSE-like).
- :class:`FrozenModelEstimator`: a frozen copy of a model trained with plain InfoNCE (the paper's
  ``--self`` estimator: query-to-code dot product), built with :meth:`FrozenEncoderEstimator.from_module`.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from contrastive.baselines.bm25 import bm25_score_matrix, code_tokens

__all__ = ["BM25Estimator", "FrozenEncoderEstimator", "FrozenModelEstimator", "SimilarityEstimator"]


class SimilarityEstimator:
    """Base of every similarity estimator (see the module docstring)."""

    def estimate(self, anchors: Any, candidates: Any = None) -> Tensor:
        """``(B, M)`` estimates from raw inputs; ``candidates=None``: the anchors themselves."""
        raise NotImplementedError(f"{type(self).__name__} does not estimate from raw inputs")

    def setup(self, module: nn.Module, datamodule: Any) -> None:
        """Called once at the start of fitting (e.g. to read corpus statistics); default: nothing."""

    def estimate_batch(self, module: nn.Module, batch: Any) -> Tensor:
        """``(B, M_batch + M_extra)`` estimates of a training batch, columns laid out like the module's
        candidates (gathered in-batch candidates, then gathered extra negatives), detached."""
        raise NotImplementedError(f"{type(self).__name__} does not estimate within a training batch")

class BM25Estimator(SimilarityEstimator):
    """BM25 similarity estimator (the paper's ``--bm25``): ``r_ij`` = BM25 score of anchor text ``i``
    (the query) against the text standing for candidate ``j``, scored within the batch. In the paper the
    "documents" are the natural-language queries of the batch's pairs (query-to-query BM25), which is
    ``estimate(queries)``; for extra candidates (mined negatives) pass the text paired with each one.

    Scores come from :func:`contrastive.baselines.bm25.bm25_score_matrix` (the paper's exact idf variant,
    dense within the batch).

    Args:
        tokenizer: ``str -> list[str]``; default the library's code tokenizer
            :func:`contrastive.baselines.bm25.code_tokens`.
        k1, b: BM25 constants (1.2, 0.75 in the paper).
        avgdl: mean document length; ``None`` = the batch mean until :meth:`fit` sets it from a corpus.
        dtype: dtype of the returned scores.
    """

    def __init__(self, tokenizer: Optional[Callable[[str], list[str]]] = None, k1: float = 1.2, b: float = 0.75,
                 avgdl: Optional[float] = None, dtype: torch.dtype = torch.float32) -> None:
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"need k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.tokenizer = tokenizer or code_tokens
        self.k1, self.b, self.avgdl, self.dtype = k1, b, avgdl, dtype

    def fit(self, corpus: Iterable[str]) -> "BM25Estimator":
        """Set ``avgdl`` to the mean token length of ``corpus`` (the training set's queries, as in the paper)."""
        total, count = 0, 0
        for text in corpus:
            total += len(self.tokenizer(text))
            count += 1
        if count == 0:
            raise ValueError("fit() needs a non-empty corpus")
        self.avgdl = total / count
        return self

    def estimate(self, anchors: Sequence[str], candidates: Optional[Sequence[str]] = None) -> Tensor:
        """``(B, M)`` BM25 scores; ``candidates=None`` scores the anchors against each other."""
        docs = anchors if candidates is None else candidates
        if isinstance(anchors, str) or isinstance(docs, str):
            raise TypeError("BM25Estimator.estimate expects sequences of strings, not a single string")
        scores = bm25_score_matrix([self.tokenizer(t) for t in anchors], [self.tokenizer(t) for t in docs],
                                   k1=self.k1, b=self.b, avgdl=self.avgdl)
        return scores.to(self.dtype)


class FrozenEncoderEstimator(SimilarityEstimator):
    """Similarity from a frozen encoder (the paper's ``--simcse`` estimator, or any frozen checkpoint):
    ``r_ij = cos(e(a_i), e'(c_j))`` (or the raw dot product with ``normalize=False``).

    The encoders run under ``torch.no_grad()``; every ``nn.Module`` among them is put in eval mode at each
    call (so a trainer switching the model back to train mode cannot turn dropout on) and its parameters
    are frozen at construction.

    Args:
        encoder: callable mapping a batch of anchors to ``(B, d)`` embeddings.
        candidate_encoder: callable for the candidates (a second tower); default ``encoder``.
        normalize: cosine similarity (default) instead of the dot product.
        modules: the ``nn.Module`` objects behind the callables, to freeze and put in eval mode; an
            ``encoder`` or ``candidate_encoder`` that is itself a module is included automatically.
    """

    def __init__(self, encoder: Callable[[Any], Tensor], candidate_encoder: Optional[Callable[[Any], Tensor]] = None,
                 normalize: bool = True, modules: Sequence[nn.Module] = ()) -> None:
        self.encoder = encoder
        self.candidate_encoder = candidate_encoder or encoder
        self.normalize = normalize
        mods = list(modules) + [m for m in (encoder, candidate_encoder) if isinstance(m, nn.Module)]
        self.modules: list[nn.Module] = list({id(m): m for m in mods}.values())
        for m in self.modules:
            m.requires_grad_(False)
            m.eval()

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        encode: Optional[Callable[[nn.Module, Any], Tensor]] = None,
        encode_candidates: Optional[Callable[[nn.Module, Any], Tensor]] = None,
        normalize: Optional[bool] = None,
    ) -> "FrozenEncoderEstimator":
        """Deep-copy ``module``, freeze the copy, and estimate with it (the original keeps training).

        Args:
            module: e.g. a dual encoder trained with plain InfoNCE (load the checkpoint first).
            encode: ``(copy, anchors) -> (B, d)``; default ``copy(anchors)``.
            encode_candidates: ``(copy, candidates) -> (M, d)``, e.g. ``lambda m, x: m.encode_document(x)``;
                default ``encode``.
            normalize: default: the class default (cosine for this class, dot product for
                :class:`FrozenModelEstimator`).
        """
        frozen = copy.deepcopy(module)
        encode = encode or (lambda m, x: m(x))
        encode_candidates = encode_candidates or encode
        kwargs = {} if normalize is None else {"normalize": normalize}
        return cls(lambda x: encode(frozen, x), lambda x: encode_candidates(frozen, x), modules=[frozen], **kwargs)

    def to(self, device: torch.device | str) -> "FrozenEncoderEstimator":
        """Move the frozen modules (the estimator is not a child of the LightningModule)."""
        for m in self.modules:
            m.to(device)
        return self

    def estimate(self, anchors: Any, candidates: Any = None) -> Tensor:
        """``(B, M)`` similarities; ``candidates=None`` compares the anchors with themselves through the
        anchor encoder (query-to-query, as the paper's SimCSE estimator)."""
        for m in self.modules:
            m.eval()
        with torch.no_grad():
            a = self.encoder(anchors)
            c = a if candidates is None else self.candidate_encoder(candidates)
            if a.dim() != 2 or c.dim() != 2 or a.shape[1] != c.shape[1]:
                raise ValueError(f"encoders must return (B, d) and (M, d); got {tuple(a.shape)} and {tuple(c.shape)}")
            if self.normalize:
                a = torch.nn.functional.normalize(a, dim=-1)
                c = torch.nn.functional.normalize(c, dim=-1)
            return a @ c.T


class FrozenModelEstimator(FrozenEncoderEstimator):
    """The paper's ``--self`` estimator: a frozen copy of the same architecture first trained with plain
    InfoNCE, ``r_ij = e'(q_i) · e'(c_j)`` (query-to-code, unnormalised dot product by default). Build it
    with ``FrozenModelEstimator.from_module(trained_model, encode=..., encode_candidates=...)``."""

    def __init__(self, encoder: Callable[[Any], Tensor], candidate_encoder: Optional[Callable[[Any], Tensor]] = None,
                 normalize: bool = False, modules: Sequence[nn.Module] = ()) -> None:
        super().__init__(encoder, candidate_encoder, normalize, modules)

