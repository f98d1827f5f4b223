"""Soft-InfoNCE (methods.md §A1) against a slow reference, its property checks, and the three estimators."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive.losses import InfoNCELoss, LossInputError, SoftInfoNCELoss
from contrastive.losses import functional as F
from contrastive.baselines.bm25 import bm25_score_matrix, code_tokens
from contrastive.losses.estimators import BM25Estimator, FrozenEncoderEstimator, FrozenModelEstimator
from contrastive.registry import LOSSES

DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


def rand(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0, unit: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (nn.functional.normalize(x, dim=-1) if unit else x).to(dtype)


def diag_mask(b: int, m: int) -> torch.Tensor:
    mask = torch.zeros(b, m, dtype=torch.bool)
    mask[:, :b] = torch.eye(b, dtype=torch.bool)
    return mask


def ref_soft_infonce(a, c, r, t, alpha, beta, tw, w_min, pos, fn=None, u=None):
    """Loop reference in float64: the paper's weight map and loss, SupCon L_out form for several positives."""
    a, c, r = a.double().numpy(), c.double().numpy(), r.double().numpy()
    pos = pos.numpy()
    b, m = pos.shape
    fn = np.zeros((b, m), bool) if fn is None else fn.numpy()
    u = np.ones((b, m)) if u is None else u.double().numpy()
    rows = []
    for i in range(b):
        s = [float(a[i] @ c[j]) / t for j in range(m)]
        P = [j for j in range(m) if pos[i, j]]
        N = [j for j in range(m) if not pos[i, j] and not fn[i, j]]
        z = sum(math.exp(r[i, j] / tw) for j in N)
        w = {}
        for j in N:
            p = math.exp(r[i, j] / tw) / z
            w[j] = 1.0 if len(N) == 1 else max(w_min, (beta - alpha * p) / (beta - alpha / len(N)))
        N = [j for j in N if u[i, j] * w[j] > 0]
        if not N:
            continue
        denom = sum(math.exp(s[p]) for p in P) + sum(u[i, j] * w[j] * math.exp(s[j]) for j in N)
        rows.append(-sum(s[p] - math.log(denom) for p in P) / len(P))
    return float(np.mean(rows))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["paper", "normalised", "masked_multi_weighted"])
def test_soft_infonce_matches_reference(dtype, case):
    b, m, d = 6, 6, 5
    a, c, r = rand(b, d, dtype=dtype), rand(m, d, dtype=dtype, seed=1), rand(b, m, dtype=dtype, seed=2)
    kw = dict(alpha=1.0, beta=1.0, weight_temperature=0.5, w_min=0.1, temperature=1.0)
    pos, fn, u = diag_mask(b, m), None, None
    if case == "normalised":
        a, c = nn.functional.normalize(a, dim=1), nn.functional.normalize(c, dim=1)
        kw.update(temperature=0.05, alpha=2.0, beta=1.5)
    if case == "masked_multi_weighted":
        m = 9
        c, r = rand(m, d, dtype=dtype, seed=1), rand(b, m, dtype=dtype, seed=2)
        pos = diag_mask(b, m)
        pos[0, 7] = pos[3, 8] = True
        fn = torch.zeros(b, m, dtype=torch.bool)
        fn[1, 0] = fn[2, 6] = True
        u = (torch.rand(b, m, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5).to(dtype)
    out = SoftInfoNCELoss(**kw)(a, c, pos, weights=u, false_negative_mask=fn, similarity_estimate=r)
    assert out.loss.dtype == dtype
    expected = ref_soft_infonce(a, c, r, kw["temperature"], kw["alpha"], kw["beta"], kw["weight_temperature"],
                                kw["w_min"], pos, fn, u)
    torch.testing.assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_zero_equals_infonce_exactly(dtype):
    a, c = rand(5, 4, dtype=dtype, unit=True), rand(8, 4, dtype=dtype, seed=1, unit=True)
    r = rand(5, 8, dtype=dtype, seed=2)
    for t in (1.0, 0.07):
        soft = SoftInfoNCELoss(alpha=0.0, beta=0.7, weight_temperature=0.3, temperature=t)
        assert torch.equal(soft(a, c, similarity_estimate=r).loss, InfoNCELoss(temperature=t)(a, c).loss)


def test_constant_estimate_per_row_equals_infonce():
    a, c = rand(5, 4, unit=True), rand(5, 4, seed=1, unit=True)
    r = torch.arange(5, dtype=torch.float64)[:, None].expand(5, 5) * 3.0  # constant within each row
    soft = SoftInfoNCELoss(alpha=3.0, beta=1.0, temperature=0.1)(a, c, similarity_estimate=r).loss
    assert soft.item() == pytest.approx(InfoNCELoss(temperature=0.1)(a, c).loss.item(), rel=1e-12)


def test_weights_mean_one_before_clipping_and_clip_after():
    b, m = 6, 6
    r = rand(b, m, seed=3) * 3
    neg = ~diag_mask(b, m)
    raw = F.soft_infonce_weights(r, neg, alpha=2.0, beta=1.0, weight_temperature=0.5, w_min=None)
    torch.testing.assert_close(raw[neg].view(b, m - 1).mean(1), torch.ones(b, dtype=torch.float64))
    assert (raw[neg] < 0.1).any()  # the clip matters in this example
    clipped = F.soft_infonce_weights(r, neg, alpha=2.0, beta=1.0, weight_temperature=0.5, w_min=0.1)
    assert (clipped[neg] >= 0.1).all()
    assert torch.equal(clipped[~neg], torch.ones(b, dtype=torch.float64))  # the positive's weight is 1


def test_weights_decrease_with_estimated_similarity():
    neg = ~diag_mask(1, 6)
    base = torch.tensor([[0.0, 0.3, -0.2, 0.5, 0.1, 0.0]], dtype=torch.float64)
    w0 = F.soft_infonce_weights(base, neg, alpha=1.0, beta=1.0, weight_temperature=0.2, w_min=0.1)
    prev_w, prev_loss = w0[0, 3], None
    a, c = rand(1, 4, unit=True), rand(6, 4, seed=1, unit=True)
    for bump in [0.1, 0.5, 1.0, 3.0]:
        r = base.clone()
        r[0, 3] += bump
        w = F.soft_infonce_weights(r, neg, alpha=1.0, beta=1.0, weight_temperature=0.2, w_min=0.1)
        assert w[0, 3] <= prev_w
        # others share the mass: their weight never drops
        assert (w[0, [1, 2, 4, 5]] >= w0[0, [1, 2, 4, 5]] - 1e-12).all()
        loss = SoftInfoNCELoss(temperature=0.1)(a, c, similarity_estimate=r).loss.item()
        assert prev_loss is None or loss <= prev_loss + 1e-12  # pushing a related negative less lowers the loss
        prev_w, prev_loss = w[0, 3], loss


def test_weight_temperature_limits():
    n = 6
    neg = ~diag_mask(1, n)
    r = torch.tensor([[0.0, 0.3, -0.2, 0.9, 0.1, 0.0]], dtype=torch.float64)
    hot = F.soft_infonce_weights(r, neg, alpha=1.0, beta=1.0, weight_temperature=1e6, w_min=0.1)
    torch.testing.assert_close(hot[neg], torch.ones(n - 1, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    cold = F.soft_infonce_weights(r, neg, alpha=1.0, beta=2.0, weight_temperature=1e-4, w_min=0.1)
    expected_top = max(0.1, (2.0 - 1.0) / (2.0 - 1.0 / (n - 1)))
    assert cold[0, 3].item() == pytest.approx(expected_top)
    assert cold[0, 1].item() == pytest.approx(2.0 / (2.0 - 1.0 / (n - 1)))


def test_row_shift_invariance_of_scores():
    a, c, r = rand(4, 3), rand(4, 3, seed=1), rand(4, 4, seed=2)
    loss = SoftInfoNCELoss()
    base = loss(a, c, similarity_estimate=r).loss
    # adding a constant to a row of s = a @ c.T: append a constant feature to the anchors and a 1 to candidates
    a2 = torch.cat([a, torch.tensor([[0.5], [-2.0], [1.0], [3.0]], dtype=torch.float64)], 1)
    c2 = torch.cat([c, torch.ones(4, 1, dtype=torch.float64)], 1)
    assert loss(a2, c2, similarity_estimate=r).loss.item() == pytest.approx(base.item(), rel=1e-12)


def test_soft_infonce_gradcheck_float64():
    b, m, d = 3, 5, 4
    a = rand(b, d).requires_grad_(True)
    c = rand(m, d, seed=1).requires_grad_(True)
    r = rand(b, m, seed=2)
    fn = torch.zeros(b, m, dtype=torch.bool)
    fn[2, 4] = True
    loss = SoftInfoNCELoss(alpha=1.0, beta=1.0, weight_temperature=0.5)
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y, false_negative_mask=fn, similarity_estimate=r).loss, (a, c))


def test_soft_infonce_symmetric_transposes_estimate():
    a, c, r = rand(4, 3), rand(4, 3, seed=1), rand(4, 4, seed=2)
    kw = dict(alpha=1.0, beta=1.0, weight_temperature=0.5)
    sym = SoftInfoNCELoss(symmetric=True, **kw)(a, c, similarity_estimate=r).loss
    one = SoftInfoNCELoss(**kw)
    expected = 0.5 * (one(a, c, similarity_estimate=r).loss + one(c, a, similarity_estimate=r.T).loss)
    assert sym.item() == pytest.approx(expected.item(), rel=1e-12)


def test_soft_infonce_errors():
    a, c = rand(4, 3), rand(4, 3, seed=1)
    with pytest.raises(LossInputError, match="similarity_estimate"):
        SoftInfoNCELoss()(a, c)
    with pytest.raises(LossInputError, match="beta > alpha"):  # 3 negatives: beta must exceed alpha / 3
        SoftInfoNCELoss(alpha=3.0, beta=1.0)(a, c, similarity_estimate=rand(4, 4, seed=2))
    with pytest.raises(LossInputError, match=r"similarity_estimate must have shape"):
        SoftInfoNCELoss()(a, c, similarity_estimate=rand(4, 5))
    for bad in ({"alpha": -1.0}, {"beta": 0.0}, {"weight_temperature": 0.0}, {"w_min": 1.5}):
        with pytest.raises(ValueError):
            SoftInfoNCELoss(**bad)
    assert isinstance(LOSSES.build("soft_infonce", alpha=0.5), SoftInfoNCELoss)


# ----------------------------------------------------------------------------------------------- estimators

def slow_bm25(query: list[str], docs: list[list[str]], k1: float, b: float, avgdl: float) -> list[float]:
    n_docs = len(docs)
    out = []
    for doc in docs:
        score = 0.0
        for tok in query:  # every occurrence, qf = 1
            n = sum(1 for d in docs if tok in d)
            f = doc.count(tok)
            if f == 0:
                continue
            idf = math.log((n_docs - n + 0.5) / (n + 0.5))
            K = k1 * ((1 - b) + b * len(doc) / avgdl)
            score += idf * (k1 + 1) * f / (K + f) * ((100 + 1) * 1) / (100 + 1)
        out.append(score)
    return out


def test_bm25_score_matrix_matches_slow_reference():
    texts = ["sort a list of numbers", "read a file line by line", "sort the file by date",
             "parse json from a file", "a a a list"]
    toks = [code_tokens(t) for t in texts]
    for avgdl in (None, 7.5):
        got = bm25_score_matrix(toks, toks, k1=1.2, b=0.75, avgdl=avgdl)
        mean_len = avgdl if avgdl is not None else sum(map(len, toks)) / len(toks)
        expected = torch.tensor([slow_bm25(q, toks, 1.2, 0.75, mean_len) for q in toks], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # "a" occurs in 4 of 5 documents: its idf is negative, as in the paper's formula
    assert math.log((5 - 4 + 0.5) / (4 + 0.5)) < 0


def test_bm25_estimator_query_to_query_and_fit():
    est = BM25Estimator()
    queries = ["sort list", "sort list quickly", "open file", "parse json", "print date"]
    r = est.estimate(queries)
    assert r.shape == (5, 5) and r.dtype == torch.float32
    assert r[0, 1] > r[0, 2] == 0  # lexical overlap (tokens in fewer than half of the batch: positive idf)
    r2 = est.estimate(queries, ["open the file", "sort", "x", "y", "z"])
    assert r2.shape == (5, 5) and r2[2, 0] > r2[2, 1]
    est.fit(["a b c d", "e f"])
    assert est.avgdl == 3.0
    custom = BM25Estimator(tokenizer=str.split)
    docs = ["sort", "x", "y"]
    assert custom.estimate(["Sort"], docs).abs().sum().item() == 0.0  # case-sensitive tokenizer: no overlap
    assert est.estimate(["Sort"], docs)[0, 0].item() > 0.0
    with pytest.raises(TypeError):
        est.estimate("a single string")
    # end to end: the estimate feeds Soft-InfoNCE
    a, c = rand(5, 4, unit=True), rand(5, 4, seed=1, unit=True)
    assert torch.isfinite(SoftInfoNCELoss(temperature=0.1)(a, c, similarity_estimate=r).loss)


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(x))

    def encode_document(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.lin(x)


def test_frozen_encoder_estimator_cosine_no_grad_eval():
    torch.manual_seed(0)
    tower = _Tower()
    est = FrozenEncoderEstimator(tower)
    assert not any(p.requires_grad for p in tower.parameters())
    x, y = torch.randn(5, 4), torch.randn(7, 4)
    tower.train()  # e.g. the trainer switched modes: the estimator puts it back in eval
    r1, r2 = est.estimate(x, y), est.estimate(x, y)
    assert not tower.training and torch.equal(r1, r2) and not r1.requires_grad
    expected = nn.functional.normalize(tower.lin(x), dim=1) @ nn.functional.normalize(tower.lin(y), dim=1).T
    torch.testing.assert_close(r1, expected.detach())
    assert est.estimate(x).shape == (5, 5)  # query-to-query
    assert r1.abs().max() <= 1 + 1e-6


def test_frozen_model_estimator_from_module_copies_and_freezes():
    torch.manual_seed(0)
    model = _Tower()
    est = FrozenModelEstimator.from_module(model, encode=lambda m, x: m.lin(x),
                                           encode_candidates=lambda m, x: m.encode_document(x))
    assert all(p.requires_grad for p in model.parameters())  # the original keeps training
    x, y = torch.randn(3, 4), torch.randn(4, 4)
    r = est.estimate(x, y)
    torch.testing.assert_close(r, (model.lin(x) @ (2.0 * model.lin(y)).T).detach())  # raw dot product
    with torch.no_grad():
        model.lin.weight.add_(1.0)
    torch.testing.assert_close(est.estimate(x, y), r)  # the copy is unaffected
    cos = FrozenEncoderEstimator.from_module(model)
    assert cos.normalize and est.normalize is False
    assert cos.estimate(x, y).abs().max() <= 1 + 1e-6
