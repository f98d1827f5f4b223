"""Paired significance tests between two retrieval systems scored on the same queries.

Both tests take per-query scores of systems A and B (e.g. reciprocal ranks ``1 / rank``, from
:func:`contrastive.metrics.retrieval.gold_ranks`) on the same queries in the same order, and test whether
the mean of ``d = a - b`` differs from zero; the query is the unit of resampling (Smucker, Allan and
Carterette 2007, "A comparison of statistical significance tests for information retrieval evaluation",
CIKM; Berg-Kirkpatrick et al. 2012, "An empirical investigation of statistical significance in NLP").

- :func:`paired_randomization_test`: under the null the labels A/B of each query are exchangeable, so
  each ``d_i`` keeps or flips its sign with probability 1/2 (scipy's ``permutation_test`` with
  ``permutation_type="samples"``; exact enumeration of the ``2^n`` sign patterns when ``n`` is small).
- :func:`paired_bootstrap_test`: queries are resampled with replacement; the two-sided p-value is the
  share of resampled mean differences at least ``|mean(d)|`` away from ``mean(d)`` (the bootstrap
  distribution shifted to the null), with a percentile confidence interval of the difference.

Several seeds per system: average each query's score over the seeds first
(:func:`mean_over_seeds`), then test over queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PairedTestResult", "compare_to_baseline", "mean_over_seeds", "mean_std", "paired_bootstrap_test", "paired_randomization_test",
           "reciprocal_ranks", "significance_mark"]


@dataclass(frozen=True)
class PairedTestResult:
    """Outcome of a paired test of ``mean(a) - mean(b)``.

    Attributes:
        mean_a / mean_b: mean score of each system. diff: ``mean_a - mean_b``.
        p_value: two-sided p-value of "no difference".
        ci_low / ci_high: confidence interval of ``diff`` (bootstrap only; ``nan`` otherwise).
        n: number of paired queries. n_resamples: resamples used (``2^n`` when exact).
        method: ``"randomization"`` or ``"bootstrap"``.
    """

    mean_a: float
    mean_b: float
    diff: float
    p_value: float
    ci_low: float
    ci_high: float
    n: int
    n_resamples: int
    method: str


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired test: a and b must score the same queries; got {x.size} and {y.size} scores")
    if x.size < 2:
        raise ValueError(f"paired test: needs at least 2 paired queries; got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired test: scores must be finite")
    return x, y


def reciprocal_ranks(ranks: ArrayLike) -> np.ndarray:
    """``1 / rank`` per query from 1-based ranks ``(Q,)`` (a tensor or array); float64 ``(Q,)``."""
    r = np.asarray(ranks.detach().cpu() if hasattr(ranks, "detach") else ranks, dtype=np.float64).ravel()
    if (r < 1).any():
        raise ValueError("reciprocal_ranks: ranks are 1-based; got a rank < 1")
    return 1.0 / r


def mean_over_seeds(scores: Sequence[ArrayLike]) -> np.ndarray:
    """Per-query mean over seeds: ``scores`` is one ``(Q,)`` array per seed (same queries, same order)."""
    arr = [np.asarray(s, dtype=np.float64).ravel() for s in scores]
    if not arr or any(a.shape != arr[0].shape for a in arr):
        raise ValueError(f"mean_over_seeds: needs one or more score arrays of equal length; got {[a.size for a in arr]}")
    return np.mean(np.stack(arr), axis=0)


def paired_randomization_test(a: ArrayLike, b: ArrayLike, n_resamples: int = 10000, seed: int = 0) -> PairedTestResult:
    """Two-sided paired randomization (sign-flip) test of ``mean(a - b) = 0``.

    Args:
        a, b: ``(n,)`` per-query scores of the two systems on the same queries.
        n_resamples: random sign patterns; when ``2^n <= n_resamples`` every pattern is enumerated (exact).
        seed: random seed of the sign patterns.

    The p-value is ``P(|mean(s * d)| >= |mean(d)|)`` over sign vectors ``s`` (scipy's
    ``permutation_test``, which counts the observed pattern among the random ones).
    """
    from scipy.stats import permutation_test

    x, y = _paired(a, b)
    res = permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), permutation_type="samples",
                           vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                           random_state=np.random.default_rng(seed))
    exact = 2 ** x.size <= n_resamples
    return PairedTestResult(float(x.mean()), float(y.mean()), float(x.mean() - y.mean()), float(min(1.0, res.pvalue)),
                            float("nan"), float("nan"), int(x.size), 2 ** x.size if exact else n_resamples,
                            "randomization")


def paired_bootstrap_test(a: ArrayLike, b: ArrayLike, n_resamples: int = 10000, seed: int = 0,
                          confidence: float = 0.95) -> PairedTestResult:
    """Two-sided paired bootstrap test of ``mean(a - b) = 0`` over queries.

    Args:
        a, b: ``(n,)`` per-query scores of the two systems on the same queries.
        n_resamples: bootstrap resamples of the ``n`` queries (with replacement).
        seed: random seed.
        confidence: level of the percentile interval ``[ci_low, ci_high]`` of the difference.

    With ``d = a - b`` and resampled means ``m*_r``, ``p = (1 + #{r: |m*_r - mean(d)| >= |mean(d)|}) /
    (1 + n_resamples)``.
    """
    x, y = _paired(a, b)
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, 2_000_000 // d.size)  # bound the (rows, n) index block
    for s in range(0, n_resamples, step):
        k = min(step, n_resamples - s)
        means[s:s + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    obs = float(d.mean())
    extreme = np.count_nonzero(np.abs(means - obs) >= abs(obs) - 1e-12 * max(1.0, abs(obs)))
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return PairedTestResult(float(x.mean()), float(y.mean()), obs, float((1 + extreme) / (1 + n_resamples)),
                            float(lo), float(hi), int(d.size), int(n_resamples), "bootstrap")


def significance_mark(result: PairedTestResult, levels: Sequence[float] = (0.05, 0.01)) -> str:
    """``""`` if ``p >= levels[0]``, else one ``*`` per level passed (``*`` p < 0.05, ``**`` p < 0.01),
    preceded by ``+`` or ``-`` for the sign of the difference."""
    stars = sum(result.p_value < lv for lv in levels)
    return "" if not stars else ("+" if result.diff > 0 else "-") + "*" * stars


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; ``0`` for a single value) of per-seed results."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_std: no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def compare_to_baseline(per_query: Mapping[str, Sequence[ArrayLike]], baseline: str,
                        test: Callable[..., PairedTestResult] = paired_randomization_test,
                        **test_kwargs: float) -> dict[str, PairedTestResult]:
    """Test every system against ``baseline`` on the same queries.

    Args:
        per_query: system -> one ``(Q,)`` per-query score array per seed (same queries, same order).
        baseline: the reference system's key.
        test: :func:`paired_randomization_test` or :func:`paired_bootstrap_test`.
        test_kwargs: passed to ``test`` (``n_resamples``, ``seed``).

    Returns:
        system -> result of ``test(mean_over_seeds(system), mean_over_seeds(baseline))`` for every system
        other than the baseline.
    """
    if baseline not in per_query:
        raise KeyError(f"compare_to_baseline: baseline {baseline!r} is not among {sorted(per_query)}")
    ref = mean_over_seeds(per_query[baseline])
    return {name: test(mean_over_seeds(scores), ref, **test_kwargs)
            for name, scores in per_query.items() if name != baseline}
