"""Hand-made cases for the false-negative filters (methods.md §B3, §B5, §B7.7, §B7.10)."""
from __future__ import annotations

import math

import pytest
import torch

from contrastive.filters import (
    FilterChain,
    FilterContext,
    GuideModelFilter,
    IQROutlierFilter,
    KnownDuplicatesFilter,
    NeighbourConsensusFilter,
    PositiveAwareFilter,
    SameLabelFilter,
    ThresholdFilter,
)
from contrastive.registry import FILTERS

T, F = True, False
NAN = float("nan")


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_all_filters_registered_and_buildable():
    assert {"known_duplicates", "same_label", "positive_aware", "guide_model", "neighbour_consensus",
            "iqr_outliers", "threshold"} <= set(FILTERS.names())
    assert isinstance(FILTERS.build("positive_aware", mode="margin", margin=0.1), PositiveAwareFilter)
    assert isinstance(FILTERS.build("threshold", max_score=0.7), ThresholdFilter)


# ---------------------------------------------------------------- known_duplicates / same_label

DUP_CTX = dict(
    scores=torch.zeros(3, 4),
    candidate_ids=torch.tensor([[0, 1, 2, 3], [4, 5, -1, 0], [3, 5, 0, 2]]),
    positive_ids=torch.tensor([[1], [6], [0]]),
    dup_group=torch.tensor([-1, 10, 10, -1, 20, -1, 20]),
)


def test_known_duplicates_by_id_and_group_negative_group_never_matches():
    m = KnownDuplicatesFilter()(FilterContext(**DUP_CTX))
    assert torch.equal(m, bools([[F, T, T, F], [T, F, F, F], [F, F, T, F]]))


def test_known_duplicates_never_flags_positive_columns_or_padding():
    pm = torch.zeros(3, 4, dtype=torch.bool)
    pm[0, 1] = True  # in-batch layout: column 1 *is* anchor 0's positive
    res = FilterChain([KnownDuplicatesFilter()]).apply(FilterContext(**DUP_CTX, positive_mask=pm))
    assert torch.equal(res.false_negative_mask, bools([[F, F, T, F], [T, F, F, F], [F, F, T, F]]))
    assert res.removed == {"known_duplicates": 3}
    assert res.num_candidates == 12 - 1 - 1  # one padding id, one positive column
    assert not res.keep[1, 2] and not res.keep[0, 1]


def test_known_duplicates_without_groups_and_with_anchor():
    ctx = FilterContext(scores=torch.zeros(1, 3), candidate_ids=torch.tensor([[7, 8, 9]]),
                        positive_ids=torch.tensor([[8]]), anchor_ids=torch.tensor([9]))
    assert torch.equal(KnownDuplicatesFilter()(ctx), bools([[F, T, F]]))
    assert torch.equal(KnownDuplicatesFilter(include_anchor=True)(ctx), bools([[F, T, T]]))


def test_same_label_anchor_labels_and_positive_labels():
    labels = torch.tensor([0, 0, 1, 1, -1])
    cands = torch.tensor([[0, 1, 2, 3], [0, 2, 4, -1], [0, 1, 2, 4]])
    ctx = FilterContext(scores=torch.zeros(3, 4), candidate_ids=cands, labels=labels,
                        anchor_labels=torch.tensor([0, 1, -1]))
    assert torch.equal(SameLabelFilter()(ctx), bools([[T, T, F, F], [F, T, F, F], [F, F, F, F]]))
    ctx = FilterContext(scores=torch.zeros(3, 4), candidate_ids=cands, labels=labels,
                        positive_ids=torch.tensor([[2], [0], [4]]))
    assert torch.equal(SameLabelFilter()(ctx), bools([[F, F, T, T], [T, F, F, F], [F, F, F, F]]))


# ---------------------------------------------------------------- positive_aware (NV-Retriever)

def test_positive_aware_perc_and_margin_positive_scores():
    ctx = FilterContext(scores=torch.tensor([[0.9, 0.77, 0.74, 0.2]]), positive_scores=torch.tensor([0.8]))
    # perc 0.95 -> threshold 0.76
    assert torch.equal(PositiveAwareFilter("perc", perc=0.95)(ctx), bools([[T, T, F, F]]))
    # margin 0.05 -> threshold 0.75
    assert torch.equal(PositiveAwareFilter("margin", margin=0.05)(ctx), bools([[T, T, F, F]]))
    assert torch.equal(PositiveAwareFilter("margin", margin=0.2)(ctx), bools([[T, T, T, F]]))


def test_positive_aware_sign_safe_on_negative_positive_score():
    scores = torch.tensor([[-0.1, -0.45, -0.5, -0.53, -0.6]])
    ctx = FilterContext(scores=scores, positive_scores=torch.tensor([[-0.5]]))
    # perc 0.95: threshold -0.5 - 0.5*0.05 = -0.525 (naive 0.95*p = -0.475 would keep -0.5 and -0.45)
    assert torch.equal(PositiveAwareFilter("perc", perc=0.95)(ctx), bools([[T, T, T, F, F]]))
    # margin 0.05: threshold -0.55
    assert torch.equal(PositiveAwareFilter("margin", margin=0.05)(ctx), bools([[T, T, T, T, F]]))
    # perc = 1 == margin = 0: anything >= p is removed even when p < 0
    a = PositiveAwareFilter("perc", perc=1.0)(ctx)
    b = PositiveAwareFilter("margin", margin=0.0)(ctx)
    assert torch.equal(a, b) and torch.equal(a, bools([[T, T, F, F, F]]))


def test_positive_aware_min_over_positives_with_padding():
    ctx = FilterContext(scores=torch.tensor([[0.7, 0.5, 0.3]]), positive_scores=torch.tensor([[0.9, 0.6, NAN]]))
    assert torch.equal(PositiveAwareFilter("margin", margin=0.0)(ctx), bools([[T, F, F]]))


def test_positive_aware_use_guide_and_errors():
    ctx = FilterContext(scores=torch.tensor([[0.9, 0.1]]), positive_scores=torch.tensor([0.5]),
                        guide_scores=torch.tensor([[0.1, 0.9]]), guide_positive_scores=torch.tensor([0.5]))
    assert torch.equal(PositiveAwareFilter("margin", margin=0.0, use_guide=True)(ctx), bools([[F, T]]))
    with pytest.raises(ValueError, match="positive_scores"):
        PositiveAwareFilter()(FilterContext(scores=torch.zeros(1, 2)))
    with pytest.raises(ValueError, match="anchors \\[0\\]"):
        PositiveAwareFilter()(FilterContext(scores=torch.zeros(1, 2), positive_scores=torch.tensor([NAN])))
    with pytest.raises(ValueError, match="perc"):
        PositiveAwareFilter(perc=0.0)
    with pytest.raises(ValueError, match="margin"):
        PositiveAwareFilter(mode="margin", margin=-0.1)
    with pytest.raises(ValueError, match="mode"):
        PositiveAwareFilter(mode="pct")


# ---------------------------------------------------------------- guide_model (GISTEmbed)

def test_guide_model_absolute_and_relative():
    ctx = FilterContext(scores=torch.zeros(1, 4), guide_scores=torch.tensor([[0.9, 0.5, 0.7, 0.3]]),
                        guide_positive_scores=torch.tensor([0.7]))
    assert torch.equal(GuideModelFilter()(ctx), bools([[T, F, F, F]]))  # tie 0.7 kept
    assert torch.equal(GuideModelFilter(margin=0.1)(ctx), bools([[T, F, T, F]]))
    neg = FilterContext(scores=torch.zeros(1, 4), guide_scores=torch.tensor([[-0.3, -0.5, -0.7, -0.65]]),
                        guide_positive_scores=torch.tensor([-0.4]))
    # relative 0.5, g = -0.4 -> threshold -0.4 - 0.2 = -0.6 (naive g*(1-m) = -0.2 would keep -0.3)
    assert torch.equal(GuideModelFilter("relative", margin=0.5)(neg), bools([[T, T, F, F]]))


def test_guide_model_in_batch_positive_column_never_flagged():
    g = torch.tensor([[0.8, 0.9, 0.1], [0.2, 0.6, 0.7], [0.3, 0.3, 0.5]])
    ctx = FilterContext(scores=torch.zeros(3, 3), guide_scores=g, guide_positive_scores=g.diagonal(),
                        positive_mask=torch.eye(3, dtype=torch.bool))
    res = FilterChain([GuideModelFilter()]).apply(ctx)
    assert torch.equal(res.false_negative_mask, bools([[F, T, F], [F, F, T], [F, F, F]]))
    assert res.removed == {"guide_model": 2} and res.num_candidates == 6
    with pytest.raises(ValueError, match="guide_scores"):
        GuideModelFilter()(FilterContext(scores=torch.zeros(1, 2)))


# ---------------------------------------------------------------- threshold

def test_threshold():
    ctx = FilterContext(scores=torch.tensor([[0.9, 0.7, 0.71, float("-inf")]]))
    assert torch.equal(ThresholdFilter(0.7)(ctx), bools([[T, F, T, F]]))


# ---------------------------------------------------------------- iqr_outliers (UNPG)

IQR_SCORES = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.95], [0.15, 0.25, 0.35, -0.9, NAN]])


def test_iqr_batch_scope_both_tails():
    # pooled S (9 values) sorted: -0.9 .1 .15 .2 .25 .3 .35 .4 .95; Q1 = S[2] = .15, Q3 = S[6] = .35
    # IQR .2, k 1.5 -> keep [-0.15, 0.65]
    m = IQROutlierFilter()(FilterContext(scores=IQR_SCORES))
    assert torch.equal(m, bools([[F, F, F, F, T], [F, F, F, T, F]]))
    up = IQROutlierFilter(tails="upper")(FilterContext(scores=IQR_SCORES))
    assert torch.equal(up, bools([[F, F, F, F, T], [F, F, F, F, F]]))
    assert not IQROutlierFilter(whisker=10.0)(FilterContext(scores=IQR_SCORES)).any()


def test_iqr_excludes_positives_from_statistics():
    # with candidate 4 of row 0 a positive (by id), S has 8 values: -0.9 .1 .15 .2 .25 .3 .35 .4
    # Q1 = S[2] = .15, Q3 = S[6] = .35 -> keep [-0.15, 0.65]: only -0.9 is flagged, the positive never
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, -1]])
    ctx = FilterContext(scores=IQR_SCORES, candidate_ids=ids, positive_ids=torch.tensor([[4], [9]]))
    assert torch.equal(IQROutlierFilter()(ctx), bools([[F, F, F, F, F], [F, F, F, T, F]]))


def test_iqr_anchor_scope():
    s = IQR_SCORES.clone()
    s[0, 0] = -0.12
    # per row: row 0 sorted -.12 .2 .3 .4 .95 -> Q1 = .2, Q3 = .4 -> keep [-0.1, 0.7] (-0.12 and .95 out);
    # row 1 sorted -.9 .15 .25 .35 -> Q1 = .15, Q3 = .35 -> keep [-0.15, 0.65] (-0.9 out)
    m = IQROutlierFilter(scope="anchor")(FilterContext(scores=s))
    assert torch.equal(m, bools([[T, F, F, F, T], [F, F, F, T, F]]))
    m = IQROutlierFilter(scope="batch")(FilterContext(scores=s))  # pooled: Q1 .15, Q3 .35 -> -0.12 kept
    assert torch.equal(m, bools([[F, F, F, F, T], [F, F, F, T, F]]))


def test_iqr_settings():
    with pytest.raises(ValueError, match="whisker"):
        IQROutlierFilter(whisker=-1.0)
    with pytest.raises(ValueError, match="square"):
        IQROutlierFilter(symmetric=True)(FilterContext(scores=IQR_SCORES))
    assert not IQROutlierFilter()(FilterContext(scores=torch.full((2, 2), NAN))).any()  # empty S


# ---------------------------------------------------------------- neighbour_consensus (TACRED IS)

def two_clusters() -> torch.Tensor:
    return torch.tensor([
        [1.0, 0.0], [0.99, 0.1], [0.98, -0.15],   # cluster A: items 0, 1, 2
        [0.0, 1.0], [0.1, 0.99], [-0.12, 0.99],   # cluster B: items 3, 4, 5
        [1.0, 0.0],                               # item 6: exact copy of item 0
    ])


def nc_ctx(pos_score: float) -> FilterContext:
    return FilterContext(
        scores=torch.tensor([[0.4, 0.3, 0.6, 0.2, 0.1], [0.5, 0.4, 0.3, 0.2, NAN]]),
        candidate_ids=torch.tensor([[1, 2, 3, 4, 5], [0, 1, 4, 5, -1]]),
        positive_ids=torch.tensor([[0], [3]]),
        positive_scores=torch.tensor([[pos_score], [0.1]]),
        corpus_embeddings=two_clusters()[:6],
    )


def test_neighbour_consensus_flags_positive_neighbours_of_missed_positives():
    m = NeighbourConsensusFilter(k=2)(nc_ctx(pos_score=0.5))  # both positives are outscored ("missed")
    assert torch.equal(m, bools([[T, T, F, F, F], [F, F, T, T, F]]))
    # anchor 0's positive now beats every candidate: only anchor 1 is an IS anchor
    m = NeighbourConsensusFilter(k=2)(nc_ctx(pos_score=0.9))
    assert torch.equal(m, bools([[F, F, F, F, F], [F, F, T, T, F]]))
    m = NeighbourConsensusFilter(k=2, anchors="all")(nc_ctx(pos_score=0.9))
    assert torch.equal(m, bools([[T, T, F, F, F], [F, F, T, T, F]]))


def test_neighbour_consensus_monotone_in_k():
    prev = torch.zeros(2, 5, dtype=torch.bool)
    for k in range(1, 7):
        m = NeighbourConsensusFilter(k=k, anchors="all")(nc_ctx(0.5))
        assert (m | prev).equal(m)
        prev = m
    assert prev.sum() == 9  # every real candidate once k covers the corpus


def test_neighbour_consensus_planted_duplicate_and_no_positive_flagged():
    ctx = FilterContext(
        scores=torch.tensor([[0.1, 0.2, 0.3, 0.0]]),
        candidate_ids=torch.tensor([[1, 6, 3, 0]]),  # 0 is the positive itself, listed as a candidate
        positive_ids=torch.tensor([[0]]),
        positive_scores=torch.tensor([[0.05]]),
        corpus_embeddings=two_clusters(),
    )
    assert torch.equal(NeighbourConsensusFilter(k=1)(ctx), bools([[F, T, F, F]]))


def test_neighbour_consensus_label_vote():
    labels = torch.tensor([0, 0, 1, 1, 1, 1])  # item 2 sits in cluster A but is labelled 1 (noisy)
    ctx = FilterContext(
        scores=torch.zeros(1, 4),
        candidate_ids=torch.tensor([[1, 2, 3, 4]]),
        positive_ids=torch.tensor([[0]]),
        labels=labels,
        corpus_embeddings=two_clusters()[:6],
    )
    # kNN(2) of item 2 = {0, 1}: labels 0, 0 -> majority 0 = positive's label -> flagged.
    # item 1: {0, 2} -> labels 0, 1, no strict majority; items 3, 4 -> majority 1.
    m = NeighbourConsensusFilter(k=2, rule="label_vote", anchors="all")(ctx)
    assert torch.equal(m, bools([[F, T, F, F]]))
    with pytest.raises(ValueError, match="labels"):
        NeighbourConsensusFilter(rule="label_vote", anchors="all")(
            FilterContext(scores=torch.zeros(1, 1), positive_ids=torch.tensor([[0]]), corpus_embeddings=two_clusters()))


def test_neighbour_consensus_chunking_and_errors():
    a = NeighbourConsensusFilter(k=2, anchors="all", chunk_size=1)(nc_ctx(0.5))
    b = NeighbourConsensusFilter(k=2, anchors="all", chunk_size=100)(nc_ctx(0.5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="corpus_embeddings"):
        NeighbourConsensusFilter()(FilterContext(scores=torch.zeros(1, 1)))
    with pytest.raises(ValueError, match="k must"):
        NeighbourConsensusFilter(k=0)
    ctx = nc_ctx(0.5)
    ctx.positive_scores = None
    with pytest.raises(ValueError, match="anchors='missed'"):
        NeighbourConsensusFilter()(ctx)


# ---------------------------------------------------------------- chain

def test_chain_counts_union_and_padding():
    ctx = FilterContext(
        scores=torch.tensor([[0.95, 0.85, 0.6, 0.3, NAN], [0.2, 0.75, 0.5, 0.1, 0.99]]),
        candidate_ids=torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, -1]]),
        positive_ids=torch.tensor([[11], [22]]),
        positive_scores=torch.tensor([[0.8], [0.6]]),
    )
    chain = FilterChain([
        FILTERS.build("known_duplicates"),
        FILTERS.build("positive_aware", mode="margin", margin=0.0),
        FILTERS.build("threshold", max_score=0.9),
        FILTERS.build("threshold", max_score=0.7),
    ])
    res = chain.apply(ctx)
    # known_duplicates: (0,1) (1,2); positive_aware (> p): (0,0) (0,1) (1,1); thr .9: (0,0); thr .7: (0,0) (0,1) (1,1)
    assert res.removed == {"known_duplicates": 2, "positive_aware": 3, "threshold": 1, "threshold#2": 3}
    assert torch.equal(res.false_negative_mask, bools([[T, T, F, F, F], [F, T, T, F, F]]))
    assert res.total_removed == 4
    assert res.num_candidates == 8  # NaN score and -1 id are padding
    assert torch.equal(res.keep, bools([[F, F, T, T, F], [T, F, F, T, F]]))
    assert math.isclose(res.removed_fraction, 0.5)
    empty = FilterChain([]).apply(ctx)
    assert empty.total_removed == 0 and empty.keep.sum() == 8


def test_context_validation():
    with pytest.raises(ValueError, match="candidate_ids"):
        FilterContext(scores=torch.zeros(2, 3), candidate_ids=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        FilterContext(scores=torch.zeros(0, 3))
    with pytest.raises(TypeError, match="NegativeFilter"):
        FilterChain(["threshold"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="known_duplicates"):
        KnownDuplicatesFilter()(FilterContext(scores=torch.zeros(1, 2)))


def test_filters_do_not_track_gradient():
    s = torch.tensor([[0.9, 0.1]], requires_grad=True)
    m = PositiveAwareFilter()(FilterContext(scores=s, positive_scores=torch.tensor([0.5])))
    assert not m.requires_grad and m.dtype == torch.bool
