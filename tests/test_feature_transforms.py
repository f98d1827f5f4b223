"""Feature-space transformations (methods.md §A2 positive extrapolation / negative interpolation, §B7.1 MoCHi)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from contrastive.losses import InfoNCELoss
from contrastive.registry import TRANSFORMS
from contrastive.transforms import (FeatureBatch, FeatureTransformPipeline, MoCHi, NegativeInterpolation,
                                    PositiveExtrapolation, mochi_synthesize, to_contrastive_inputs)

DTYPES = [torch.float32, torch.float64]


def unit(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return nn.functional.normalize(x, dim=-1).to(dtype)


def batch(b: int = 4, k: int = 6, d: int = 5, dtype: torch.dtype = torch.float64) -> FeatureBatch:
    return FeatureBatch(unit(b, d, dtype=dtype), unit(b, d, dtype=dtype, seed=1), unit(k, d, dtype=dtype, seed=2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lambda_one_and_mu_one_leave_embeddings_unchanged(dtype):
    fb = batch(dtype=dtype)
    pipe = FeatureTransformPipeline([PositiveExtrapolation(lam=1.0), NegativeInterpolation(mu=1.0)]).train()
    out = pipe(*fb)
    for x, y in zip(out[:3], fb[:3]):
        assert torch.equal(x, y)
    assert out.extra_negatives is None
    loss = InfoNCELoss(temperature=0.1)
    assert torch.equal(loss.forward_inputs(to_contrastive_inputs(out)).loss,
                       loss(fb.queries, torch.cat([fb.positives, fb.negatives])).loss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_mode_is_identity(dtype):
    fb = batch(dtype=dtype)
    pipe = FeatureTransformPipeline([{"name": "positive_extrapolation"}, {"name": "negative_interpolation"},
                                     {"name": "mochi", "n_hard": 3, "n_mix": 2, "n_query_mix": 2}])
    out = pipe.eval()(*fb)
    assert all(x is y for x, y in zip(out, fb))
    assert isinstance(pipe.train()(*fb), FeatureBatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam", [1.0, 1.3, 2.0])
def test_positive_extrapolation_closed_form(dtype, lam):
    """For unit q, k with cosine s and scalar λ: q̂·k̂ = s − 2λ(λ−1)(1−s) <= s (methods.md §A2 f2)."""
    fb = batch(dtype=dtype)
    out = PositiveExtrapolation(lam=lam).train()(*fb)
    s = (fb.queries * fb.positives).sum(1)
    got = (out.queries * out.positives).sum(1)
    torch.testing.assert_close(got, s - 2 * lam * (lam - 1) * (1 - s))
    assert torch.all(got <= s + 1e-6)
    assert torch.equal(out.negatives, fb.negatives)
    renorm = PositiveExtrapolation(lam=lam, renormalize=True).train()(*fb)
    torch.testing.assert_close(renorm.queries.norm(dim=1), torch.ones(4, dtype=dtype))


def test_sampled_coefficients_ranges_and_granularity():
    torch.manual_seed(0)
    fb = batch(b=64, k=64)
    q, k = fb.queries, fb.positives
    for granularity in ("sample", "batch", "element"):
        out = PositiveExtrapolation(granularity=granularity).train()(*fb)
        # recover λ from q̂ - q = (λ - 1)(q - k)
        lam = 1 + (out.queries - q) / (q - k)
        assert torch.all((lam >= 1 - 1e-9) & (lam <= 2 + 1e-9))
        distinct = torch.unique(lam.round(decimals=6)).numel()
        assert distinct == 1 if granularity == "batch" else distinct > 1
        if granularity == "sample":  # one λ per row
            torch.testing.assert_close(lam, lam[:, :1].expand_as(lam))
    neg = NegativeInterpolation(mu=0.0).train()(*fb).negatives  # μ = 0: a permutation of the negatives
    assert sorted(neg.sum(1).tolist()) == pytest.approx(sorted(fb.negatives.sum(1).tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_interpolation_mixes_pairs_and_keeps_inputs(dtype):
    torch.manual_seed(1)
    fb = batch(k=7, dtype=dtype)
    before = fb.negatives.clone()
    mu = 0.3
    out = NegativeInterpolation(mu=mu).train()(*fb)
    assert torch.equal(fb.negatives, before)  # the caller's buffer is untouched
    assert out.negatives.shape == fb.negatives.shape
    # recover the permutation: n̂_m = μ n_m + (1 - μ) n_π(m)
    partner = ((out.negatives - mu * before) / (1 - mu))
    dist = torch.cdist(partner.double(), before.double())
    perm = dist.argmin(1)
    assert dist.min(1).values.max() < 1e-5 and sorted(perm.tolist()) == list(range(7))
    scores_src = fb.queries @ before.T
    scores = fb.queries @ out.negatives.T
    lo = torch.minimum(scores_src, scores_src[:, perm])
    hi = torch.maximum(scores_src, scores_src[:, perm])
    assert torch.all((scores >= lo - 1e-6) & (scores <= hi + 1e-6))
    none = NegativeInterpolation().train()(fb.queries, fb.positives)
    assert none.negatives is None and torch.equal(none.positives, fb.positives)


def test_gradient_flows_to_queries_through_both_sides():
    q = unit(4, 5).requires_grad_(True)
    k = unit(4, 5, seed=1)
    out = PositiveExtrapolation(lam=1.5).train()(q, k.detach())
    (out.queries * out.positives).sum().backward()
    direct = (1.5 * (1.5 * k + (1 - 1.5) * q.detach())) + ((1 - 1.5) * (1.5 * q.detach() + (1 - 1.5) * k))
    torch.testing.assert_close(q.grad, direct)


# ----------------------------------------------------------------------------------------------- MoCHi

@pytest.mark.parametrize("dtype", DTYPES)
def test_mochi_hard_set_correctness_and_unit_norm(dtype):
    torch.manual_seed(0)
    q, pool = unit(5, 6, dtype=dtype), unit(12, 6, dtype=dtype, seed=3)
    allowed = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed[:, :6] = True  # at least 6 valid per row
    n_hard = 4
    sample = mochi_synthesize(q, pool, allowed, n_hard=n_hard, n_mix=8, n_query_mix=5)
    assert sample.points.shape == (5, 13, 6)
    torch.testing.assert_close(sample.points.norm(dim=-1), torch.ones(5, 13, dtype=dtype))
    for i in range(5):  # slow per-row top-N
        scored = sorted(((float(q[i] @ pool[j]), j) for j in range(12) if allowed[i, j]), reverse=True)
        top = {j for _, j in scored[:n_hard]}
        assert set(sample.hard_indices[i].tolist()) == top
        assert set(sample.pair_indices[i].flatten().tolist()) <= top
        assert set(sample.query_partner_indices[i].tolist()) <= top


def test_mochi_query_mix_share_and_points():
    torch.manual_seed(0)
    q, pool = unit(3, 4), unit(6, 4, seed=3)
    sample = mochi_synthesize(q, pool, None, n_hard=6, n_mix=0, n_query_mix=50, renormalize=False)
    h = sample.points
    n = pool[sample.query_partner_indices]  # (B, s', d)
    # h' = β q + (1 - β) n  =>  β = ((h - n) · (q - n)) / |q - n|^2, must lie in [0, 0.5)
    diff = q[:, None, :] - n
    beta = ((h - n) * diff).sum(-1) / (diff * diff).sum(-1)
    assert torch.all((beta >= 0) & (beta < 0.5))
    torch.testing.assert_close(h, beta[..., None] * q[:, None, :] + (1 - beta[..., None]) * n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mochi_module_in_batch_pool_excludes_own_positive_and_detaches(dtype):
    torch.manual_seed(0)
    fb = batch(b=5, k=3, dtype=dtype)
    q = fb.queries.clone().requires_grad_(True)
    mochi = MoCHi(n_hard=7, n_mix=4, n_query_mix=2).train()
    pool, mask = mochi.pool(fb)
    assert pool.shape == (8, 5) and not mask[torch.arange(5), torch.arange(5)].any() and mask[:, 5:].all()
    out = mochi(q, fb.positives, fb.negatives)
    assert out.extra_negatives.shape == (5, 6, 5) and not out.extra_negatives.requires_grad
    again = mochi(*out)  # appends to the extras already there
    assert again.extra_negatives.shape == (5, 12, 5)
    nodetach = MoCHi(n_hard=7, n_mix=4, n_query_mix=2, detach_synthetic=False).train()(q, fb.positives, fb.negatives)
    assert nodetach.extra_negatives.requires_grad


def test_mochi_without_synthesis_equals_infonce_and_extras_are_private():
    fb = batch(b=4, k=3)
    loss = InfoNCELoss(temperature=0.1)
    plain = loss(fb.queries, torch.cat([fb.positives, fb.negatives])).loss
    out = MoCHi(n_hard=4, n_mix=0, n_query_mix=0).train()(*fb)
    assert out.extra_negatives is None
    assert torch.equal(loss.forward_inputs(to_contrastive_inputs(out)).loss, plain)
    # with extras: each query's denominator holds its own synthetic points only (slow per-row reference)
    torch.manual_seed(0)
    out = MoCHi(n_hard=4, n_mix=3, n_query_mix=2).train()(*fb)
    got = loss.forward_inputs(to_contrastive_inputs(out)).loss
    cands = torch.cat([fb.positives, fb.negatives])
    rows = []
    for i in range(4):
        neg = torch.cat([cands[[j for j in range(7) if j != i]], out.extra_negatives[i]])
        l_pos = fb.queries[i] @ fb.positives[i] / 0.1
        l_neg = neg @ fb.queries[i] / 0.1
        rows.append(-(l_pos - torch.logsumexp(torch.cat([l_pos[None], l_neg]), 0)))
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-12)


def test_mochi_small_pool_and_errors():
    q, k = unit(1, 4), unit(1, 4, seed=1)
    out = MoCHi().train()(q, k)  # a single pair: no negative to mix
    assert out.extra_negatives is None
    with pytest.raises(ValueError):
        MoCHi(query_mix_max=0.7)
    with pytest.raises(ValueError, match="extra_negatives"):
        MoCHi().train()(q, k, None, torch.zeros(2, 1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="queries and positives"):
        PositiveExtrapolation()(q, unit(2, 4))


def test_transforms_registered_and_pipeline_specs():
    assert {"positive_extrapolation", "negative_interpolation", "mochi", "pipeline"} <= set(TRANSFORMS.names())
    pipe = TRANSFORMS.build("pipeline", transforms=[{"name": "positive_extrapolation", "alpha": 1.0},
                                                    MoCHi(n_hard=2, n_mix=1, n_query_mix=1)])
    assert isinstance(pipe.transforms[0], PositiveExtrapolation) and pipe.transforms[0].alpha == 1.0
    with pytest.raises(ValueError):
        FeatureTransformPipeline([{"alpha": 1.0}])
    with pytest.raises(ValueError):
        PositiveExtrapolation(lam=0.5)
    with pytest.raises(ValueError):
        NegativeInterpolation(alpha=0.0)
    with pytest.raises(ValueError, match="granularity"):
        PositiveExtrapolation(granularity="pixel")
    assert math.isclose(NegativeInterpolation().alpha, 1.6) and math.isclose(PositiveExtrapolation().alpha, 2.0)
