"""The dual encoder wires estimators, difficulty, feature transforms and filters into the loss correctly."""
from __future__ import annotations

import torch

from contrastive.filters import PositiveAwareFilter
from contrastive.losses.margin import CementLoss
from contrastive.losses.soft_infonce import SoftInfoNCELoss
from contrastive.models.estimates import BatchBM25Estimator, token_strings
from contrastive.transforms.feature import MoCHi, PositiveExtrapolation
from tests.helpers import tiny_batch, tiny_model


def _swap_loss(model, loss):
    model.loss_fn = loss.to(torch.float64)
    return model


def test_soft_infonce_with_alpha_zero_equals_infonce_through_the_model():
    batch = tiny_batch(8, groups=[0, 1, 2, 3, 0, 5, 6, 7])
    plain = tiny_model()
    ref, _ = plain.contrastive_step(batch)
    soft = _swap_loss(tiny_model(), SoftInfoNCELoss(alpha=0.0, temperature=0.1))
    soft.similarity_estimator = BatchBM25Estimator()
    got, _ = soft.contrastive_step(batch)
    torch.testing.assert_close(got, ref)
    soft.loss_fn = SoftInfoNCELoss(alpha=1.0, beta=1.0, temperature=0.1).double()
    weighted, _ = soft.contrastive_step(batch)
    assert not torch.allclose(weighted, ref)  # the estimate changes the loss once alpha > 0


def test_bm25_estimator_scores_identical_queries_highest():
    batch = tiny_batch(12, vocab=1000)  # rare tokens: positive idf (the paper's idf is negative for common ones)
    batch["query_ids"][1] = batch["query_ids"][0]
    batch["query_mask"][1] = batch["query_mask"][0]
    r = BatchBM25Estimator().estimate_batch(tiny_model(), batch)
    assert r.shape == (12, 12)
    assert r[0, 1] == r[0, 0] and r[0, 1] > r[0, 2]
    assert token_strings(torch.tensor([[2, 5, 6, 0]]), torch.tensor([[True, True, True, False]])) == ["5 6"]


def test_cement_difficulty_is_the_detached_similarity():
    model = _swap_loss(tiny_model(difficulty="similarity"), CementLoss(margin_min=0.1, margin_max=0.3))
    seen = {}
    original = model.loss_fn.one_way

    def spy(inputs):
        seen["difficulty"], seen["sims"] = inputs.difficulty, inputs.anchors @ inputs.candidates.T
        return original(inputs)

    model.loss_fn.one_way = spy
    model.contrastive_step(tiny_batch(6))
    torch.testing.assert_close(seen["difficulty"], seen["sims"].detach())
    assert not seen["difficulty"].requires_grad


def test_mochi_synthetic_negatives_are_private_to_their_anchor():
    model = tiny_model(feature_transform=[MoCHi(n_hard=3, n_mix=2, n_query_mix=1)]).train()
    seen = {}
    original = model.assembler.assemble

    def spy(*args, **kwargs):
        cs = original(*args, **kwargs)
        seen["pos"], seen["fn"] = cs.masks(slice(0, 6))
        seen["m"] = cs.cand.shape[0]
        return cs

    model.assembler.assemble = spy
    loss, _ = model.contrastive_step(tiny_batch(6))
    assert torch.isfinite(loss)
    n = 6 * 3
    assert seen["m"] == 6 + n
    fn, pos = seen["fn"][:, -n:], seen["pos"][:, -n:]
    owner = torch.arange(6).repeat_interleave(3)
    assert not pos.any()
    assert torch.equal(fn, owner[None, :] != torch.arange(6)[:, None])


def test_positive_extrapolation_with_lambda_one_leaves_the_loss_unchanged():
    batch = tiny_batch(6)
    ref, _ = tiny_model().train().contrastive_step(batch)
    got, _ = tiny_model(feature_transform=[PositiveExtrapolation(lam=1.0)]).train().contrastive_step(batch)
    torch.testing.assert_close(got, ref)


def test_in_training_filter_removes_candidates_and_reports_counts():
    batch = tiny_batch(8)
    # untrained: many in-batch candidates outscore the positive, and margin 0 removes exactly those
    model = tiny_model(filters=[PositiveAwareFilter(mode="margin", margin=0.0)])
    loss_f, logs = model.contrastive_step(batch)
    assert "filtered/positive_aware" in logs and logs["filtered/positive_aware"] > 0
    q = model.encode_queries(batch["query_ids"], batch["query_mask"])
    d = model.encode_documents(batch["doc_ids"], batch["doc_mask"])
    s = q @ d.T
    above = (s > s.diag()[:, None]).sum().item()
    assert above > 0 and logs["filtered/positive_aware"].item() == above / 8
