"""Code-search data: extraction, bad input, leak-free deterministic splits, duplicates, cache, CSN jsonl,
and the datamodule's batches. Everything runs on tiny hand-written roots except one stdlib-subset test."""
from __future__ import annotations

import gzip
import json
import os
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest
import torch

from contrastive.registry import DATAMODULES
from datamodules.codesearch import corpus as corpus_mod
from datamodules.codesearch import extract as extract_mod
from datamodules.codesearch.corpus import CorpusError, assign_splits, build_local_corpus
from datamodules.codesearch.datamodule import CodeSearchDataModule
from datamodules.codesearch.extract import strip_docstring, summarize_docstring
from datamodules.codesearch.jsonl import build_jsonl_corpus

WORDS = ["parse", "load", "render", "merge", "split", "encode", "decode", "fetch", "store", "scan", "sort", "hash"]
NOUNS = ["config", "token", "table", "image", "record", "header", "socket", "graph", "buffer", "matrix"]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def _function(verb: str, noun: str, k: int) -> str:
    return (f"def {verb}_{noun}_{k}(value, extra=None):\n"
            f'    """{verb.capitalize()} the {noun} number {k} from the given value.\n\n'
            f"    Args:\n        value: the input.\n    \"\"\"\n"
            f"    result = [value] * {k + 1}\n"
            f"    if extra is not None:\n        result.append(extra + '{noun}')\n"
            f"    return '{verb}', result\n\n\n")


def _make_tree(root: Path, n_modules: int = 12, per_module: int = 6) -> Path:
    """``n_modules`` top-level packages/modules with ``per_module`` distinct documented functions each."""
    for m in range(n_modules):
        body = "".join(_function(WORDS[(m + j) % len(WORDS)], NOUNS[(m * 3 + j) % len(NOUNS)], m * 100 + j)
                       for j in range(per_module))
        if m % 2:
            _write(root / f"pkg{m}" / "__init__.py", "")
            _write(root / f"pkg{m}" / "core.py", body)
        else:
            _write(root / f"mod{m}.py", body)
    return root


SAMPLE = '''\
import os


def documented(a, b):
    """Add two numbers and return the sum.

    Longer description that is not part of the summary.

    Args:
        a: first.
    """
    c = a + b
    # a comment
    return c


def undocumented(a):
    x = a * 2
    y = x + 1
    return y


def short_doc(a):
    """Too short."""
    x = a
    y = x
    return y


class Shape:
    """A shape."""

    def area(self, scale=1):
        """Compute the area of the shape
        scaled by a factor.
        """
        w = self.w * scale
        h = self.h * scale
        return w * h

    async def fetch(self):
        """Fetch the remote shape description asynchronously."""
        data = await self.client.get()
        self.data = data
        return data

    def abstract(self):
        """An abstract method without a body."""
        raise NotImplementedError


def outer(n):
    """Return a closure that adds n to its argument."""
    def inner(x):
        """Add the captured n to x please."""
        y = x + n
        z = y
        return z
    return inner
'''


# ------------------------------------------------------------------------------------ extraction

def test_summarize_docstring():
    assert summarize_docstring("Add two   numbers.\n\nMore.") == "Add two numbers."
    assert summarize_docstring("Compute the area\nof the shape.\nArgs:\n  x: y") == "Compute the area of the shape."
    assert summarize_docstring("Parse it.\n:param x: the x\n") == "Parse it."
    assert summarize_docstring("Parse it\nParameters\n----------\nx : int") == "Parse it"
    assert summarize_docstring(":param x: only fields") == ""
    assert summarize_docstring("") == ""


def test_strip_docstring_same_line():
    import ast
    text = 'def f(x): "Doc string here."; return x\n'
    node = ast.parse(text).body[0]
    assert strip_docstring(text.split("\n"), node) == "def f(x): return x"


def test_extraction_from_hand_written_files(tmp_path):
    _write(tmp_path / "src" / "sample.py", SAMPLE)
    c = build_local_corpus(tmp_path / "src", cache_dir=tmp_path / "cache", split_fractions=(1, 0, 0), use_cache=False)
    by_name = {r.func_name: r for r in c.records()}
    assert set(by_name) == {"documented", "Shape.area", "Shape.fetch", "outer", "outer.<locals>.inner"}
    d = by_name["documented"]
    assert d.query == "Add two numbers and return the sum."
    assert d.document == "def documented(a, b):\n    c = a + b\n    # a comment\n    return c"
    assert d.source == "sample.py:4" and d.group == "sample" and d.split == "train"
    assert by_name["Shape.area"].query == "Compute the area of the shape scaled by a factor."
    assert '"""' not in by_name["Shape.area"].document and by_name["Shape.area"].document.startswith("def area(self")
    assert by_name["Shape.fetch"].document.startswith("async def fetch(self):\n    data = await")
    # only the function's own docstring is removed; the nested one stays in the outer code
    assert "Add the captured n" in by_name["outer"].document
    assert "Add the captured n" not in by_name["outer.<locals>.inner"].document
    skipped = c.stats["skipped"]
    assert skipped["no_docstring"] == 1 and skipped["short_query"] == 1 and skipped["trivial_body"] == 1
    assert c.report.total == 0


def test_bad_files_are_reported_not_fatal(tmp_path, caplog):
    src = tmp_path / "src"
    _write(src / "good.py", SAMPLE)
    _write(src / "broken.py", "def ok():\n    return 1\n\ndef broken(:\n    pass\n")
    _write(src / "latin.py", b"def f():\n    '''Return a \xff\xfe weird string.'''\n    return 1\n")
    _write(src / "cookie.py", b"# -*- coding: latin-1 -*-\ndef g(x):\n    '''Return the caf\xe9 menu today.'''\n"
                              b"    y = x\n    return y\n")
    with caplog.at_level("WARNING", logger="datamodules.codesearch"):
        c = build_local_corpus(src, cache_dir=tmp_path / "cache", split_fractions=(1, 0, 0), use_cache=False)
    assert c.report.counts == {"syntax_error": 1, "decode_error": 1}
    where = {e["reason"]: e["where"] for e in c.report.examples}
    assert where["syntax_error"] == f"{src / 'broken.py'}:4"
    assert where["decode_error"] == f"{src / 'latin.py'}:2"
    assert "broken.py:4" in caplog.text and "latin.py:2" in caplog.text
    assert any(r.query == "Return the café menu today." for r in c.records())  # PEP 263 cookie honoured
    assert c.describe()["bad_input"] == {"syntax_error": 1, "decode_error": 1}


# ---------------------------------------------------------------------------------------- splits

def test_split_has_no_leakage_and_is_deterministic(tmp_path):
    root = _make_tree(tmp_path / "src")
    a = build_local_corpus(root, cache_dir=tmp_path / "c1", use_cache=False)
    b = build_local_corpus(root, cache_dir=tmp_path / "c2", use_cache=False)
    assert [(r.id, r.split, r.source, r.dup_group) for r in a.records()] == \
           [(r.id, r.split, r.source, r.dup_group) for r in b.records()]
    sizes = a.split_sizes()
    assert all(sizes[s] > 0 for s in ("train", "valid", "test")) and sum(sizes.values()) == len(a) == 72
    file_splits: dict[str, set] = {}
    group_splits: dict[str, set] = {}
    for r in a.records():
        file_splits.setdefault(r.source.rsplit(":", 1)[0], set()).add(r.split)
        group_splits.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in file_splits.values())
    assert all(len(s) == 1 for s in group_splits.values()) and len(group_splits) == 12
    assert [r.id for r in a.records()] == list(range(len(a)))


def test_split_fallback_with_few_groups():
    # three groups: a pure hash split would very likely leave a split empty; the fallback fills all three
    out, method = assign_splits({"a": 50, "b": 5, "c": 5}, (0.8, 0.1, 0.1))
    assert set(out.values()) == {"train", "valid", "test"}
    assert assign_splits({"a": 50, "b": 5, "c": 5}, (0.8, 0.1, 0.1)) == (out, method)
    with pytest.raises(CorpusError, match="only 2 split group"):
        assign_splits({"a": 5, "b": 5}, (0.8, 0.1, 0.1))
    out, _ = assign_splits({"a": 5}, (1.0, 0.0, 0.0))
    assert out == {"a": "train"}
    many = {f"g{i}": 10 for i in range(200)}
    out, method = assign_splits(many, (0.8, 0.1, 0.1), "hash")
    assert method == "hash" and 0.6 < sum(v == "train" for v in out.values()) / 200 < 0.95


# ------------------------------------------------------------------------------------ duplicates

def test_duplicates_share_a_group(tmp_path):
    root = _make_tree(tmp_path / "src", n_modules=6, per_module=3)
    # same code as mod0's first function, different layout/comments/name, in another file
    _write(root / "copy_a.py", '''\
        def renamed(value,   extra=None):
            """A completely different description of this."""
            result = [value] * 1   # comment
            if extra is not None:
                result.append(extra + 'config')
            return 'parse', result
        ''')
    # same docstring summary as copy_b's other function, different code
    _write(root / "copy_b.py", '''\
        def one(x):
            """Return the answer to everything."""
            y = x + 1
            return y


        def two(x):
            """Return the answer   to everything"""
            y = x * 2
            z = y - 1
            return z
        ''')
    c = build_local_corpus(root, cache_dir=tmp_path / "cache", split_fractions=(1, 0, 0), use_cache=False)
    by = {r.func_name: r for r in c.records()}
    orig = by["parse_config_0"]
    assert by["renamed"].dup_group == orig.dup_group == min(orig.id, by["renamed"].id)
    assert c.duplicates_of(orig.id) == [by["renamed"].id]
    assert by["one"].dup_group == by["two"].dup_group
    assert c.duplicates_of(by["two"].id) == [by["one"].id]
    singles = [r for r in c.records() if r.func_name not in ("parse_config_0", "renamed", "one", "two")]
    assert all(r.dup_group == r.id and c.duplicates_of(r.id) == [] for r in singles)
    d = c.describe()
    assert d["dup_groups"] == 2 and d["dup_records"] == 4


def test_caps_and_nested_roots(tmp_path):
    root = _make_tree(tmp_path / "src", n_modules=12, per_module=6)
    c = build_local_corpus(root, cache_dir=tmp_path / "cache", max_files=9, max_pairs=30, max_group_pairs=4,
                           use_cache=False)
    again = build_local_corpus(root, cache_dir=tmp_path / "cache", max_files=9, max_pairs=30, max_group_pairs=4,
                               use_cache=False)
    assert c.stats["files_scanned"] == 9 and len(c) <= 30
    assert [r.source for r in c.records()] == [r.source for r in again.records()]
    groups = [r.group for r in c.records()]
    assert max(groups.count(g) for g in set(groups)) <= 4
    # a root nested in another (site-packages inside the stdlib dir) is listed once
    outer = tmp_path / "lib"
    _write(outer / "os_like.py", _function("walk", "tree", 1))
    _write(outer / "site-packages" / "third.py", _function("load", "table", 2))
    files = corpus_mod.list_source_files([str(outer), str(outer / "site-packages")])
    assert [(i, rel) for i, _, rel in files] == [(0, "os_like.py"), (1, "third.py")]


# ----------------------------------------------------------------------------------------- cache

def test_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    root = _make_tree(tmp_path / "src", n_modules=6, per_module=3)
    cache = tmp_path / "cache"
    first = build_local_corpus(root, cache_dir=cache)
    files = list(cache.glob("local-*.jsonl.gz"))
    assert len(files) == 1 and first.meta["cache_path"] == str(files[0])

    def boom(*a, **k):
        raise AssertionError("extractor must not run on a cache hit")

    monkeypatch.setattr(extract_mod, "extract_file", boom)
    second = build_local_corpus(root, cache_dir=cache)
    assert [(r.query, r.document, r.split, r.dup_group) for r in second.records()] == \
           [(r.query, r.document, r.split, r.dup_group) for r in first.records()]
    # env override of the cache location
    monkeypatch.setenv("CONTRASTIVE_CACHE", str(tmp_path / "envcache"))
    assert corpus_mod.default_cache_dir() == tmp_path / "envcache" / "codesearch"
    # a changed source file (size/mtime) invalidates the cache
    target = root / "mod0.py"
    target.write_text(target.read_text() + _function("shrink", "tree", 999))
    with pytest.raises(AssertionError, match="must not run"):
        build_local_corpus(root, cache_dir=cache)
    monkeypatch.undo()
    third = build_local_corpus(root, cache_dir=cache)
    assert any(r.func_name == "shrink_tree_999" for r in third.records())
    assert len(list(cache.glob("local-*.jsonl.gz"))) == 2
    # a different setting is a different cache entry too
    build_local_corpus(root, cache_dir=cache, min_code_lines=4)
    assert len(list(cache.glob("local-*.jsonl.gz"))) == 3


def test_no_partial_cache_after_failed_write(tmp_path, monkeypatch):
    root = _make_tree(tmp_path / "src", n_modules=6, per_module=3)
    cache = tmp_path / "cache"
    calls = {"n": 0}

    def failing_dumps(obj, *a, **k):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("disk full (simulated)")
        return json.dumps(obj, *a, **k)

    monkeypatch.setattr(corpus_mod, "json", types.SimpleNamespace(dumps=failing_dumps, loads=json.loads,
                                                                  JSONDecodeError=json.JSONDecodeError))
    with pytest.raises(OSError, match="simulated"):
        build_local_corpus(root, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the final file nor a temporary one
    monkeypatch.undo()
    c = build_local_corpus(root, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1 and len(c) == 18
    # a truncated/corrupt cache file is rebuilt, not trusted
    path = Path(c.meta["cache_path"])
    path.write_bytes(path.read_bytes()[:50])
    again = build_local_corpus(root, cache_dir=cache)
    assert len(again) == 18


# -------------------------------------------------------------------------------------- bad paths

def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_local_corpus(tmp_path / "nope", cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        build_local_corpus(tmp_path / "empty", cache_dir=tmp_path / "cache")
    _write(tmp_path / "nodocs" / "a.py", "def f(x):\n    y = x\n    return y\n")
    with pytest.raises(CorpusError, match="no \\(docstring, code\\) pair"):
        build_local_corpus(tmp_path / "nodocs", cache_dir=tmp_path / "cache", use_cache=False)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_jsonl_corpus(tmp_path / "missing.jsonl", cache_dir=tmp_path / "cache")
    _write(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(CorpusError, match="empty.jsonl"):
        build_jsonl_corpus(tmp_path / "empty.jsonl", cache_dir=tmp_path / "cache")
    (tmp_path / "nojsonl").mkdir()
    with pytest.raises(CorpusError, match="no .jsonl"):
        build_jsonl_corpus(tmp_path / "nojsonl", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="needs path"):
        CodeSearchDataModule(source="jsonl")


# ------------------------------------------------------------------------------------------ jsonl

def _csn_record(i: int, partition: str | None = None) -> dict:
    doc = f"Compute the value number {i} for the request.\n\n    Args:\n        x: input"
    code = (f"def value_{i}(x):\n    \"\"\"{doc}\n    \"\"\"\n    y = x + {i}\n    z = y * 2\n    return z\n")
    rec = {"repo": f"owner/repo{i % 7}", "path": f"pkg/mod{i}.py", "func_name": f"value_{i}",
           "original_string": code, "language": "python", "code": code,
           "code_tokens": ["def", f"value_{i}", "(", "x", ")"], "docstring": doc,
           "docstring_tokens": ["Compute", "the", "value"], "url": f"https://example.com/r/{i}#L1"}
    if partition:
        rec["partition"] = partition
    return rec


def test_jsonl_reader_file_and_bad_lines(tmp_path, caplog):
    path = tmp_path / "python_test_0.jsonl.gz"
    lines = [json.dumps(_csn_record(i, ["train", "valid", "test"][i % 3])) for i in range(30)]
    no_code = _csn_record(99)
    del no_code["code"], no_code["original_string"], no_code["code_tokens"]
    lines.insert(3, "{this is not json")
    lines.insert(7, json.dumps(no_code))
    lines.insert(10, "")
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="datamodules.codesearch"):
        c = build_jsonl_corpus(path, cache_dir=tmp_path / "cache", max_pairs=None)
    assert len(c) == 30
    assert c.report.counts == {"json_error": 1, "missing_field": 1}
    where = {e["reason"]: e["where"] for e in c.report.examples}
    assert where == {"json_error": f"{path}:4", "missing_field": f"{path}:8"}
    assert f"{path}:4" in caplog.text
    r = c.records()[0]
    assert r.query == "Compute the value number 0 for the request."
    assert r.document == "def value_0(x):\n    y = x + 0\n    z = y * 2\n    return z"
    assert r.source == "https://example.com/r/0#L1" and r.func_name == "value_0"
    assert c.split_sizes() == {"train": 10, "valid": 10, "test": 10}  # partition field beats the file name
    # a plain (non-gz) file gives the same records
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps(_csn_record(i, "train" if i % 3 else "test")) for i in range(9)) + "\n"
                     + json.dumps(_csn_record(50, "valid")) + "\n")
    c2 = build_jsonl_corpus(plain, cache_dir=tmp_path / "cache")
    assert c2.split_sizes() == {"train": 6, "valid": 1, "test": 3}


def test_jsonl_directory_layout(tmp_path):
    base = tmp_path / "python" / "final" / "jsonl"
    for split, n in (("train", 12), ("valid", 3), ("test", 3)):
        recs = [_csn_record(i + 1000 * len(split)) for i in range(n)]
        for r in recs:
            del r["code"], r["original_string"]  # code_tokens only (already docstring-free in CSN)
        (base / split).mkdir(parents=True)
        with gzip.open(base / split / "shard_0.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
    c = build_jsonl_corpus(tmp_path / "python", cache_dir=tmp_path / "cache")
    assert c.split_sizes() == {"train": 12, "valid": 3, "test": 3}
    assert c.records("valid")[0].document.startswith("def value_")
    assert c.meta["split_method"] == "fixed"


def test_datamodule_on_jsonl(tmp_path):
    path = tmp_path / "csn.jsonl"
    path.write_text("".join(json.dumps(_csn_record(i, (["train"] * 8 + ["valid", "test"])[i % 10])) + "\n" for i in range(40)))
    dm = DATAMODULES.build("codesearch", source="jsonl", path=str(path), cache_dir=str(tmp_path / "cache"),
                           vocab_size=300, batch_size=4, eval_batch_size=8, max_doc_length=24)
    dm.setup(None)
    assert dm.describe()["splits"] == {"train": 32, "valid": 4, "test": 4}
    b = next(iter(dm.test_dataloader()))
    assert b["doc_ids"].shape == (4, 24) and b["pair_id"].tolist() == [r.id for r in dm.corpus.records("test")]


# ---------------------------------------------------------------------------------- real stdlib

def test_real_stdlib_subset(tmp_path):
    std = sysconfig.get_paths()["stdlib"]
    roots = [os.path.join(std, "json"), os.path.join(std, "email")]
    c = build_local_corpus(roots, cache_dir=tmp_path / "cache", use_cache=False, workers=1)
    d = c.describe()
    assert d["records"] > 100 and all(v > 0 for v in d["splits"].values()) and d["bad_input"] == {}
    for r in c.records():
        assert r.document.lstrip().startswith(("def ", "async def ")), r.source
        assert len(r.query.split()) >= 3 and r.query == " ".join(r.query.split())
        second = r.document.split("\n")[1].strip()
        assert not second.startswith(('"""', "'''", 'r"""')), r.source  # docstring removed


# ------------------------------------------------------------------------------------ datamodule

def test_datamodule_batches(tmp_path):
    root = _make_tree(tmp_path / "src", n_modules=12, per_module=6)
    tok_dir = tmp_path / "run" / "tokenizer"
    dm = DATAMODULES.build("codesearch", path=str(root), cache_dir=str(tmp_path / "cache"), vocab_size=300,
                           max_query_length=12, max_doc_length=40, batch_size=8, eval_batch_size=5,
                           tokenizer_dir=str(tok_dir), seed=3)
    assert isinstance(dm, CodeSearchDataModule)
    dm.prepare_data()
    dm.setup("fit")
    assert (tok_dir / "tokenizer.json").is_file() and 260 < dm.vocab_size <= 300
    n_train = len(dm.corpus.records("train"))
    batches = list(dm.train_dataloader())
    assert len(batches) == n_train // 8  # drop_last
    b = batches[0]
    assert set(b) == {"query_ids", "query_mask", "doc_ids", "doc_mask", "pair_id", "dup_group"}
    for k in ("query_ids", "doc_ids", "pair_id", "dup_group"):
        assert b[k].dtype == torch.long
    assert b["query_mask"].dtype == b["doc_mask"].dtype == torch.bool
    assert b["query_ids"].shape == b["query_mask"].shape and b["query_ids"].shape[0] == 8
    assert b["query_ids"].shape[1] <= 12 and b["doc_ids"].shape == b["doc_mask"].shape == (8, 40)
    assert b["pair_id"].shape == b["dup_group"].shape == (8,)
    assert (b["query_ids"][:, 0] == 2).all() and (b["query_ids"][~b["query_mask"]] == 0).all()
    rec = dm.corpus[int(b["pair_id"][0])]
    assert rec.split == "train" and rec.dup_group == int(b["dup_group"][0])
    ids, _ = dm.tokenizer.encode_batch([rec.query], 12)
    assert torch.equal(b["query_ids"][0, : ids.shape[1]], ids[0])
    # seeded shuffle: same order on a fresh loader, a different order next epoch (Lightning sets the epoch
    # through ``batch_sampler.sampler.set_epoch``), the same again when an epoch is repeated (resume)
    loader = dm.train_dataloader()
    epoch1 = torch.cat([x["pair_id"] for x in loader])
    loader.batch_sampler.sampler.set_epoch(1)
    epoch2 = torch.cat([x["pair_id"] for x in loader])
    loader.batch_sampler.skip_next(2)
    assert torch.equal(torch.cat([x["pair_id"] for x in loader]), epoch2[2 * 8:])
    assert torch.equal(epoch1, torch.cat([x["pair_id"] for x in batches])) and not torch.equal(epoch1, epoch2)
    # valid loader: the whole split in id order, no drop
    val_ids = torch.cat([x["pair_id"] for x in dm.val_dataloader()]).tolist()
    assert val_ids == [r.id for r in dm.corpus.records("valid")]
    # text loader
    tl = list(dm.text_loader(["Parse the config", "def f():\n    return 1"] * 3, kind="doc", batch_size=4))
    assert [x["ids"].shape[0] for x in tl] == [4, 2] and tl[0]["mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="kind"):
        dm.text_loader(["x"], kind="code")
    d = dm.describe()
    assert d["splits"]["train"] == n_train and d["vocab_size"] == dm.vocab_size and "dup_groups" in d
    # a second datamodule loads the saved tokenizer and the cached corpus and tokenized splits
    dm2 = CodeSearchDataModule(path=str(root), cache_dir=str(tmp_path / "cache"), vocab_size=300,
                               max_query_length=12, max_doc_length=40, batch_size=8, tokenizer_dir=str(tok_dir), seed=3)
    dm2.setup("test")
    t1 = next(iter(dm2.test_dataloader()))
    assert t1["doc_ids"].shape[1] <= 40 and dm2.vocab_size == dm.vocab_size
