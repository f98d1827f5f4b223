"""Input validation of every registered loss: clear LossInputError for bad inputs, the documented logged skip
of anchors with no negative left, and never a silent NaN loss (fuzzed)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.losses import (CementLoss, ContrastiveInputs, DebiasedContrastiveLoss, HardNegativeContrastiveLoss,
                                InfoNCELoss, LossInputError, SoftInfoNCELoss, WeightedSumLoss)

#: every loss family, built directly (no registry import cost), with extra inputs each one needs
LOSSES = {
    "infonce": lambda: InfoNCELoss(temperature=0.05),
    "infonce_symmetric": lambda: InfoNCELoss(temperature=0.05, symmetric=True),
    "dcl": lambda: DebiasedContrastiveLoss(),
    "hcl": lambda: HardNegativeContrastiveLoss(),
    "soft_infonce": lambda: SoftInfoNCELoss(temperature=0.1),
    "cement": lambda: CementLoss(),
    "slipform": lambda: WeightedSumLoss({"nce": InfoNCELoss(), "cement": CementLoss()}, {"cement": 0.2}),
}


def extras(b: int, m: int, dtype: torch.dtype = torch.float64) -> dict:
    g = torch.Generator().manual_seed(7)
    return {"difficulty": torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype),
            "similarity_estimate": torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype)}


def unit(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def call(name: str, a, c, pos=None, **kw):
    kw = {**extras(a.shape[0], c.shape[0]), **kw}
    return LOSSES[name]()(a, c, pos, **kw)


NAMES = sorted(LOSSES)


@pytest.mark.parametrize("name", NAMES)
def test_shape_errors(name):
    a, c = unit(4, 5), unit(4, 5, seed=1)
    with pytest.raises(LossInputError, match="embedding sizes differ"):
        call(name, a, unit(4, 6))
    with pytest.raises(LossInputError, match="2-D"):
        call(name, a[0], c)
    with pytest.raises(LossInputError, match="empty"):
        call(name, a[:0], c, **extras(0, 4))
    bad_shape = torch.ones(4, 3, dtype=torch.float64)
    for key in ("weights", "difficulty", "similarity_estimate"):
        with pytest.raises(LossInputError, match=f"{key} must have shape"):
            call(name, a, c, **{key: bad_shape})
    with pytest.raises(LossInputError, match="positive_mask must have shape"):
        call(name, a, c, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(LossInputError, match="candidate i must be the positive"):
        call(name, a, c[:2], **extras(4, 2))


@pytest.mark.parametrize("name", NAMES)
def test_dtype_errors(name):
    a, c = unit(4, 5), unit(4, 5, seed=1)
    with pytest.raises(LossInputError, match="share one floating dtype"):
        call(name, a, c.float())
    with pytest.raises(LossInputError, match="share one floating dtype"):
        call(name, a.long(), c.long())
    with pytest.raises(LossInputError, match="must be a bool tensor"):
        call(name, a, c, torch.eye(4))
    with pytest.raises(LossInputError, match="must be a bool tensor"):
        call(name, a, c, false_negative_mask=torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(LossInputError, match="weights must be floating point"):
        call(name, a, c, weights=torch.ones(4, 4, dtype=torch.long))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(name, bad):
    a, c = unit(4, 5), unit(4, 5, seed=1)
    a_bad = a.clone()
    a_bad[2, 1] = bad
    with pytest.raises(LossInputError, match=r"anchors contain NaN or infinite values \(rows \[2\]"):
        call(name, a_bad, c)
    c_bad = c.clone()
    c_bad[0, 0] = bad
    with pytest.raises(LossInputError, match="candidates contain NaN"):
        call(name, a, c_bad)
    for key in ("weights", "difficulty", "similarity_estimate"):
        t = torch.ones(4, 4, dtype=torch.float64)
        t[1, 2] = bad
        with pytest.raises(LossInputError, match=f"{key} contain NaN or infinite"):
            call(name, a, c, **{key: t})


@pytest.mark.parametrize("name", NAMES)
def test_negative_weights_and_anchor_without_positive(name):
    a, c = unit(4, 5), unit(4, 5, seed=1)
    w = torch.ones(4, 4, dtype=torch.float64)
    w[0, 1] = -0.5
    with pytest.raises(LossInputError, match="non-negative"):
        call(name, a, c, weights=w)
    pos = torch.eye(4, dtype=torch.bool)
    pos[3, 3] = False
    with pytest.raises(LossInputError, match=r"anchors \[3\] have no positive"):
        call(name, a, c, pos)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("infonce_symmetric",)])
def test_anchor_without_negative_is_a_logged_skip(name):
    """Anchor 0 has every other candidate masked: it is skipped (logs['skipped'] = 1) and the loss is the
    mean over the remaining anchors; its embedding then gets no gradient from its own row."""
    b = 4
    a, c = unit(b, 5), unit(b, 5, seed=1)
    fn = torch.zeros(b, b, dtype=torch.bool)
    fn[0, 1:] = True
    out = call(name, a, c, false_negative_mask=fn)
    assert out.logs["skipped"].item() == 1.0
    assert torch.isfinite(out.loss)
    # zero weights count as "no negative" too
    w = torch.ones(b, b, dtype=torch.float64)
    w[0] = 0.0
    out_w = call(name, a, c, weights=w)
    assert out_w.logs["skipped"].item() == 1.0
    assert out_w.loss.item() == pytest.approx(out.loss.item(), rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_every_anchor_skipped_is_an_error(name):
    a, c = unit(3, 5), unit(3, 5, seed=1)
    with pytest.raises(LossInputError, match="no anchor has a negative left"):
        call(name, a, c, false_negative_mask=~torch.eye(3, dtype=torch.bool))
    with pytest.raises(LossInputError, match="no anchor has a negative left"):
        call(name, a, c, torch.ones(3, 3, dtype=torch.bool))  # every candidate a positive


def test_skipped_rows_do_not_poison_gradients():
    """No NaN/inf sneaks into the gradient from the skipped row's stand-in values (DCL/HCL/Soft paths)."""
    a = unit(3, 4).requires_grad_(True)
    c = unit(3, 4, seed=1).requires_grad_(True)
    fn = torch.zeros(3, 3, dtype=torch.bool)
    fn[1, [0, 2]] = True
    for name in ("dcl", "hcl", "soft_infonce", "cement"):
        a.grad = c.grad = None
        call(name, a, c, false_negative_mask=fn).loss.backward()
        assert torch.isfinite(a.grad).all() and torch.isfinite(c.grad).all()
        assert torch.all(a.grad[1] == 0)


def test_symmetric_needs_reverse_when_not_square():
    with pytest.raises(LossInputError, match="pass reverse="):
        InfoNCELoss(symmetric=True)(unit(3, 4), unit(5, 4, seed=1))


def test_non_finite_loss_is_an_error_not_a_silent_nan():
    a = torch.full((2, 3), 1e20)  # finite in float32, but a @ c.T overflows to inf
    with pytest.raises(LossInputError, match="non-finite loss"):
        InfoNCELoss(temperature=0.05)(a, -a)


def test_contrastive_inputs_reversed_transposes_everything():
    a, c = unit(3, 4), unit(3, 4, seed=1)
    ex = extras(3, 3)
    inputs = ContrastiveInputs(a, c, weights=ex["difficulty"], difficulty=ex["difficulty"],
                               similarity_estimate=ex["similarity_estimate"])
    rev = inputs.reversed()
    assert torch.equal(rev.similarity_estimate, ex["similarity_estimate"].T)
    assert torch.equal(rev.difficulty, ex["difficulty"].T) and rev.anchors is c
    assert inputs.to(torch.float32).similarity_estimate.dtype == torch.float32


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(NAMES),
    b=st.integers(1, 5),
    extra=st.integers(0, 4),
    d=st.integers(1, 6),
    scale=st.sampled_from([1e-6, 1.0, 30.0]),
    normalise=st.booleans(),
    seed=st.integers(0, 2**16),
    float32=st.booleans(),
)
def test_fuzz_loss_is_finite_or_clear_error(name, b, extra, d, scale, normalise, seed, float32):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if float32 else torch.float64
    m = b + extra
    if name == "infonce_symmetric":
        m = b
    a = torch.randn(b, d, generator=g, dtype=torch.float64) * scale
    c = torch.randn(m, d, generator=g, dtype=torch.float64) * scale
    if normalise:
        a, c = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(c, dim=1)
    pos = torch.zeros(b, m, dtype=torch.bool)
    pos[:, :b] = torch.eye(b, dtype=torch.bool)
    pos |= torch.rand(b, m, generator=g) < 0.15
    fn = torch.rand(b, m, generator=g) < 0.3
    w = torch.rand(b, m, generator=g, dtype=torch.float64) * (torch.rand(b, m, generator=g) > 0.2)
    kw = {"weights": w.to(dtype), "false_negative_mask": fn, **extras(b, m, dtype)}
    kw["similarity_estimate"] = kw["similarity_estimate"] * scale
    a = a.to(dtype).requires_grad_(True)
    try:
        out = LOSSES[name]()(a, c.to(dtype), pos, **kw)
    except LossInputError as e:
        # the only acceptable failures on these well-formed inputs: nothing left to contrast, or
        # Soft-InfoNCE's documented beta > alpha / |N_i| condition
        assert "no anchor has a negative left" in str(e) or "beta > alpha" in str(e), str(e)
        return
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(a.grad).all()
    # neg_sim is NaN by design when no negative is left in a direction; everything else is finite
    assert all(torch.isfinite(v).all() for k, v in out.logs.items() if not k.endswith("neg_sim"))
