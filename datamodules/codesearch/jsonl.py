"""CodeSearchNet-style jsonl input: one ``.jsonl`` / ``.jsonl.gz`` file, or a directory of them.

A directory is searched recursively, e.g. CodeSearchNet's ``{language}/final/jsonl/{train,valid,test}/
*.jsonl.gz`` layout. Fields used per line (a JSON object):

- query: ``docstring`` (its summary, see :func:`~.extract.summarize_docstring`), else
  ``" ".join(docstring_tokens)``;
- document: ``code``, else ``original_string``, else ``" ".join(code_tokens)``; for Python (``language``
  missing or ``"python"``) the docstring is removed with the same ``ast`` routine as for local source
  (falling back to the code as given when it does not parse);
- ``func_name``; ``url`` (else ``repo/path``) as the record's ``source``; ``repo`` (else ``path``) as the
  split group;
- split: the ``partition`` field, else the nearest directory name (or file-name part, as in
  ``python_valid_0.jsonl.gz``) that is ``train``/``valid``/``test`` (``validation``/``val``/``dev`` =
  valid), else by hash of the group as for local source.

Bad lines (not UTF-8, not JSON, not an object, missing or mistyped fields) are skipped and counted in the
corpus report with ``file:line``.
"""
from __future__ import annotations

import ast
import functools
import gzip
import inspect
import json
import logging
import os
import re
import textwrap
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from datamodules.codesearch.corpus import (
    DEFAULT_MAX_PAIRS, SPLIT_METHODS, BadInputReport, CodeSearchCorpus, CorpusError, Item, _fingerprint,
    _run_extraction, cached_build, check_fractions, finalize,
)
from datamodules.codesearch.extract import code_key, count_code_lines, strip_docstring, summarize_docstring

log = logging.getLogger("datamodules.codesearch")

_SPLIT_NAMES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                "dev": "valid", "test": "test", "testing": "test"}
_NAME_SPLIT = re.compile(r"(?:^|[_\-.])(train|valid|validation|val|dev|test)(?:[_\-.]|$)", re.IGNORECASE)
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def _split_of_file(file: Path, root: Path) -> str | None:
    """Split named by the file name (``python_train_0.jsonl.gz``) or the nearest directory between the
    file and ``root`` (``root`` included) called train/valid/test/..., else ``None``."""
    stem = file.name
    for suf in _JSONL_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
            break
    m = _NAME_SPLIT.search(stem)
    if m:
        return _SPLIT_NAMES[m.group(1).lower()]
    d = file.parent
    while True:
        s = _SPLIT_NAMES.get(d.name.lower())
        if s is not None:
            return s
        if d == root or d.parent == d or root not in d.parents:
            return None
        d = d.parent


def find_jsonl_files(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """``(file, split named by its path or None)`` for ``path`` (a file, or a directory searched
    recursively for ``*.jsonl`` / ``*.jsonl.gz``), sorted. Raises ``FileNotFoundError`` for a missing
    path and :class:`CorpusError` for a directory without jsonl files."""
    p = Path(os.path.expanduser(os.fspath(path))).absolute()
    if not p.exists():
        raise FileNotFoundError(f"CodeSearchNet jsonl path {str(p)!r} does not exist")
    if p.is_file():
        return [(str(p), _split_of_file(p, p.parent))]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(_JSONL_SUFFIXES)
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise CorpusError(f"no .jsonl or .jsonl.gz file under the CodeSearchNet directory {str(p)!r}")
    return [(str(f), _split_of_file(f, p)) for f in files]


def python_code_without_docstring(code: str) -> str | None:
    """``code`` (one function, possibly indented/decorated) with its docstring removed, via the same
    routine as local extraction; ``None`` if it does not parse or holds no function."""
    text = textwrap.dedent(code.replace("\r\n", "\n").replace("\r", "\n"))
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return strip_docstring(text.split("\n"), node)
    return None


def _first_str(obj: dict, names: Sequence[str]) -> tuple[str | None, str | None]:
    """The first of ``names`` present and non-empty in ``obj`` as ``(value, field)``; token lists are joined.
    Raises ``TypeError`` for a present field of another type."""
    for n in names:
        if obj.get(n) not in (None, "", []):
            v = obj[n]
            if isinstance(v, list) and all(isinstance(t, str) for t in v):
                return " ".join(v), n
            if not isinstance(v, str):
                raise TypeError(f"field {n!r} is a {type(v).__name__}, expected a string or a list of strings")
            return v, n
    return None, None


def read_jsonl_file(path: str, split_hint: str | None, min_query_words: int = 3,
                    min_code_lines: int = 3) -> tuple[list[Item], list[tuple[str, str, str]], dict[str, int], int]:
    """Read one CSN jsonl(.gz) file. Never raises for bad content.

    Returns:
        ``(items, problems, skipped, n_lines)``: the good records, ``(reason, "file:line", message)`` for
        each bad line (reasons ``decode_error``, ``json_error``, ``not_object``, ``missing_field``,
        ``bad_field``, ``read_error``), filter counts (``short_query``, ``short_code``,
        ``docstring_kept``, ``blank_line``), and the number of non-blank lines seen.
    """
    items: list[Item] = []
    problems: list[tuple[str, str, str]] = []
    skipped: Counter = Counter()
    n_lines = 0
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    skipped["blank_line"] += 1
                    continue
                n_lines += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append(("decode_error", where, f"not UTF-8 at byte {e.start}: {e.reason}"))
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(("json_error", where, f"not JSON: {e.msg} (column {e.colno})"))
                    continue
                if not isinstance(obj, dict):
                    problems.append(("not_object", where, f"a JSON {type(obj).__name__}, expected an object"))
                    continue
                try:
                    doc, _ = _first_str(obj, ("docstring", "docstring_tokens"))
                    code, code_field = _first_str(obj, ("code", "original_string", "code_tokens"))
                    lang, _ = _first_str(obj, ("language",))
                    part, _ = _first_str(obj, ("partition",))
                    func_name, _ = _first_str(obj, ("func_name",))
                    url, _ = _first_str(obj, ("url",))
                    repo, _ = _first_str(obj, ("repo",))
                    rpath, _ = _first_str(obj, ("path",))
                except TypeError as e:
                    problems.append(("bad_field", where, str(e)))
                    continue
                if doc is None:
                    problems.append(("missing_field", where, "no 'docstring' or 'docstring_tokens' field"))
                    continue
                if code is None:
                    problems.append(("missing_field", where, "no 'code', 'original_string' or 'code_tokens' field"))
                    continue
                split = None
                if part is not None:
                    split = _SPLIT_NAMES.get(part.strip().lower())
                    if split is None:
                        problems.append(("bad_field", where, f"unknown partition {part!r}"))
                        continue
                query = summarize_docstring(inspect.cleandoc(doc))
                if len(query.split()) < max(min_query_words, 1):
                    skipped["short_query"] += 1
                    continue
                document = code
                if code_field != "code_tokens" and (lang is None or lang.lower() == "python"):
                    stripped = python_code_without_docstring(code)
                    if stripped is None:
                        skipped["docstring_kept"] += 1
                        document = code.strip("\n")
                    else:
                        document = stripped
                if count_code_lines(document) < min_code_lines and code_field != "code_tokens":
                    skipped["short_code"] += 1
                    continue
                source = url or ("/".join(x for x in (repo, rpath) if x) or where)
                group = repo or rpath or os.path.basename(path)
                items.append(Item(query, document, source, func_name or "", group, split or split_hint,
                                  code_hash=code_key(document)))
    except (OSError, EOFError, zlib.error) as e:
        problems.append(("read_error", f"{path}:{lineno + 1}", f"{type(e).__name__}: {e}; rest of file skipped"))
    return items, problems, dict(skipped), n_lines


def _read_worker(job: tuple[str, str | None], min_query_words: int, min_code_lines: int):
    return read_jsonl_file(job[0], job[1], min_query_words, min_code_lines)


def build_jsonl_corpus(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       max_pairs: int | None = DEFAULT_MAX_PAIRS, split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                       min_query_words: int = 3, min_code_lines: int = 3, max_group_pairs: int | None = None,
                       split_method: str = "auto", workers: int | None = None,
                       use_cache: bool = True) -> CodeSearchCorpus:
    """Build (or load from cache) a corpus from CodeSearchNet jsonl; see the module docstring.

    Args:
        path: a ``.jsonl``/``.jsonl.gz`` file or a directory of them.
        max_pairs / max_group_pairs / split_fractions / split_method: see :func:`~.corpus.finalize`
            (``split_fractions`` only matter for records without a partition).
        min_query_words / min_code_lines: filters (CSN is already filtered; 0 keeps everything).
        workers: processes reading files in parallel (default ``min(4, cpu_count)``).

    Raises:
        FileNotFoundError: ``path`` does not exist. CorpusError: no jsonl file, an empty file, no usable
        record, or an empty split.
    """
    files = find_jsonl_files(path)
    check_fractions(split_fractions)
    if split_method not in SPLIT_METHODS:
        raise CorpusError(f"split_method must be one of {SPLIT_METHODS}; got {split_method!r}")
    where = os.path.abspath(os.fspath(path))
    settings = {"path": where, "max_pairs": max_pairs, "split_fractions": list(map(float, split_fractions)),
                "min_query_words": min_query_words, "min_code_lines": min_code_lines,
                "max_group_pairs": max_group_pairs, "split_method": split_method}
    fp = _fingerprint("jsonl", settings, [f for f, _ in files])

    def build() -> CodeSearchCorpus:
        t0 = time.perf_counter()
        n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        worker = functools.partial(_read_worker, min_query_words=min_query_words, min_code_lines=min_code_lines)
        results = _run_extraction(files, worker, n_workers, min_parallel=2)
        report = BadInputReport()
        skipped: Counter = Counter()
        items: list[Item] = []
        empty_files = []
        for (f, _), (its, problems, sk, n_lines) in zip(files, results):
            for reason, w, msg in problems:
                report.add(reason, w, msg)
            skipped.update(sk)
            items.extend(its)
            if n_lines == 0:
                empty_files.append(f)
        if len(empty_files) == len(files):
            raise CorpusError(f"CodeSearchNet jsonl input {where!r} is empty: no JSON line in "
                              f"{', '.join(empty_files[:5])}{' ...' if len(empty_files) > 5 else ''}")
        for f in empty_files:
            report.add("empty_file", f"{f}:0", "no JSON line")
        if report.total:
            log.warning("codesearch: %s", report.summary())
        stats: dict[str, Any] = {"files_found": len(files), "files_scanned": len(files),
                                 "skipped": dict(sorted(skipped.items()))}
        corpus = finalize(items, split_fractions, max_pairs, report, stats, {"kind": "jsonl", "settings": settings},
                          where=f"CodeSearchNet jsonl {where!r}", max_group_pairs=max_group_pairs,
                          split_method=split_method)
        corpus.stats["build_seconds"] = round(time.perf_counter() - t0, 2)
        return corpus

    return cached_build("jsonl", fp, cache_dir, use_cache, build)
