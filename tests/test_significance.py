"""Paired significance tests against hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive.metrics.significance import (compare_to_baseline, mean_over_seeds, mean_std, paired_bootstrap_test, paired_randomization_test,
                                              reciprocal_ranks, significance_mark)


def test_randomization_exact_hand_computed():
    # d = a - b = (1, 2, 3): of the 8 sign patterns only (+,+,+) and (-,-,-) reach |mean| >= 2 -> p = 2/8
    r = paired_randomization_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert r.p_value == pytest.approx(0.25) and r.n_resamples == 8 and r.diff == pytest.approx(2.0)
    # d = (0.5, 0.5): means over the 4 patterns are 0.5, 0, 0, -0.5 -> p = 2/4
    assert paired_randomization_test([1.0, 1.0], [0.5, 0.5]).p_value == pytest.approx(0.5)
    # d = (1, -1): the observed mean is 0, every pattern is as extreme -> p = 1
    assert paired_randomization_test([1.0, 0.0], [0.0, 1.0]).p_value == pytest.approx(1.0)


def test_bootstrap_hand_computed():
    # d = (1, 2, 3), mean 2: a resampled mean lies in [1, 3], never 2 away from 2 -> p = 1 / (1 + R)
    r = paired_bootstrap_test([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], n_resamples=2000)
    assert r.p_value == pytest.approx(1 / 2001) and 1.0 <= r.ci_low <= r.ci_high <= 3.0
    # d = (0, 1), mean 0.5: resampled means 0, 0.5, 0.5, 1 with prob 1/4 each; |m - 0.5| >= 0.5 w.p. 1/2
    r = paired_bootstrap_test([0.0, 1.0], [0.0, 0.0], n_resamples=20000, seed=1)
    assert r.p_value == pytest.approx(0.5, abs=0.015)
    assert (r.ci_low, r.ci_high) == (0.0, 1.0)


def test_tests_separate_effect_from_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 400)
    noise = base + rng.normal(0, 0.05, 400)
    better = base + 0.05 + rng.normal(0, 0.05, 400)
    for test in (paired_randomization_test, paired_bootstrap_test):
        assert test(better, base).p_value < 0.001
        assert test(noise, base).p_value > 0.05
        assert test(base, base).p_value == 1.0
    assert significance_mark(paired_bootstrap_test(better, base)) == "+**"
    assert significance_mark(paired_bootstrap_test(base, better)) == "-**"
    assert significance_mark(paired_bootstrap_test(noise, base)) == ""


def test_helpers_and_bad_input():
    assert reciprocal_ranks(torch.tensor([1, 2, 4])).tolist() == [1.0, 0.5, 0.25]
    assert mean_over_seeds([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]]).tolist() == [0.5, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="1-based"):
        reciprocal_ranks([0, 1])
    with pytest.raises(ValueError, match="equal length"):
        mean_over_seeds([[1.0], [1.0, 2.0]])


def test_mean_std_and_compare_to_baseline():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([0.5]) == (0.5, 0.0)
    base = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]  # per-query seed means (0.5, 0.5, 0.5)
    out = compare_to_baseline({"base": base, "up": [[1.0, 1.5, 1.5], [2.0, 1.5, 1.5]]}, "base")
    # seed means (1.5, 1.5, 1.5) - (0.5, 0.5, 0.5) = (1, 1, 1): exact sign-flip p = 2/8
    assert set(out) == {"up"} and out["up"].diff == pytest.approx(1.0) and out["up"].p_value == pytest.approx(0.25)
    with pytest.raises(KeyError, match="baseline"):
        compare_to_baseline({"a": base}, "b")
