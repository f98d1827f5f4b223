"""Feature-space transformations: a composable stage between the encoder and the loss.

Every transform is an ``nn.Module`` with one call signature::

    out = transform(queries, positives, negatives=None, extra_negatives=None)   # -> FeatureBatch

- ``queries`` ``(B, d)``: anchor embeddings.
- ``positives`` ``(B, d)``: the positive of each query (row-aligned); under in-batch training the other
  rows' positives are also the query's negatives.
- ``negatives`` ``(K, d)`` or ``None``: extra negatives shared by every query (queue, mined negatives).
- ``extra_negatives`` ``(B, S, d)`` or ``None``: per-query negatives (e.g. MoCHi's synthetic points):
  row ``i`` only belongs to query ``i``'s denominator.

and returns a :class:`FeatureBatch` (a named tuple of the same four fields), so transforms chain in a
:class:`FeatureTransformPipeline` and :func:`to_contrastive_inputs` turns the result into the loss's
:class:`~contrastive.losses.base.ContrastiveInputs`. Transforms act only in training mode
(``module.training``); in eval mode they return their inputs unchanged. Randomness uses torch's global
generator (seed it for reproducibility); the ``lam`` / ``mu`` arguments fix the coefficients instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, Optional

import torch
from torch import Tensor, nn

from contrastive.losses.base import ContrastiveInputs
from contrastive.registry import TRANSFORMS

Granularity = Literal["batch", "sample", "element"]


class FeatureBatch(NamedTuple):
    """Embeddings flowing through the transforms (see the module docstring for shapes)."""

    queries: Tensor
    positives: Tensor
    negatives: Optional[Tensor] = None
    extra_negatives: Optional[Tensor] = None


class FeatureTransform(nn.Module):
    """Base class: checks shapes, returns the inputs unchanged outside training, else :meth:`transform`."""

    def forward(self, queries: Tensor, positives: Tensor, negatives: Optional[Tensor] = None,
                extra_negatives: Optional[Tensor] = None) -> FeatureBatch:
        batch = FeatureBatch(queries, positives, negatives, extra_negatives)
        _check_batch(batch)
        return self.transform(batch) if self.training else batch

    def transform(self, batch: FeatureBatch) -> FeatureBatch:
        """The training-time transformation."""
        raise NotImplementedError


def _check_batch(batch: FeatureBatch) -> None:
    q, p, n, e = batch
    if q.dim() != 2 or q.shape != p.shape:
        raise ValueError(f"queries and positives must both be (B, d); got {tuple(q.shape)} and {tuple(p.shape)}")
    if n is not None and (n.dim() != 2 or n.shape[1] != q.shape[1]):
        raise ValueError(f"negatives must be (K, d) with d = {q.shape[1]}; got {tuple(n.shape)}")
    if e is not None and (e.dim() != 3 or e.shape[0] != q.shape[0] or e.shape[2] != q.shape[1]):
        raise ValueError(f"extra_negatives must be (B, S, d) = ({q.shape[0]}, S, {q.shape[1]}); got {tuple(e.shape)}")


def _check_sampling(alpha: float, granularity: str) -> None:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (a Beta concentration); got {alpha}")
    if granularity not in ("batch", "sample", "element"):
        raise ValueError(f"granularity must be 'batch', 'sample' or 'element'; got {granularity!r}")


def sample_beta(concentration: float, n: int, d: int, granularity: Granularity, like: Tensor) -> Tensor:
    """Coefficients ``~ Beta(a, a)`` shaped ``(1, 1)`` (one per call), ``(n, 1)`` (one per sample) or
    ``(n, d)`` (one per sample and feature), on ``like``'s device and dtype."""
    shape = {"batch": (1, 1), "sample": (n, 1), "element": (n, d)}[granularity]
    a = torch.tensor(concentration, dtype=torch.float64)
    return torch.distributions.Beta(a, a).sample(shape).to(device=like.device, dtype=like.dtype)


def _normalize(x: Tensor) -> Tensor:
    return nn.functional.normalize(x, dim=-1)


@TRANSFORMS.register("positive_extrapolation")
class PositiveExtrapolation(FeatureTransform):
    """Positive extrapolation (Zhu et al., "Improving Contrastive Learning by Visualizing Feature
    Transformation", ICCV 2021, arXiv 2108.02982; official code ``memory/mem_moco.py``)::

        λ = 1 + u, u ~ Beta(alpha, alpha)      (λ in [1, 2])
        q̂ = λ q + (1 - λ) k,   k̂ = λ k + (1 - λ) q

    pushes each query and its positive apart along the line through them: for unit ``q, k`` with cosine
    ``s``, ``q̂ · k̂ = s - 2λ(λ - 1)(1 - s) <= s`` (a harder positive). Negatives are untouched; the
    gradient flows to both ``q`` and ``k`` (detach ``positives`` beforehand for MoCo-style keys).

    Args:
        alpha: Beta concentration; default 2.0 (``--pos_alpha 2.0`` in the official README).
        lam: a fixed λ (deterministic mode; ``1.0`` = identity) instead of sampling.
        granularity: ``"sample"`` (one λ per pair, default), ``"batch"`` (one λ per call: the official
            README setting, ``--dim_mask none``) or ``"element"`` (per pair and feature).
        renormalize: L2-normalise ``q̂, k̂`` afterwards (``--postmix_norm``; off in the official runs).
    """

    def __init__(self, alpha: float = 2.0, lam: Optional[float] = None, granularity: Granularity = "sample",
                 renormalize: bool = False) -> None:
        super().__init__()
        _check_sampling(alpha, granularity)
        if lam is not None and lam < 1.0:
            raise ValueError(f"lam must be >= 1 (extrapolation); got {lam}")
        self.alpha, self.lam, self.granularity, self.renormalize = alpha, lam, granularity, renormalize

    def transform(self, batch: FeatureBatch) -> FeatureBatch:
        q, k = batch.queries, batch.positives
        if self.lam is not None:
            lam = torch.full((1, 1), self.lam, dtype=q.dtype, device=q.device)
        else:
            lam = 1.0 + sample_beta(self.alpha, q.shape[0], q.shape[1], self.granularity, q)
        q_hat = lam * q + (1.0 - lam) * k
        k_hat = lam * k + (1.0 - lam) * q
        if self.renormalize:
            q_hat, k_hat = _normalize(q_hat), _normalize(k_hat)
        return batch._replace(queries=q_hat, positives=k_hat)


@TRANSFORMS.register("negative_interpolation")
class NegativeInterpolation(FeatureTransform):
    """Negative interpolation (Zhu et al. 2021, arXiv 2108.02982)::

        n̂_m = μ n_m + (1 - μ) n_π(m),   μ ~ Beta(alpha, alpha),  π a random permutation of 1..K

    replaces the shared ``negatives`` (``K`` stays ``K``) for this step only; the caller's queue or
    buffer is not modified. Each mixed score ``q · n̂_m`` lies between its two sources' scores. With no
    shared negatives the batch is returned unchanged (in-batch positives are never mixed).

    Args:
        alpha: Beta concentration; default 1.6 (``--neg_alpha``, official README and argparse default).
        mu: a fixed μ (deterministic mode; ``1.0`` = identity) instead of sampling.
        granularity: ``"sample"`` (one μ per negative, default), ``"batch"`` (official setting) or
            ``"element"``.
        renormalize: L2-normalise the mixed negatives (off in the official code, so their norm is <= 1).
    """

    def __init__(self, alpha: float = 1.6, mu: Optional[float] = None, granularity: Granularity = "sample",
                 renormalize: bool = False) -> None:
        super().__init__()
        _check_sampling(alpha, granularity)
        if mu is not None and not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1]; got {mu}")
        self.alpha, self.mu, self.granularity, self.renormalize = alpha, mu, granularity, renormalize

    def transform(self, batch: FeatureBatch) -> FeatureBatch:
        n = batch.negatives
        if n is None or n.shape[0] == 0:
            return batch
        if self.mu is not None:
            mu = torch.full((1, 1), self.mu, dtype=n.dtype, device=n.device)
        else:
            mu = sample_beta(self.alpha, n.shape[0], n.shape[1], self.granularity, n)
        perm = torch.randperm(n.shape[0], device=n.device)
        mixed = mu * n + (1.0 - mu) * n[perm]
        if self.renormalize:
            mixed = _normalize(mixed)
        return batch._replace(negatives=mixed)


class MochiSample(NamedTuple):
    """Output of :func:`mochi_synthesize`: ``points`` ``(B, s + s', d)`` and, for tests and analysis, the
    pool indices used: ``hard_indices`` ``(B, N)`` (each row's top-N), ``pair_indices`` ``(B, s, 2)``
    and ``query_partner_indices`` ``(B, s')``."""

    points: Tensor
    hard_indices: Tensor
    pair_indices: Tensor
    query_partner_indices: Tensor


def mochi_synthesize(queries: Tensor, pool: Tensor, pool_mask: Optional[Tensor], *, n_hard: int, n_mix: int,
                     n_query_mix: int, query_mix_max: float = 0.5, renormalize: bool = True) -> MochiSample:
    """MoCHi hard-negative synthesis (Kalantidis et al., NeurIPS 2020, arXiv 2010.01028), per query ``q``:

    - hard set: the top-``N`` pool entries by ``q · n`` (``N = min(n_hard, fewest valid per row)``);
    - ``h_k = α_k n_i + (1 - α_k) n_j``, ``n_i, n_j`` uniform from the hard set, ``α_k ~ U(0, 1)``, k = 1..s;
    - ``h'_k = β_k q + (1 - β_k) n_j``, ``n_j`` uniform from the hard set, ``β_k ~ U(0, query_mix_max)``;
    - both L2-normalised when ``renormalize``.

    Args:
        queries: ``(B, d)``.
        pool: ``(P, d)`` candidate negatives.
        pool_mask: ``(B, P)`` bool, which pool entries may be used for each query (``None`` = all).
        n_hard, n_mix, n_query_mix: ``N``, ``s``, ``s'``.
        query_mix_max: upper bound of ``β`` (< 0.5 keeps the negative's share above the query's).
        renormalize: L2-normalise the synthetic points.
    """
    b, d = queries.shape
    scores = queries @ pool.T
    if pool_mask is not None:
        scores = scores.masked_fill(~pool_mask, float("-inf"))
        n_valid = int(pool_mask.sum(dim=1).min()) if b else 0
    else:
        n_valid = pool.shape[0]
    n = min(n_hard, n_valid)
    if n == 0 or n_mix + n_query_mix == 0:
        empty = torch.zeros(b, 0, dtype=torch.long, device=queries.device)
        return MochiSample(queries.new_zeros(b, 0, d), empty, empty[..., None].expand(b, 0, 2), empty)
    hard = scores.topk(n, dim=1).indices  # (B, N), descending q . n
    pairs = hard.gather(1, torch.randint(0, n, (b, 2 * n_mix), device=queries.device)).view(b, n_mix, 2)
    alpha = torch.rand(b, n_mix, 1, dtype=queries.dtype, device=queries.device)
    mixed = alpha * pool[pairs[..., 0]] + (1.0 - alpha) * pool[pairs[..., 1]]
    partners = hard.gather(1, torch.randint(0, n, (b, n_query_mix), device=queries.device))
    beta = query_mix_max * torch.rand(b, n_query_mix, 1, dtype=queries.dtype, device=queries.device)
    query_mixed = beta * queries[:, None, :] + (1.0 - beta) * pool[partners]
    points = torch.cat([mixed, query_mixed], dim=1)
    if renormalize:
        points = _normalize(points)
    return MochiSample(points, hard, pairs, partners)


@TRANSFORMS.register("mochi")
class MoCHi(FeatureTransform):
    """MoCHi hard-negative mixing (Kalantidis et al. 2020, arXiv 2010.01028): adds ``s + s'`` synthetic
    negatives per query as ``extra_negatives`` (appended to any already there), see
    :func:`mochi_synthesize`. The pool is the shared ``negatives`` and, with ``in_batch_pool``, the other
    rows' positives (never the query's own positive). Synthetic points are detached by default (as in the
    implementations the reference notes cite) and never written back to any queue.

    Not handled here: known false negatives of the pool (the transform does not see the loss's
    ``false_negative_mask``) and MoCHi's warm-up epochs (keep the transform out of the pipeline, or in
    eval mode, until then).

    Args:
        n_hard: ``N``, size of each query's hard set; default 1024.
        n_mix: ``s``, negative-negative mixtures per query; default 1024.
        n_query_mix: ``s'``, query-negative mixtures per query; default 128.
            (``MoCHi(1024, 1024, 128)`` is one of the paper's ImageNet-100 settings as we recall it;
            the reference notes ask to check it against the paper's tables.) With fewer pool entries
            ``N`` shrinks to what is available.
        query_mix_max: upper bound of the query share ``β`` (0.5 in the paper).
        in_batch_pool: also mix the other rows' positives (in-batch negatives).
        renormalize: L2-normalise the synthetic points (the paper does).
        detach_synthetic: no gradient through the synthetic points (default).
    """

    def __init__(self, n_hard: int = 1024, n_mix: int = 1024, n_query_mix: int = 128, query_mix_max: float = 0.5,
                 in_batch_pool: bool = True, renormalize: bool = True, detach_synthetic: bool = True) -> None:
        super().__init__()
        if n_hard < 1 or n_mix < 0 or n_query_mix < 0:
            raise ValueError(f"need n_hard >= 1, n_mix >= 0, n_query_mix >= 0; got {n_hard}, {n_mix}, {n_query_mix}")
        if not 0.0 < query_mix_max <= 0.5:
            raise ValueError(f"query_mix_max must be in (0, 0.5]; got {query_mix_max}")
        self.n_hard, self.n_mix, self.n_query_mix = n_hard, n_mix, n_query_mix
        self.query_mix_max, self.in_batch_pool = query_mix_max, in_batch_pool
        self.renormalize, self.detach_synthetic = renormalize, detach_synthetic

    def pool(self, batch: FeatureBatch) -> tuple[Tensor, Optional[Tensor]]:
        """``(pool (P, d), pool_mask (B, P) or None)`` the hard negatives are drawn from."""
        q, k, n, _ = batch
        parts, mask = [], None
        if self.in_batch_pool:
            parts.append(k)
            b = q.shape[0]
            own = torch.eye(b, dtype=torch.bool, device=q.device)
            k_shared = 0 if n is None else n.shape[0]
            mask = torch.cat([~own, torch.ones(b, k_shared, dtype=torch.bool, device=q.device)], 1)
        if n is not None:
            parts.append(n)
        pool = torch.cat(parts) if parts else q.new_zeros(0, q.shape[1])
        return pool, mask

    def transform(self, batch: FeatureBatch) -> FeatureBatch:
        pool, mask = self.pool(batch)
        q = batch.queries
        if self.detach_synthetic:
            q, pool = q.detach(), pool.detach()
        sample = mochi_synthesize(q, pool, mask, n_hard=self.n_hard, n_mix=self.n_mix,
                                  n_query_mix=self.n_query_mix, query_mix_max=self.query_mix_max,
                                  renormalize=self.renormalize)
        if sample.points.shape[1] == 0:
            return batch
        extra = sample.points if batch.extra_negatives is None else torch.cat([batch.extra_negatives, sample.points], 1)
        return batch._replace(extra_negatives=extra)


@TRANSFORMS.register("pipeline")
class FeatureTransformPipeline(FeatureTransform):
    """Apply transforms in order (``Compose``). Each item is a :class:`FeatureTransform` or a spec
    ``{"name": <registered transform>, **kwargs}`` built with :data:`~contrastive.registry.TRANSFORMS`.
    Calling the pipeline in eval mode is the identity, as for every transform."""

    def __init__(self, transforms: Sequence[FeatureTransform | Mapping[str, Any]]) -> None:
        super().__init__()
        built = []
        for spec in transforms:
            if isinstance(spec, nn.Module):
                built.append(spec)
            elif isinstance(spec, Mapping) and "name" in spec:
                built.append(TRANSFORMS.build(spec["name"], **{k: v for k, v in spec.items() if k != "name"}))
            else:
                raise ValueError(f"pipeline items must be transforms or mappings with a 'name'; got {spec!r}")
        self.transforms = nn.ModuleList(built)

    def transform(self, batch: FeatureBatch) -> FeatureBatch:
        for t in self.transforms:
            batch = t(*batch)
        return batch


Compose = FeatureTransformPipeline


def to_contrastive_inputs(batch: FeatureBatch) -> ContrastiveInputs:
    """Loss inputs for a transformed batch: ``anchors = queries``, ``candidates = [positives (B),
    negatives (K), extra_negatives flattened (B·S)]``; candidate ``i`` is anchor ``i``'s positive
    (``positive_mask=None``) and every query's own extra negatives are visible only to it (the others go
    to ``false_negative_mask``, which removes them from the other rows' denominators)."""
    q, p, n, e = batch
    parts = [p] + ([n] if n is not None else [])
    fn_mask = None
    if e is not None and e.shape[1] > 0:
        b, s, _ = e.shape
        parts.append(e.reshape(b * s, -1))
        m_before = sum(x.shape[0] for x in parts[:-1])
        owner = torch.arange(b, device=q.device).repeat_interleave(s)
        fn_mask = torch.zeros(b, m_before + b * s, dtype=torch.bool, device=q.device)
        fn_mask[:, m_before:] = owner[None, :] != torch.arange(b, device=q.device)[:, None]
    return ContrastiveInputs(anchors=q, candidates=torch.cat(parts), false_negative_mask=fn_mask)
