"""Hand-made cases for :func:`contrastive.samplers.mining.select_negatives` (methods.md §B7.6, §B7.10)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.samplers.mining import HardNegativeMiner, MinedNegatives, select_negatives

NEG_INF = float("-inf")

# One query, ten candidates with ids 100..109, already sorted by score 0.95, 0.90, ..., 0.50.
SCORES = torch.tensor([[0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50]])
IDS = torch.arange(100, 110).view(1, -1)


def ids_of(m: MinedNegatives) -> list[list[int]]:
    return m.ids.tolist()


def test_top_picks_highest_non_positives_in_any_input_order():
    perm = torch.tensor([[7, 2, 9, 0, 4, 1, 8, 3, 6, 5]])
    s, ids = SCORES.gather(1, perm), IDS.gather(1, perm)  # unsorted input
    m = select_negatives(s, ids, [[101]], num_negatives=3)
    assert ids_of(m) == [[100, 102, 103]]
    assert torch.allclose(m.scores, torch.tensor([[0.95, 0.85, 0.80]]))
    assert m.counts.tolist() == [3]
    assert m.stats["removed_positives"] == 1 and m.stats["queries_short"] == 0


def test_rank_window_applies_after_removing_positives():
    # positives 100 and 102 removed -> ranking 101,103,104,105,106,...; window [2,5) = ranks 2,3,4
    m = select_negatives(SCORES, IDS, [[100, 102]], num_negatives=3, range_min=2, range_max=5)
    assert ids_of(m) == [[104, 105, 106]]
    assert m.stats["removed_window"] == 8 - 3


def test_several_positives_never_mined_padded_tensor_and_list_agree():
    s = torch.cat([SCORES, SCORES])
    ids = torch.cat([IDS, IDS])
    pos_list = [[100, 101, 103], [105]]
    pos_tensor = torch.tensor([[100, 101, 103], [105, -1, -1]])
    a = select_negatives(s, ids, pos_list, num_negatives=4)
    b = select_negatives(s, ids, pos_tensor, num_negatives=4)
    assert ids_of(a) == ids_of(b) == [[102, 104, 105, 106], [100, 101, 102, 103]]
    for row, pos in zip(ids_of(a), pos_list):
        assert not set(row) & set(pos)


def test_dedup_by_id_keeps_best_scored_copy():
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    ids = torch.tensor([[7, 8, 7, 9]])
    m = select_negatives(s, ids, [[]], num_negatives=4)
    assert ids_of(m) == [[7, 8, 9, -1]]
    assert torch.allclose(m.scores[0, :3], torch.tensor([0.9, 0.8, 0.6]))
    assert m.stats["removed_duplicates"] == 1
    # a duplicated positive is removed in both copies
    m = select_negatives(s, ids, [[7]], num_negatives=2)
    assert ids_of(m) == [[8, 9]] and m.stats["removed_positives"] == 2


def test_random_sampling_inside_window_and_reproducible():
    s = SCORES.repeat(50, 1)
    ids = IDS.repeat(50, 1)
    kw = dict(num_negatives=3, range_min=2, range_max=7, sampling="random")
    a = select_negatives(s, ids, [[100]] * 50, generator=torch.Generator().manual_seed(0), **kw)
    b = select_negatives(s, ids, [[100]] * 50, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.ids, b.ids)
    window = {103, 104, 105, 106, 107}  # ranks 2..6 once 100 is removed
    assert set(a.ids.flatten().tolist()) <= window
    assert set(a.ids.flatten().tolist()) == window  # 50 draws cover the window
    assert all(len(set(r)) == 3 for r in a.ids.tolist())  # without replacement
    assert (a.scores[:, :-1] >= a.scores[:, 1:]).all()  # re-sorted by score
    c = select_negatives(s, ids, [[100]] * 50, generator=torch.Generator().manual_seed(1), **kw)
    assert not torch.equal(a.ids, c.ids)


def test_softmax_sampling_subset_of_window():
    s = SCORES.repeat(20, 1)
    m = select_negatives(s, IDS.repeat(20, 1), [[]] * 20, num_negatives=2, range_max=4, sampling="softmax",
                         temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert set(m.ids.flatten().tolist()) <= {100, 101, 102, 103}
    assert m.counts.tolist() == [2] * 20


def test_absolute_margin():
    # p = 0.80, margin 0.1 -> keep s <= 0.70
    m = select_negatives(SCORES, IDS, [[200]], [[0.80]], num_negatives=2, absolute_margin=0.1)
    assert ids_of(m) == [[105, 106]]
    assert m.stats["removed_absolute_margin"] == 5


def test_relative_margin_positive_score_and_min_over_positives():
    # positives scored 0.9 and 0.8 -> min 0.8; keep s <= 0.8 * (1 - 0.1) = 0.72
    m = select_negatives(SCORES, IDS, [[200, 201]], [[0.9, 0.8]], num_negatives=2, relative_margin=0.1)
    assert ids_of(m) == [[105, 106]]
    assert m.stats["removed_relative_margin"] == 5


def test_relative_margin_is_sign_safe_for_negative_positive_score():
    s = torch.tensor([[-0.40, -0.45, -0.50, -0.52, -0.60]])
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    # p = -0.5, margin 0.05: threshold -0.5 - 0.5*0.05 = -0.525 (< p). The unsafe p*(1-m) = -0.475 would keep -0.45.
    m = select_negatives(s, ids, [[9]], [[-0.5]], num_negatives=5, relative_margin=0.05)
    assert ids_of(m) == [[5, -1, -1, -1, -1]]
    assert (m.scores[m.mask] < -0.5).all()
    assert m.stats["removed_relative_margin"] == 4


def test_both_margins_apply_and_count_separately():
    # p = 0.8: absolute 0.05 -> s <= 0.75 ; relative 0.2 -> s <= 0.64
    m = select_negatives(SCORES, IDS, [[200]], [[0.8]], num_negatives=3, absolute_margin=0.05, relative_margin=0.2)
    assert ids_of(m) == [[107, 108, 109]]
    assert m.stats["removed_absolute_margin"] == 4 and m.stats["removed_relative_margin"] == 3


def test_max_and_min_score():
    m = select_negatives(SCORES, IDS, [[]], num_negatives=5, max_score=0.8, min_score=0.7)
    assert ids_of(m) == [[103, 104, 105, -1, -1]]
    assert m.stats["removed_max_score"] == 3 and m.stats["removed_min_score"] == 4


def test_window_before_vs_after_filters():
    # window [1, 3) on the positive-free ranking = 101, 102; max_score 0.88 drops 101 -> only 102
    m = select_negatives(SCORES, IDS, [[]], num_negatives=2, range_min=1, range_max=3, max_score=0.88)
    assert ids_of(m) == [[102, -1]]
    # sentence-transformers order: filter first (survivors 102, 103, ...), then skip 1 -> 103, 104
    m = select_negatives(SCORES, IDS, [[]], num_negatives=2, range_min=1, range_max=3, max_score=0.88,
                         window_after_filters=True)
    assert ids_of(m) == [[103, 104]]


def test_window_wider_than_candidates_is_fine():
    m = select_negatives(SCORES[:, :4], IDS[:, :4], [[]], num_negatives=2, range_min=1, range_max=1000)
    assert ids_of(m) == [[101, 102]]


def test_padding_is_never_mined():
    s = torch.tensor([[0.9, float("nan"), 0.7, NEG_INF, 0.5]])
    ids = torch.tensor([[1, 2, -1, 4, 5]])
    m = select_negatives(s, ids, [[]], num_negatives=3)
    assert ids_of(m) == [[1, 5, -1]]
    assert m.stats["padding"] == 3
    assert m.scores[0, 2] == NEG_INF


def test_short_window_non_strict_pads_and_counts():
    s = torch.cat([SCORES, SCORES])
    ids = torch.cat([IDS, IDS])
    m = select_negatives(s, ids, [[100], [100, 101, 102, 103, 104, 105, 106]], num_negatives=3, range_min=1)
    assert ids_of(m) == [[102, 103, 104], [108, 109, -1]]
    assert m.counts.tolist() == [3, 2]
    assert m.stats["queries_short"] == 1 and m.stats["queries_empty"] == 0
    assert m.stats["short_fraction"] == 0.5


def test_short_window_strict_raises_naming_settings_and_query():
    s = torch.cat([SCORES, SCORES])
    ids = torch.cat([IDS, IDS])
    with pytest.raises(ValueError) as e:
        select_negatives(s, ids, [[100], [100, 101, 102, 103, 104, 105, 106]], num_negatives=3, range_min=1,
                         strict=True)
    msg = str(e.value)
    for needle in ("range_min=1", "range_max=None", "num_negatives=3", "query index 1", "K=10"):
        assert needle in msg


def test_fewer_candidates_than_negatives_plus_positives():
    m = select_negatives(SCORES[:, :3], IDS[:, :3], [[100]], num_negatives=3)
    assert ids_of(m) == [[101, 102, -1]]
    with pytest.raises(ValueError, match="num_negatives=3"):
        select_negatives(SCORES[:, :3], IDS[:, :3], [[100]], num_negatives=3, strict=True)


def test_exclude_ids():
    m = select_negatives(SCORES, IDS, [[100]], num_negatives=2, exclude_ids=torch.tensor([101]))
    assert ids_of(m) == [[102, 103]] and m.stats["removed_excluded"] == 1


def test_chunking_gives_same_top_result():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(37, 20, generator=g)
    ids = torch.randint(0, 30, (37, 20), generator=g)
    pos = torch.randint(0, 30, (37, 2), generator=g)
    kw = dict(num_negatives=4, range_min=1, range_max=12, relative_margin=0.1)
    a = select_negatives(s, ids, pos, s[:, :2], chunk_size=5, **kw)
    b = select_negatives(s, ids, pos, s[:, :2], chunk_size=None, **kw)
    assert torch.equal(a.ids, b.ids) and a.stats == b.stats


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_negatives=0), "num_negatives"),
        (dict(num_negatives=2, range_min=-1), "range_min"),
        (dict(num_negatives=2, range_min=3, range_max=3), "range_max"),
        (dict(num_negatives=2, absolute_margin=-0.1), "absolute_margin"),
        (dict(num_negatives=2, relative_margin=-0.1), "relative_margin"),
        (dict(num_negatives=2, min_score=0.9, max_score=0.1), "min_score"),
        (dict(num_negatives=2, sampling="best"), "sampling"),
        (dict(num_negatives=2, sampling="softmax", temperature=0.0), "temperature"),
    ],
)
def test_invalid_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        select_negatives(SCORES, IDS, [[100]], [[0.5]], **kwargs)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        select_negatives(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), [], num_negatives=1)
    with pytest.raises(ValueError, match="candidate_ids"):
        select_negatives(SCORES, IDS[:, :3], [[100]], num_negatives=1)
    with pytest.raises(ValueError, match="positive_scores"):
        select_negatives(SCORES, IDS, [[100]], num_negatives=1, absolute_margin=0.1)
    with pytest.raises(ValueError, match="queries \\[0\\]"):
        select_negatives(SCORES, IDS, [[100]], [[float("nan")]], num_negatives=1, relative_margin=0.1)
    with pytest.raises(ValueError, match="one id list per query"):
        select_negatives(SCORES, IDS, [[100], [101]], num_negatives=1)


def test_miner_validates_at_construction_and_is_seeded():
    with pytest.raises(ValueError, match="range_max"):
        HardNegativeMiner(num_negatives=2, range_min=5, range_max=2)
    miner = HardNegativeMiner(num_negatives=2, sampling="random", seed=3)
    a = miner(SCORES.repeat(8, 1), IDS.repeat(8, 1), [[100]] * 8)
    b = HardNegativeMiner(num_negatives=2, sampling="random", seed=3)(SCORES.repeat(8, 1), IDS.repeat(8, 1), [[100]] * 8)
    assert torch.equal(a.ids, b.ids)


def _reference(scores, ids, pos, pos_scores, *, num_negatives, range_min, range_max, absolute_margin,
               relative_margin, max_score, after):
    """A slow per-query Python reading of the documented semantics, for the property test below."""
    out = []
    for q in range(scores.shape[0]):
        row = [(float(scores[q, j]), j, int(ids[q, j])) for j in range(scores.shape[1])
               if int(ids[q, j]) >= 0 and math.isfinite(float(scores[q, j]))]
        row.sort(key=lambda t: (-t[0], t[1]))
        seen, ranked = set(pos[q]), []
        for s, _, i in row:
            if i not in seen:
                seen.add(i)
                ranked.append((s, i))
        p = min(pos_scores[q]) if pos_scores[q] else None
        # thresholds in float32, as the tensors are
        def ok(s):
            f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
            pt = f32(p) if p is not None else None
            if absolute_margin is not None and not f32(s) <= pt - absolute_margin:
                return False
            if relative_margin is not None and not f32(s) <= pt - pt.abs() * relative_margin:
                return False
            return max_score is None or f32(s) <= max_score
        hi = len(ranked) if range_max is None else range_max
        if after:
            chosen = [x for x in ranked if ok(x[0])][range_min:hi]
        else:
            chosen = [x for x in ranked[range_min:hi] if ok(x[0])]
        out.append([i for _, i in chosen[:num_negatives]] + [-1] * max(0, num_negatives - len(chosen)))
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    q=st.integers(1, 4),
    k=st.integers(1, 9),
    num_negatives=st.integers(1, 5),
    range_min=st.integers(0, 4),
    width=st.one_of(st.none(), st.integers(1, 6)),
    absolute_margin=st.one_of(st.none(), st.sampled_from([0.0, 0.25])),
    relative_margin=st.one_of(st.none(), st.sampled_from([0.0, 0.1, 0.5])),
    max_score=st.one_of(st.none(), st.sampled_from([0.0, 0.5])),
    after=st.booleans(),
)
def test_top_matches_slow_reference(data, q, k, num_negatives, range_min, width, absolute_margin,
                                    relative_margin, max_score, after):
    grid = [-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, float("nan"), float("-inf")]  # ties and padding
    scores = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from(grid), min_size=k, max_size=k), min_size=q, max_size=q)))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, 6), min_size=k, max_size=k), min_size=q, max_size=q)))
    pos = data.draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3), min_size=q, max_size=q))
    pos_scores = [data.draw(st.lists(st.sampled_from(grid[:8]), min_size=len(p), max_size=len(p))) for p in pos]
    range_max = None if width is None else range_min + width
    kw = dict(num_negatives=num_negatives, range_min=range_min, range_max=range_max, absolute_margin=absolute_margin,
              relative_margin=relative_margin, max_score=max_score)
    m = select_negatives(scores, ids, pos, pos_scores, window_after_filters=after, **kw)
    assert m.ids.tolist() == _reference(scores, ids, pos, pos_scores, after=after, **kw)
    for row, p in zip(m.ids.tolist(), pos):
        assert not set(row) & set(p)
    assert (m.counts == m.mask.sum(1)).all()
    real = m.scores.masked_fill(~m.mask, float("-inf"))
    assert (real[:, :-1] >= real[:, 1:]).all()
