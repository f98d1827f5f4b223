"""Cement-style margin loss (this project's formulation, methods.md §A3 B2/B4) and the weighted sum /
Slipform combination."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive.losses import CementLoss, ContrastiveInputs, InfoNCELoss, LossInputError, WeightedSumLoss, slipform
from contrastive.losses import functional as F
from contrastive.registry import LOSSES

DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}


def unit(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return nn.functional.normalize(x, dim=-1).to(dtype)


def diag_mask(b: int, m: int) -> torch.Tensor:
    mask = torch.zeros(b, m, dtype=torch.bool)
    mask[:, :b] = torch.eye(b, dtype=torch.bool)
    return mask


def ref_margin(d_raw, calibration, m_min, m_max, d_lo=0.0, d_hi=1.0, k=10.0, c=0.5):
    x = min(max((d_raw - d_lo) / (d_hi - d_lo), 0.0), 1.0)
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    g = {"linear": x, "constant": 1.0,
         "sigmoid": (sig(k * (x - c)) - sig(-k * c)) / (sig(k * (1 - c)) - sig(-k * c))}[calibration]
    return m_min + (m_max - m_min) * g


def ref_cement(a, cand, pos, diff, calibration, reduction, m_min=0.1, m_max=0.3, fn=None, w=None, **mk):
    a, cand = a.double().numpy(), cand.double().numpy()
    pos = pos.numpy()
    b, m = pos.shape
    fn = np.zeros((b, m), bool) if fn is None else fn.numpy()
    w = np.ones((b, m)) if w is None else w.double().numpy()
    diff = np.zeros((b, m)) if diff is None else diff.double().numpy()
    rows = []
    for i in range(b):
        s = [float(a[i] @ cand[j]) for j in range(m)]
        P = [j for j in range(m) if pos[i, j]]
        N = [j for j in range(m) if not pos[i, j] and not fn[i, j] and w[i, j] > 0]
        if not N:
            continue
        per_pos = []
        for p in P:
            h = [w[i, n] * max(0.0, ref_margin(diff[i, n], calibration, m_min, m_max, **mk) - s[p] + s[n]) for n in N]
            per_pos.append({"mean": sum(h) / sum(w[i, n] for n in N), "sum": sum(h), "max": max(h)}[reduction])
        rows.append(sum(per_pos) / len(P))
    return float(np.mean(rows))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("calibration", ["linear", "sigmoid", "constant"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_cement_matches_reference(dtype, calibration, reduction):
    b, m, d = 5, 10, 6
    a, c = unit(b, d, dtype=dtype), unit(m, d, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    diff = torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype)
    pos = diag_mask(b, m)
    pos[1, 7] = pos[3, 8] = True
    fn = torch.rand(b, m, generator=g) < 0.15
    w = (torch.rand(b, m, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    loss = CementLoss(margin_min=0.2, margin_max=0.8, calibration=calibration, negative_reduction=reduction)
    out = loss(a, c, pos, weights=w, false_negative_mask=fn, difficulty=diff)
    expected = ref_cement(a, c, pos, diff, calibration, reduction, 0.2, 0.8, fn, w)
    torch.testing.assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64), **tol(dtype))
    assert {"acc", "pos_sim", "neg_sim", "active", "margin_mean", "skipped"} <= set(out.logs)


def test_cement_difficulty_range_and_sigmoid_parameters():
    a, c = unit(4, 5), unit(6, 5, seed=1)
    diff = 1 + 4 * torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # raw 1..5
    loss = CementLoss(calibration="sigmoid", difficulty_min=1.0, difficulty_max=5.0, sigmoid_slope=4.0,
                      sigmoid_center=0.3)
    expected = ref_cement(a, c, diag_mask(4, 6), diff, "sigmoid", "mean", d_lo=1.0, d_hi=5.0, k=4.0, c=0.3)
    assert loss(a, c, difficulty=diff).loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("calibration", ["linear", "sigmoid"])
def test_margin_increases_with_difficulty(calibration):
    d = torch.linspace(-0.5, 1.5, 41, dtype=torch.float64)
    m = F.calibrated_margins(d, calibration=calibration, margin_min=0.1, margin_max=0.5)
    assert torch.all(m[1:] >= m[:-1])
    inside = (d > 0) & (d < 1)
    if calibration == "linear":
        assert torch.all(m[1:][inside[1:]] > m[:-1][inside[1:]])  # strictly on [0, 1]
    assert m[0].item() == pytest.approx(0.1) and m[-1].item() == pytest.approx(0.5)  # clipped to the range
    ends = F.calibrated_margins(torch.tensor([0.0, 1.0], dtype=torch.float64), calibration=calibration,
                                margin_min=0.1, margin_max=0.5)
    torch.testing.assert_close(ends, torch.tensor([0.1, 0.5], dtype=torch.float64))  # the map spans the range


def test_fixed_margin_special_cases():
    """m_min == m_max or calibration='constant' is the fixed-margin triplet loss; constant needs no difficulty."""
    a, c = unit(4, 5), unit(7, 5, seed=1)
    diff = torch.rand(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fixed = ref_cement(a, c, diag_mask(4, 7), None, "constant", "sum", 0.2, 0.2)
    assert CementLoss(0.2, 0.2, negative_reduction="sum")(a, c, difficulty=diff).loss.item() == pytest.approx(fixed)
    constant = CementLoss(0.0, 0.2, calibration="constant", negative_reduction="sum")
    assert constant(a, c).loss.item() == pytest.approx(fixed)
    with pytest.raises(LossInputError, match="needs difficulty"):
        CementLoss()(a, c)


def test_zero_loss_and_gradient_beyond_margin_and_linear_in_violation():
    e = torch.eye(3, dtype=torch.float64)
    anchor = e[:1].clone().requires_grad_(True)
    pos_v = e[0]
    loss = CementLoss(margin_min=0.2, margin_max=0.2)
    diff = torch.zeros(1, 2, dtype=torch.float64)
    for s_neg, expected in [(0.7, 0.0), (0.8, 0.0), (0.9, 0.1), (1.0, 0.2)]:
        neg_v = torch.tensor([s_neg, math.sqrt(1 - s_neg ** 2), 0.0], dtype=torch.float64)
        cand = torch.stack([pos_v, neg_v])
        anchor.grad = None
        out = loss(anchor, cand, difficulty=diff)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(expected, abs=1e-12)
        if expected == 0.0 and s_neg < 0.8:
            assert torch.all(anchor.grad == 0)
            assert out.logs["active"].item() == 0.0


def test_cement_gradcheck_float64():
    a = unit(3, 4).requires_grad_(True)
    c = unit(6, 4, seed=1).requires_grad_(True)
    diff = torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = CementLoss(margin_min=0.5, margin_max=1.5, negative_reduction="mean")
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y, difficulty=diff).loss, (a, c))


def test_cement_constructor_errors():
    for bad in ({"margin_min": 0.5, "margin_max": 0.1}, {"margin_min": -0.1}, {"calibration": "cubic"},
                {"negative_reduction": "median"}, {"difficulty_min": 1.0, "difficulty_max": 1.0},
                {"sigmoid_slope": 0.0}):
        with pytest.raises(ValueError):
            CementLoss(**bad)


# ----------------------------------------------------------------------------------------------- combinations

@pytest.mark.parametrize("dtype", DTYPES)
def test_slipform_is_weighted_sum_of_infonce_and_cement(dtype):
    a, c = unit(4, 5, dtype=dtype), unit(8, 5, dtype=dtype, seed=1)
    diff = torch.rand(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    loss = LOSSES.build("slipform", temperature=0.1, cement_weight=0.5, margin_min=0.1, margin_max=0.4)
    out = loss(a, c, difficulty=diff)
    nce = InfoNCELoss(temperature=0.1)(a, c).loss
    cem = CementLoss(margin_min=0.1, margin_max=0.4)(a, c, difficulty=diff).loss
    torch.testing.assert_close(out.loss, nce + 0.5 * cem, **tol(dtype))
    for key in ("acc", "pos_sim", "neg_sim", "skipped", "loss_infonce", "loss_cement", "cement/active"):
        assert key in out.logs
    torch.testing.assert_close(out.logs["loss_cement"], cem.detach())


def test_weighted_sum_from_specs_and_instances_symmetric():
    a, c = unit(5, 4), unit(5, 4, seed=1)
    r = torch.rand(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from contrastive.build import build_loss

    ws = build_loss({"name": "weighted_sum", "losses": {"nce": {"name": "infonce", "temperature": 0.1, "symmetric": True},
                                                        "soft": LOSSES.build("soft_infonce", temperature=0.1)},
                     "weights": {"soft": 0.25}})
    out = ws(a, c, similarity_estimate=r)
    expected = (InfoNCELoss(temperature=0.1, symmetric=True)(a, c).loss
                + 0.25 * LOSSES.build("soft_infonce", temperature=0.1)(a, c, similarity_estimate=r).loss)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert "nce/acc_rev" in out.logs
    one_way = ws.one_way(ContrastiveInputs(a, c, similarity_estimate=r).validate())
    assert one_way.loss.item() != pytest.approx(out.loss.item())  # one_way skips the reverse direction
    with pytest.raises(ValueError, match="unknown losses"):
        WeightedSumLoss({"nce": InfoNCELoss()}, {"other": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        WeightedSumLoss({"nce": InfoNCELoss()}, {"nce": -1.0})
    with pytest.raises(TypeError, match="must be a ContrastiveLoss"):
        WeightedSumLoss({"nce": {"name": "infonce", "temperature": 0.1}})  # specs are built by build_loss
    assert isinstance(slipform(), WeightedSumLoss)
