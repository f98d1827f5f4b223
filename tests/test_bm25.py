"""BM25 baseline: code-aware tokens, lexical ranking, score matrices, baseline metrics."""
from __future__ import annotations

import pytest
import torch

from contrastive.baselines import BM25Retriever, bm25_baseline, code_tokens
from contrastive.metrics import retrieval_metrics

DOCS = [
    "def read_json_file(path):\n    with open(path) as f:\n        return json.load(f)",
    "def add(a, b):\n    return a + b",
    "class HttpClient:\n    def getResponse(self, url):\n        return requests.get(url)",
    "def sortItemsByKey(items, key):\n    return sorted(items, key=key)",
    "def write_csv(rows, path):\n    csv.writer(open(path, 'w')).writerows(rows)",
]
QUERIES = ["read a json file", "add two numbers", "http client get response", "sort items by key", "write rows to csv"]


def test_code_tokens_splits_identifiers() -> None:
    assert code_tokens("getHttpResponse") == ["gethttpresponse", "get", "http", "response"]
    assert code_tokens("read_json_file") == ["read_json_file", "read", "json", "file"]
    assert code_tokens("parseHTTPHeader(x)") == ["parsehttpheader", "parse", "http", "header", "x"]
    assert code_tokens("utf8 __init__ a+b") == ["utf8", "utf", "8", "init", "a", "b"]
    assert code_tokens("Sort the LIST!") == ["sort", "the", "list"]
    assert code_tokens("  ") == []


def test_lexical_match_ranked_first() -> None:
    retriever = BM25Retriever().fit(DOCS)
    scores, ids = retriever.search(QUERIES, k=3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert scores.shape == (5, 3) and scores.dtype == torch.float32 and ids.dtype == torch.long
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # camelCase split lets "response" match getResponse; the identifier itself matches exactly too
    s = retriever.score_matrix(["getResponse"])
    assert s.argmax().item() == 2


def test_score_matrix_and_ties() -> None:
    retriever = BM25Retriever().fit(DOCS)
    full = retriever.score_matrix(QUERIES)
    assert full.shape == (5, 5) and full.dtype == torch.float32
    sub = retriever.score_matrix(QUERIES, docs_subset_ids=[4, 0])
    assert torch.equal(sub, full[:, [4, 0]])
    assert torch.equal(retriever.score_matrix(["zzz unknown"]), torch.zeros(1, 5))  # no known token
    # a query matching nothing: all scores 0, ties broken by lower id
    _, ids = retriever.search(["qqq"], k=5)
    assert ids.tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="k=6"):
        retriever.search(QUERIES, k=6)
    with pytest.raises(RuntimeError, match="fit"):
        BM25Retriever().score_matrix(["x"])


def test_bm25_baseline_keys_and_values() -> None:
    out = bm25_baseline(QUERIES, DOCS, list(range(5)))
    expected = set(retrieval_metrics(torch.randn(5, 4), torch.randn(5, 4), torch.arange(5))) | {"csn_mrr"}
    assert set(out) == expected
    assert out["mrr"] == 1.0 and out["recall@1"] == 1.0 and out["csn_mrr"] == 1.0
    # unpaired positives: no csn_mrr; a query with no lexical overlap ties with every zero-score doc
    out = bm25_baseline(["read json", "qqq"], DOCS, [0, 3], chunk_size=1)
    assert "csn_mrr" not in out
    assert out["recall@1"] == 0.5 and out["mrr"] == pytest.approx((1 + 1 / 5) / 2)  # pessimistic tie rank 5
