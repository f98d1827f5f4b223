"""InfoNCE family (plain, weighted, masked, multi-positive, symmetric, DCL, HCL) against slow references,
gradchecks and the property checks of methods.md §B7.2, §B7.3, §B7.9."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive.losses import (ContrastiveInputs, DebiasedContrastiveLoss, HardNegativeContrastiveLoss, InfoNCELoss,
                                Temperature, false_negative_mask_from_ids, positive_mask_from_labels)
from contrastive.losses import functional as F
from contrastive.registry import LOSSES

DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}


def unit(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def diag_mask(b: int, m: int) -> torch.Tensor:
    mask = torch.zeros(b, m, dtype=torch.bool)
    mask[:, :b] = torch.eye(b, dtype=torch.bool)
    return mask


# ----------------------------------------------------------------------------------------------- references

def ref_loss(a, c, t, pos, fn=None, w=None, tau_plus=0.0, beta=0.0):
    """Slow loop over anchors, float64 NumPy, straight from the formulas (InfoNCE/SupCon L_out, DCL, HCL)."""
    a, c = a.double().numpy(), c.double().numpy()
    pos = pos.numpy()
    b, m = pos.shape
    fn = np.zeros((b, m), bool) if fn is None else fn.numpy()
    w = np.ones((b, m)) if w is None else w.double().numpy()
    rows = []
    for i in range(b):
        l = [float(a[i] @ c[j]) / t for j in range(m)]
        P = [j for j in range(m) if pos[i, j]]
        N = [j for j in range(m) if not pos[i, j] and not fn[i, j] and w[i, j] > 0]
        if not N:
            continue
        pos_sum = sum(math.exp(l[p]) for p in P)
        if tau_plus == 0 and beta == 0:
            ng = sum(w[i, n] * math.exp(l[n]) for n in N)
        else:
            W = sum(w[i, n] for n in N)
            mean_imp = sum(w[i, n] * math.exp(beta * l[n]) for n in N) / W
            reweight = sum(w[i, n] * math.exp(beta * l[n]) / mean_imp * math.exp(l[n]) for n in N)
            pos_mean = pos_sum / len(P)
            ng = max((reweight - tau_plus * W * pos_mean) / (1 - tau_plus), W * math.exp(-1 / t))
        rows.append(-sum(l[p] - math.log(pos_sum + ng) for p in P) / len(P))
    return float(np.mean(rows))


def official_form_hcl(out_1, out_2, t, tau_plus, beta):
    """The HCL/DCL estimator as written in methods.md §B7.2 (b) for the SimCLR layout (2B views, N = 2B-2)."""
    b = out_1.shape[0]
    out = torch.cat([out_1, out_2])
    sim = torch.exp(out @ out.T / t)
    keep = ~torch.eye(2 * b, dtype=torch.bool)
    keep[torch.arange(b), torch.arange(b) + b] = False
    keep[torch.arange(b) + b, torch.arange(b)] = False
    neg = sim.masked_select(keep).view(2 * b, -1)
    pos = torch.exp((out_1 * out_2).sum(-1) / t)
    pos = torch.cat([pos, pos])
    n = 2 * b - 2
    imp = (beta * neg.log()).exp()
    reweight = (imp * neg).sum(-1) / imp.mean(-1)
    ng = (-tau_plus * n * pos + reweight) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * math.exp(-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


def simclr_inputs(out_1, out_2):
    """anchors = candidates = both views; positive = the other view; self-pairs are masked."""
    b = out_1.shape[0]
    out = torch.cat([out_1, out_2])
    pos = torch.zeros(2 * b, 2 * b, dtype=torch.bool)
    pos[torch.arange(b), torch.arange(b) + b] = True
    pos[torch.arange(b) + b, torch.arange(b)] = True
    return out, out, pos, torch.eye(2 * b, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------- InfoNCE

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["plain", "weighted", "masked", "multi_positive", "extra_negatives"])
def test_infonce_matches_reference(dtype, case):
    b, m, d, t = 5, 9, 6, 0.1
    a, c = unit(b, d, dtype=dtype), unit(m, d, dtype=dtype, seed=1)
    pos, fn, w = diag_mask(b, m), None, None
    g = torch.Generator().manual_seed(3)
    if case == "weighted":
        w = torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype)
        w[0, 3] = 0.0
    if case == "masked":
        fn = torch.rand(b, m, generator=g) < 0.3
    if case == "multi_positive":
        pos = pos.clone()
        pos[0, 5] = pos[1, 6] = pos[1, 7] = True
        fn = torch.zeros(b, m, dtype=torch.bool)
        fn[2, 0] = True
    if case == "extra_negatives":
        w = 1.0 + torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype)
    out = InfoNCELoss(temperature=t)(a, c, pos, weights=w, false_negative_mask=fn)
    assert out.loss.dtype == dtype
    torch.testing.assert_close(out.loss.double(), torch.tensor(ref_loss(a, c, t, pos, fn, w), dtype=torch.float64),
                               **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_infonce_symmetric_matches_reference(dtype):
    b, d, t = 6, 5, 0.2
    a, c = unit(b, d, dtype=dtype), unit(b, d, dtype=dtype, seed=2)
    pos = torch.eye(b, dtype=torch.bool)
    out = InfoNCELoss(temperature=t, symmetric=True)(a, c)
    expected = 0.5 * (ref_loss(a, c, t, pos) + ref_loss(c, a, t, pos))
    torch.testing.assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64), **tol(dtype))
    assert {"acc", "pos_sim", "neg_sim", "acc_rev"} <= set(out.logs)


def test_infonce_symmetric_with_explicit_reverse():
    b, m, d, t = 4, 7, 5, 0.1
    a, c = unit(b, d), unit(m, d, seed=1)
    rev = ContrastiveInputs(anchors=c[:b], candidates=a)  # documents -> queries
    out = InfoNCELoss(temperature=t, symmetric=True)(a, c, reverse=rev)
    expected = 0.5 * (ref_loss(a, c, t, diag_mask(b, m)) + ref_loss(c[:b], a, t, diag_mask(b, b)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)


def test_unit_weights_and_empty_mask_reproduce_plain_infonce():
    a, c = unit(5, 4), unit(8, 4, seed=1)
    loss = InfoNCELoss(temperature=0.07)
    plain = loss(a, c).loss
    same = loss(a, c, weights=torch.ones(5, 8, dtype=torch.float64),
                false_negative_mask=torch.zeros(5, 8, dtype=torch.bool)).loss
    assert torch.equal(plain, same)


@pytest.mark.parametrize("name,kwargs", [("infonce", {}), ("dcl", {}), ("hcl", {}),
                                         ("hcl", {"detach_importance": False})])
def test_masked_false_negative_has_no_effect_and_zero_gradient(name, kwargs):
    """A candidate masked for every anchor: changing it leaves the loss unchanged and it gets zero gradient."""
    b, m, d = 4, 7, 5
    a, c = unit(b, d), unit(m, d, seed=1)
    fn = torch.zeros(b, m, dtype=torch.bool)
    fn[:, 5] = True
    loss = LOSSES.build(name, temperature=0.2, **kwargs)
    c1 = c.clone().requires_grad_(True)
    l1 = loss(a, c1, false_negative_mask=fn).loss
    l1.backward()
    assert torch.all(c1.grad[5] == 0)
    c2 = c.clone()
    c2[5] = -c2[0]  # a very different (and for anchor 0 very hard) similarity
    assert loss(a, c2, false_negative_mask=fn).loss.item() == pytest.approx(l1.item(), rel=1e-12)
    # per-entry: a false negative of one row gets zero gradient at the logit level
    logits = (a @ c.T / 0.2).requires_grad_(True)
    fn1 = torch.zeros(b, m, dtype=torch.bool)
    fn1[1, 2] = True
    neg = ~diag_mask(b, m) & ~fn1
    if name == "infonce":
        rows, _ = F.info_nce_from_logits(logits, diag_mask(b, m), neg)
    else:
        rows, _, _ = F.debiased_nce_from_logits(logits, diag_mask(b, m), neg, temperature=0.2, tau_plus=0.1,
                                                beta=1.0 if name == "hcl" else 0.0, **kwargs)
    rows.sum().backward()
    assert logits.grad[1, 2] == 0 and logits.grad[1, 3] != 0


@pytest.mark.parametrize("name", ["infonce", "dcl", "hcl"])
def test_gradcheck_float64(name):
    b, m, d = 3, 5, 4
    a = unit(b, d).requires_grad_(True)
    c = unit(m, d, seed=1).requires_grad_(True)
    pos = diag_mask(b, m)
    pos[0, 4] = True
    fn = torch.zeros(b, m, dtype=torch.bool)
    fn[1, 3] = True
    w = torch.rand(b, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    # HCL's default detaches the importance weights, so only the non-detached variant is the true gradient
    kwargs = {"detach_importance": False} if name == "hcl" else {}
    loss = LOSSES.build(name, temperature=0.3, **kwargs)
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y, pos, weights=w, false_negative_mask=fn).loss, (a, c))


def test_hcl_detached_equals_dcl_with_constant_importance_weights():
    """With detached importance weights, HCL is DCL whose negative weights are w * imp held constant
    (imp has weighted mean 1, so W is unchanged): same value and same gradient."""
    b, m, d, t = 3, 6, 4, 0.5
    a = unit(b, d).requires_grad_(True)
    c = unit(m, d, seed=1).requires_grad_(True)
    w = torch.rand(b, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    pos = diag_mask(b, m)
    hcl = InfoNCELoss(temperature=t, tau_plus=0.1, beta=1.5)(a, c, weights=w).loss
    g_hcl = torch.autograd.grad(hcl, (a, c))
    with torch.no_grad():
        log_w = torch.where(~pos, w.log(), torch.full_like(w, float("-inf")))
        imp = F.hcl_log_importance(a @ c.T / t, log_w, 1.5).exp()
    dcl = InfoNCELoss(temperature=t, tau_plus=0.1)(a, c, weights=w * imp).loss
    g_dcl = torch.autograd.grad(dcl, (a, c))
    assert hcl.item() == pytest.approx(dcl.item(), rel=1e-12)
    for x, y in zip(g_hcl, g_dcl):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_learnable_temperature_clamps_and_learns():
    t = Temperature(0.05, learnable=True, min_temperature=0.01, max_temperature=1.0)
    assert t().item() == pytest.approx(0.05)
    with torch.no_grad():
        t.log_scale.fill_(50.0)  # t = e^-50, below the minimum
    assert t().item() == pytest.approx(0.01)
    with torch.no_grad():
        t.log_scale.fill_(-5.0)  # t = e^5, above the maximum
    assert t().item() == pytest.approx(1.0)
    loss = InfoNCELoss(temperature=0.1, learnable_temperature=True)
    loss(unit(4, 3), unit(4, 3, seed=1)).loss.backward()
    assert loss.temperature.log_scale.grad is not None and loss.temperature.log_scale.grad != 0
    fixed = InfoNCELoss(temperature=0.1)
    assert not any(p.requires_grad for p in fixed.parameters())
    with pytest.raises(ValueError, match="temperature"):
        Temperature(2.0)


# ----------------------------------------------------------------------------------------------- DCL / HCL

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau_plus,beta", [(0.1, 0.0), (0.0, 1.0), (0.1, 1.0), (0.05, 2.0)])
def test_dcl_hcl_match_official_form(dtype, tau_plus, beta):
    """One positive, unit weights: our generalised estimator equals the official SimCLR-layout estimator."""
    b, d, t = 4, 6, 0.5
    o1, o2 = unit(b, d, dtype=dtype), unit(b, d, dtype=dtype, seed=1)
    a, c, pos, fn = simclr_inputs(o1, o2)
    ours = InfoNCELoss(temperature=t, tau_plus=tau_plus, beta=beta)(a, c, pos, false_negative_mask=fn).loss
    torch.testing.assert_close(ours, official_form_hcl(o1, o2, t, tau_plus, beta), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau_plus,beta", [(0.1, 0.0), (0.1, 1.0), (0.3, 0.5)])
def test_dcl_hcl_weighted_masked_multipositive_match_reference(dtype, tau_plus, beta):
    b, m, d, t = 5, 9, 6, 0.5
    a, c = unit(b, d, dtype=dtype), unit(m, d, dtype=dtype, seed=1)
    pos = diag_mask(b, m)
    pos[0, 6] = pos[2, 7] = pos[2, 8] = True
    g = torch.Generator().manual_seed(5)
    fn = torch.rand(b, m, generator=g) < 0.2
    w = (torch.rand(b, m, generator=g, dtype=torch.float64) * 2).to(dtype)
    out = InfoNCELoss(temperature=t, tau_plus=tau_plus, beta=beta)(a, c, pos, weights=w, false_negative_mask=fn)
    expected = ref_loss(a, c, t, pos, fn, w, tau_plus=tau_plus, beta=beta)
    torch.testing.assert_close(out.loss.double(), torch.tensor(expected, dtype=torch.float64), **tol(dtype))


def test_registered_dcl_hcl_defaults_and_special_cases():
    a, c = unit(6, 5), unit(6, 5, seed=1)
    dcl, hcl = DebiasedContrastiveLoss(), HardNegativeContrastiveLoss()
    assert (dcl.tau_plus, dcl.beta, dcl.temperature().item()) == (0.1, 0.0, pytest.approx(0.5))
    assert (hcl.tau_plus, hcl.beta) == (0.1, 1.0)
    # beta = 0 gives DCL exactly; beta = tau+ = 0 gives InfoNCE exactly
    assert torch.equal(HardNegativeContrastiveLoss(beta=0.0)(a, c).loss, dcl(a, c).loss)
    assert torch.equal(HardNegativeContrastiveLoss(beta=0.0, tau_plus=0.0)(a, c).loss,
                       InfoNCELoss(temperature=0.5)(a, c).loss)
    # the general path with tau+ = beta = 0 (floor inactive for unit vectors) agrees with InfoNCE
    logits = a @ c.T / 0.5
    pos = torch.eye(6, dtype=torch.bool)
    rows, _, clamped = F.debiased_nce_from_logits(logits, pos, ~pos, temperature=0.5)
    torch.testing.assert_close(rows, F.info_nce_from_logits(logits, pos, ~pos)[0], rtol=1e-12, atol=1e-12)
    assert not clamped.any()
    with pytest.raises(ValueError, match="tau_plus"):
        InfoNCELoss(tau_plus=1.0)
    with pytest.raises(ValueError, match="beta"):
        InfoNCELoss(beta=-1.0)


def test_hcl_importance_weights_mean_one_and_shift_towards_hard_negatives():
    logits = unit(4, 6) @ unit(10, 6, seed=1).T / 0.5
    w = torch.rand(4, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    neg = torch.ones(4, 10, dtype=torch.bool)
    neg[:, 0] = False
    log_w = torch.where(neg, w.log(), torch.full_like(w, float("-inf")))
    prev = None
    for beta in [0.0, 0.5, 1.0, 2.0, 6.0]:
        imp = F.hcl_log_importance(logits, log_w, beta).exp()
        wn = torch.where(neg, w, torch.zeros_like(w))
        torch.testing.assert_close((wn * imp).sum(1) / wn.sum(1), torch.ones(4, dtype=torch.float64))
        assert torch.all(imp[neg] > 0)
        mean_s = (wn * imp * logits).sum(1) / (wn * imp).sum(1)  # weighted mean of the negatives' similarity
        if prev is not None:
            assert torch.all(mean_s >= prev - 1e-12)
        prev = mean_s


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_dcl_floor_is_active_for_large_positive(beta):
    """Large s+ and a large tau+: the raw estimate is negative, so Ng = W e^{-1/t} (methods.md §B7.2 f3)."""
    t, tau_plus = 0.5, 0.5
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [0.6, -0.8]], dtype=torch.float64)
    out = InfoNCELoss(temperature=t, tau_plus=tau_plus, beta=beta)(a, c)
    assert out.logs["clamped"].item() == 1.0
    l_pos, W = 1.0 / t, 3.0
    expected = -(l_pos - math.log(math.exp(l_pos) + W * math.exp(-1 / t)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(out.loss)


def test_dcl_finite_for_aligned_positive_and_identical_negatives():
    v = torch.nn.functional.normalize(torch.ones(1, 4, dtype=torch.float64), dim=1)
    a = v.repeat(3, 1).requires_grad_(True)
    c = v.repeat(3, 1)
    out = InfoNCELoss(temperature=0.5, tau_plus=0.1)(a, c)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(a.grad).all()


def test_hcl_detach_flag_changes_gradient_only():
    a = unit(4, 5).requires_grad_(True)
    c = unit(6, 5, seed=1)
    grads, values = [], []
    for detach in (True, False):
        a.grad = None
        out = InfoNCELoss(temperature=0.5, tau_plus=0.1, beta=2.0, detach_importance=detach)(a, c)
        out.loss.backward()
        grads.append(a.grad.clone())
        values.append(out.loss.item())
    assert values[0] == pytest.approx(values[1], rel=1e-14)
    assert not torch.allclose(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------- masks from labels

def test_positive_mask_from_labels_supcon():
    labels = torch.tensor([0, 1, 0, 2])
    mask = positive_mask_from_labels(labels, labels, exclude=torch.eye(4, dtype=torch.bool))
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    with_diag = positive_mask_from_labels(torch.tensor([5, -1]), torch.tensor([5, -1, 5, -1]), include_diagonal=True,
                                          ignore_label=-1)
    assert torch.equal(with_diag, torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool))


def test_supcon_distinct_labels_equal_simclr_and_labels_equal_mask():
    """All labels distinct -> NT-Xent; a label mask and the equivalent explicit mask give the same loss."""
    o1, o2 = unit(4, 5), unit(4, 5, seed=1)
    a, c, pos, self_mask = simclr_inputs(o1, o2)
    views = torch.arange(4).repeat(2)  # view label = sample id
    pos_from_labels = positive_mask_from_labels(views, views, exclude=self_mask)
    assert torch.equal(pos_from_labels, pos)
    loss = InfoNCELoss(temperature=0.1)
    simclr = loss(a, c, pos, false_negative_mask=self_mask).loss
    labels = torch.tensor([0, 1, 0, 2]).repeat(2)
    sup = positive_mask_from_labels(labels, labels, exclude=self_mask)
    supcon = loss(a, c, sup, false_negative_mask=self_mask).loss
    assert supcon.item() == pytest.approx(ref_loss(a, c, 0.1, sup, self_mask), rel=1e-12)
    assert supcon.item() != pytest.approx(simclr.item())
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    sup_p = positive_mask_from_labels(labels[perm], labels[perm], exclude=torch.eye(8, dtype=torch.bool))
    permuted = loss(a[perm], c[perm], sup_p, false_negative_mask=torch.eye(8, dtype=torch.bool)).loss
    assert permuted.item() == pytest.approx(supcon.item(), rel=1e-12)


def test_false_negative_mask_from_ids():
    anchor_ids = torch.tensor([7, 8, 9])
    cand_ids = torch.tensor([7, 8, 9, 7, 3])  # candidate 3 duplicates the positive of anchor 0
    pos = diag_mask(3, 5)
    fn = false_negative_mask_from_ids(anchor_ids, cand_ids, pos)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    expected[0, 3] = True
    assert torch.equal(fn, expected)
    multi = false_negative_mask_from_ids(torch.tensor([[7, 3], [8, -1], [-1, -1]]), cand_ids, pos)
    expected[0, 4] = True
    assert torch.equal(multi, expected)
    # the duplicate no longer counts as a negative
    a, c = unit(3, 4), unit(5, 4, seed=1)
    assert InfoNCELoss()(a, c, pos, false_negative_mask=fn).loss.item() == pytest.approx(
        ref_loss(a, c, 0.05, pos, fn), rel=1e-12)
