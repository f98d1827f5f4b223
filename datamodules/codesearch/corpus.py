"""The code-search corpus: records, leak-free splits, duplicate groups, bad-input report, disk cache.

A corpus is a list of :class:`CodePair` with ids ``0..N-1`` (the position in the list), built either from
Python source on this machine (:func:`build_local_corpus`; the default dataset reads a fixed source set,
the standard library plus the pinned distributions of :data:`DEFAULT_PACKAGES`, see
:func:`resolve_source_set`; any directories of Python sources can be given instead) or from CodeSearchNet
jsonl files (:func:`datamodules.codesearch.jsonl.build_jsonl_corpus`). Both builders go through
:func:`finalize` which

1. optionally caps the number of pairs (``max_pairs``; deterministic: the pairs with the smallest
   sha1 of ``source|func_name`` are kept),
2. assigns splits by *group* (top-level package/module for local source, repository for jsonl) so
   that no file or package is ever in two splits (see :func:`assign_splits`),
3. finds duplicate groups (same normalised code or same normalised summary, transitively;
   see :mod:`datamodules.codesearch.extract`). Duplicates are kept and marked: ``dup_group`` is the
   smallest id of the group, so a record without duplicates has ``dup_group == id``.

The built corpus is cached as ``<cache_dir>/<kind>-<fingerprint>.jsonl.gz`` (a header line with the
settings, report and statistics, then one JSON record per line), written atomically. The fingerprint
covers the settings and every selected input file's path, size and mtime, so editing a source file,
adding one or changing a setting gives a new cache file. The corpus ``meta`` also holds a ``content_fingerprint``
(sha1 of the records only), which names the corpus itself independently of paths and file times. The cache directory is ``cache_dir`` if
given, else ``$CONTRASTIVE_CACHE/codesearch``, else ``~/.cache/contrastive/codesearch``.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from contrastive.io import atomic_write

from datamodules.codesearch import extract as _extract
from datamodules.codesearch.extract import code_key, query_key

log = logging.getLogger("datamodules.codesearch")

SPLITS: tuple[str, str, str] = ("train", "valid", "test")
CACHE_FORMAT = "contrastive.codesearch.corpus"
CACHE_VERSION = 1  # bump whenever extraction / splitting / dedup logic changes

DEFAULT_MAX_FILES = 10000
DEFAULT_MAX_PAIRS = 40000
DEFAULT_MAX_GROUP_PAIRS = 1000
DEFAULT_MAX_FILE_BYTES = 1_000_000


class CorpusError(ValueError):
    """The corpus cannot be built: nothing usable in the input, an empty split, bad settings."""


# ------------------------------------------------------------------------------------------ records

@dataclass
class CodePair:
    """One (query, code) pair.

    Attributes:
        id: global record id, the index in :meth:`CodeSearchCorpus.records` ``(None)``.
        query: natural-language query (docstring summary).
        document: the code, docstring removed.
        split: ``"train"`` | ``"valid"`` | ``"test"``.
        dup_group: duplicate-group id (smallest record id in the group); equal ids are known false
            negatives of each other.
        source: where the pair comes from, ``"relative/path.py:LINE"`` (local) or the CSN url/path.
        func_name: qualified function name.
        group: the split key (top-level package/module or repository).
    """

    id: int
    query: str
    document: str
    split: str
    dup_group: int
    source: str
    func_name: str
    group: str = ""


@dataclass
class BadInputReport:
    """Counts of bad inputs per reason and the first few examples of each (``where`` is ``file:line``).

    Bad inputs are skipped, never fatal; the report is logged at build time and kept with the corpus.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    max_examples_per_reason: int = 5

    def add(self, reason: str, where: str, message: str) -> None:
        n = self.counts.get(reason, 0)
        self.counts[reason] = n + 1
        if n < self.max_examples_per_reason:
            self.examples.append({"reason": reason, "where": where, "message": message})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def summary(self) -> str:
        if not self.total:
            return "no bad input"
        head = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        lines = [f"{self.total} bad input(s) skipped ({head}); first examples:"]
        lines += [f"  [{e['reason']}] {e['where']}: {e['message']}" for e in self.examples]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": list(self.examples),
                "max_examples_per_reason": self.max_examples_per_reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BadInputReport":
        return cls(dict(d.get("counts", {})), list(d.get("examples", [])), int(d.get("max_examples_per_reason", 5)))


@dataclass
class Item:
    """A pair before ids/splits/dup groups (what the readers produce). ``split`` is a fixed split
    (CSN ``partition``) or ``None`` to assign one by ``group``. Ids follow the order of the list."""

    query: str
    document: str
    source: str
    func_name: str
    group: str
    split: str | None = None
    code_hash: str | None = None  # :func:`~.extract.code_key` of ``document`` if already computed


# ------------------------------------------------------------------------------------------- corpus

class CodeSearchCorpus:
    """An immutable list of :class:`CodePair` plus its report, statistics and provenance.

    Args:
        records: pairs with ``records[i].id == i``.
        report: bad inputs met while building.
        stats: filter counts (``no_docstring``, ``short_query``, ...) and build facts.
        meta: provenance (kind, fingerprint, settings, split method, cache path).
    """

    def __init__(self, records: list[CodePair], report: BadInputReport | None = None,
                 stats: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> None:
        for i, r in enumerate(records):
            if r.id != i:
                raise CorpusError(f"record ids must be 0..N-1 in order; record at position {i} has id {r.id}")
            if r.split not in SPLITS:
                raise CorpusError(f"record {i} ({r.source}) has unknown split {r.split!r}")
        self._records = records
        self.report = report or BadInputReport()
        self.stats = dict(stats or {})
        self.meta = dict(meta or {})
        self._by_split = {s: [r for r in records if r.split == s] for s in SPLITS}
        members: dict[int, list[int]] = {}
        for r in records:
            members.setdefault(r.dup_group, []).append(r.id)
        self._groups = members

    # -- access
    def records(self, split: str | None = None) -> list[CodePair]:
        """All records (``split=None``) or those of one split, in id order (a copy of the list)."""
        if split is None:
            return list(self._records)
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._by_split[split])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, record_id: int) -> CodePair:
        return self._records[record_id]

    def duplicates_of(self, record_id: int) -> list[int]:
        """Ids of the other members of ``record_id``'s duplicate group (known false negatives), sorted."""
        g = self._records[record_id].dup_group
        return [i for i in self._groups[g] if i != record_id]

    def duplicate_groups(self) -> dict[int, list[int]]:
        """``dup_group -> member ids`` for the groups with more than one member."""
        return {g: list(m) for g, m in self._groups.items() if len(m) > 1}

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self._by_split[s]) for s in SPLITS}

    def describe(self) -> dict[str, Any]:
        """Sizes per split, duplicate statistics, bad-input counts and filter counts."""
        groups = self.duplicate_groups()
        cross = sum(1 for m in groups.values() if len({self._records[i].split for i in m}) > 1)
        return {
            "kind": self.meta.get("kind"),
            "records": len(self),
            "splits": self.split_sizes(),
            "split_groups": {s: len({r.group for r in self._by_split[s]}) for s in SPLITS},
            "split_method": self.meta.get("split_method"),
            "dup_groups": len(groups),
            "dup_records": sum(len(m) for m in groups.values()),
            "largest_dup_group": max((len(m) for m in groups.values()), default=1),
            "cross_split_dup_groups": cross,
            "bad_input": dict(self.report.counts),
            "filtered": dict(self.stats.get("skipped", {})),
            "extracted_pairs": self.stats.get("extracted_pairs"),
            "cache_path": self.meta.get("cache_path"),
        }

    # -- cache
    def save(self, path: str | os.PathLike) -> None:
        """Write the corpus as ``jsonl.gz`` atomically (temp file in the same directory, then ``os.replace``)."""
        header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "n_records": len(self),
                  "report": self.report.to_dict(), "stats": self.stats,
                  "meta": {k: v for k, v in self.meta.items() if k != "cache_path"}}
        lines = (json.dumps(dataclasses.asdict(r)) for r in self._records)
        atomic_write_jsonl_gz(path, header, lines)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CodeSearchCorpus":
        """Read a corpus written by :meth:`save`; raises :class:`CorpusError` if it is not a complete one."""
        path = Path(path)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                header = json.loads(f.readline())
                if header.get("format") != CACHE_FORMAT or header.get("version") != CACHE_VERSION:
                    raise CorpusError(f"{path}: not a version-{CACHE_VERSION} {CACHE_FORMAT} file")
                records = [CodePair(**json.loads(line)) for line in f]
        except (OSError, EOFError, json.JSONDecodeError, TypeError) as e:
            raise CorpusError(f"{path}: unreadable corpus cache ({type(e).__name__}: {e})") from e
        if len(records) != header.get("n_records"):
            raise CorpusError(f"{path}: truncated corpus cache ({len(records)} of {header.get('n_records')} records)")
        meta = dict(header.get("meta", {}))
        meta["cache_path"] = str(path)
        return cls(records, BadInputReport.from_dict(header.get("report", {})), header.get("stats", {}), meta)


def atomic_write_jsonl_gz(path: str | os.PathLike, header: dict[str, Any], lines: Iterable[str]) -> None:
    """Write ``header`` then ``lines`` (one JSON document each) to ``path`` as gzip, atomically: the data
    goes to a temporary file in the same directory which replaces ``path`` only once complete; on any
    error the temporary file is removed and ``path`` is untouched."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) as gz:
                gz.write((json.dumps(header) + "\n").encode("utf-8"))
                for line in lines:
                    gz.write((line + "\n").encode("utf-8"))
            raw.flush()
            os.fsync(raw.fileno())

    atomic_write(path, write)


def default_cache_dir() -> Path:
    """``$CONTRASTIVE_CACHE/codesearch`` if the variable is set, else ``~/.cache/contrastive/codesearch``."""
    base = os.environ.get("CONTRASTIVE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "contrastive") / "codesearch"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


# ------------------------------------------------------------------------------------------- splits

def _unit_hash(text: str) -> float:
    """A stable number in ``[0, 1)`` from sha1 of ``text``."""
    return int(hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:15], 16) / 16 ** 15


def check_fractions(split_fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(x) for x in split_fractions)
    if len(fr) != 3 or any(x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise CorpusError(f"split_fractions must be three non-negative numbers (train, valid, test) summing to 1 "
                          f"with train > 0; got {tuple(split_fractions)}")
    return fr  # type: ignore[return-value]


SPLIT_METHODS = ("auto", "hash", "balanced")


def _hash_split(name: str, fr: Sequence[float]) -> str:
    u = _unit_hash(name)
    return "train" if u < fr[0] else ("valid" if u < fr[0] + fr[1] else "test")


def assign_splits(group_sizes: dict[str, int], split_fractions: Sequence[float], method: str = "auto",
                  tolerance: float = 0.3) -> tuple[dict[str, str], str]:
    """Map every group (split key -> its number of pairs) to a split; returns ``(group -> split, method used)``.

    - ``"hash"``: a group goes to train if ``u < f_train``, to valid if ``u < f_train + f_valid``, else to
      test, with ``u`` = sha1(group name) in ``[0, 1)``. Stable: a group keeps its split when others are
      added or removed; but the pair fractions are noisy when a few groups are large.
    - ``"balanced"``: groups ordered by the same hash, the ordering cut at the cumulative pair counts
      ``f_train * N`` and ``(f_train + f_valid) * N`` (a group goes where its midpoint falls); then any
      split that is still empty receives the smallest group of the split with most groups.
    - ``"auto"`` (default): ``"hash"``, unless it leaves a split with a positive fraction empty or some
      split's share of pairs is off its fraction by more than ``tolerance`` (relative), then ``"balanced"``.

    ``"hash"`` also falls back to ``"balanced"`` when a split would be empty. Raises :class:`CorpusError`
    when there are fewer groups than splits to fill.
    """
    fr = check_fractions(split_fractions)
    if method not in SPLIT_METHODS:
        raise CorpusError(f"split_method must be one of {SPLIT_METHODS}; got {method!r}")
    needed = [s for s, f in zip(SPLITS, fr) if f > 0]
    names = sorted(group_sizes, key=lambda g: (_unit_hash(g), g))
    total = sum(group_sizes.values())
    out = {g: _hash_split(g, fr) for g in names}
    if method != "balanced":
        share = Counter()
        for g, s in out.items():
            share[s] += group_sizes[g]
        nonempty = all(share[s] > 0 for s in needed)
        close = all(abs(share[s] / max(total, 1) - f) <= tolerance * f for s, f in zip(SPLITS, fr))
        if nonempty and (method == "hash" or close):
            return out, "hash"
    if len(names) < len(needed):
        raise CorpusError(
            f"only {len(names)} split group(s) ({', '.join(names) or 'none'}) for {len(needed)} non-empty splits "
            f"{needed}: the split is by top-level package/module (or repository), so the corpus needs at "
            f"least {len(needed)} of them; add source roots or set split_fractions with zeros")
    b1, b2 = fr[0] * total, (fr[0] + fr[1]) * total
    cum = 0.0
    for g in names:
        mid = cum + group_sizes[g] / 2
        out[g] = "train" if mid < b1 else ("valid" if mid < b2 else "test")
        cum += group_sizes[g]
    for s in needed:
        if not any(v == s for v in out.values()):
            members = Counter(out.values())
            donor = max((d for d in needed if members[d] > 1), key=lambda d: (members[d], -SPLITS.index(d)))
            g = min((n for n in names if out[n] == donor), key=lambda n: (group_sizes[n], _unit_hash(n), n))
            out[g] = s  # the donor's smallest group (ties by hash): deterministic, least distortion
    return out, "balanced"


# ------------------------------------------------------------------------------------------- dedup

def duplicate_groups(queries: Sequence[str], documents: Sequence[str],
                     code_hashes: Sequence[str | None] | None = None) -> list[int]:
    """Union-find over "same normalised code" and "same normalised summary"; returns, per record, the
    smallest index in its group (so singletons map to themselves). ``code_hashes[i]``, when given and
    not ``None``, is used instead of recomputing :func:`~.extract.code_key` of ``documents[i]``."""
    parent = list(range(len(queries)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[tuple[str, str], int] = {}
    hashes = code_hashes if code_hashes is not None else [None] * len(documents)
    for i, (q, d, h) in enumerate(zip(queries, documents, hashes)):
        for key in (("c", h or code_key(d)), ("q", query_key(q))):
            if key[1] == "":
                continue
            j = first.setdefault(key, i)
            if j != i:
                union(i, j)
    return [find(i) for i in range(len(queries))]


# ---------------------------------------------------------------------------------------- finalize

def _pair_hash(item: Item) -> str:
    return hashlib.sha1(f"{item.source}|{item.func_name}".encode("utf-8", "surrogatepass")).hexdigest()


def _cap(items: list[Item], limit: int) -> list[Item]:
    """The ``limit`` items with the smallest sha1 of ``source|func_name``, in their original order."""
    if len(items) <= limit:
        return items
    keep = set(sorted(range(len(items)), key=lambda i: (_pair_hash(items[i]), i))[:limit])
    return [it for i, it in enumerate(items) if i in keep]


def finalize(items: list[Item], split_fractions: Sequence[float], max_pairs: int | None,
             report: BadInputReport, stats: dict[str, Any], meta: dict[str, Any], where: str,
             max_group_pairs: int | None = None, split_method: str = "auto") -> CodeSearchCorpus:
    """Cap, split and deduplicate ``items`` (already in their final order) into a corpus.

    Caps are deterministic (smallest pair hash): first at most ``max_group_pairs`` per split group
    (so that one huge package such as ``torch`` cannot dominate the corpus or a split), then at most
    ``max_pairs`` in all. Items with a fixed ``split`` keep it; the others are assigned by group
    (:func:`assign_splits`). ``where`` names the input in error messages.

    Raises:
        CorpusError: the corpus, or a split with a positive fraction (or, for fixed partitions, any
            split), is empty.
    """
    fr = check_fractions(split_fractions)
    if not items:
        raise CorpusError(f"no (docstring, code) pair could be extracted from {where}; "
                          f"filtered: {stats.get('skipped', {})}; {report.summary()}")
    stats["extracted_pairs"] = len(items)
    if max_group_pairs is not None:
        by_group: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_group.setdefault(it.group, []).append(i)
        keep: set[int] = set()
        for idx in by_group.values():
            idx = sorted(idx, key=lambda i: (_pair_hash(items[i]), i))
            keep.update(idx[:max_group_pairs])
        if len(keep) < len(items):
            stats["capped_by_max_group_pairs"] = len(items) - len(keep)
            items = [it for i, it in enumerate(items) if i in keep]
    if max_pairs is not None and len(items) > max_pairs:
        stats["capped_by_max_pairs"] = len(items) - max_pairs
        items = _cap(items, max_pairs)
    free: dict[str, int] = {}
    for it in items:
        if it.split is None:
            free[it.group] = free.get(it.group, 0) + 1
    has_fixed = any(it.split is not None for it in items)
    method = "fixed"
    group_split: dict[str, str] = {}
    if free and has_fixed:  # records without a partition next to ones with: hash them, no balancing
        group_split = {g: _hash_split(g, fr) for g in free}
        method = "fixed+hash"
    elif free:
        group_split, method = assign_splits(free, fr, split_method)
    dup = duplicate_groups([it.query for it in items], [it.document for it in items], [it.code_hash for it in items])
    records = [CodePair(id=i, query=it.query, document=it.document,
                        split=it.split if it.split is not None else group_split[it.group],
                        dup_group=dup[i], source=it.source, func_name=it.func_name, group=it.group)
               for i, it in enumerate(items)]
    sizes = Counter(r.split for r in records)
    if has_fixed:
        empty = [s for s in SPLITS if sizes[s] == 0]
        hint = " (splits come from the 'partition' field or the train/valid/test directory names)"
    else:
        empty = [s for s, f in zip(SPLITS, fr) if f > 0 and sizes[s] == 0]
        hint = f" (split fractions {fr})"
    if empty:
        raise CorpusError(f"split(s) {empty} are empty for {where}: sizes {dict(sizes)}{hint}")
    meta = dict(meta, split_method=method)
    return CodeSearchCorpus(records, report, stats, meta)


# ------------------------------------------------------------------------------------ local source

#: The default source set's pinned distributions: the project's runtime dependencies (``setup.cfg``
#: ``install_requires``) at the versions the README's numbers were measured with. Only these
#: distributions' own files (their ``RECORD``) and the standard library are read, so installing or
#: removing any other package leaves the default corpus unchanged.
DEFAULT_PACKAGES: dict[str, str] = {
    "bm25s": "0.3.16", "lightning": "2.6.6", "matplotlib": "3.11.2", "numpy": "2.4.6",
    "omegaconf": "2.4.0", "open_clip_torch": "3.3.0", "scipy": "1.17.1", "tensorboard": "2.21.0",
    "timm": "1.0.31", "tokenizers": "0.23.3", "torch": "2.14.1", "torchmetrics": "1.9.0",
    "torchvision": "0.29.2", "tqdm": "4.70.1",
}


@dataclass
class SourceSet:
    """A named, fixed set of Python sources: the standard library plus pinned distributions.

    Attributes:
        files: ``(root index, root, path relative to root)`` of every selected ``*.py`` file, sorted.
        description: what the set is (``python`` version, ``stdlib`` flag, installed ``packages`` with their
            versions, ``pinned`` versions, ``missing`` and ``version_mismatch`` lists); machine-independent
            (no absolute paths), it goes into the corpus fingerprint and is printed and saved with a run.
    """

    files: list[tuple[int, str, str]]
    description: dict[str, Any]

    def summary(self) -> str:
        d = self.description
        pk = ", ".join(f"{n}=={v}" for n, v in sorted(d["packages"].items()))
        head = (f"Python {d['python']} standard library" if d["stdlib"] else "no standard library") + (f" + {pk}" if pk else "")
        notes = [f"missing: {', '.join(d['missing'])}"] if d["missing"] else []
        notes += [f"version differs from the pin: {', '.join(d['version_mismatch'])}"] if d["version_mismatch"] else []
        return head + (f" ({'; '.join(notes)})" if notes else "")


def _keep_relpath(rel: str, skip_tests: bool) -> bool:
    """Whether a distribution file (POSIX path relative to its install root) is a source file to scan,
    by the same rules as :func:`list_source_files`."""
    parts = rel.split("/")
    if not rel.endswith(".py") or parts[0] == ".." or any(p.startswith(".") for p in parts):
        return False
    for d in parts[:-1]:
        if d == "__pycache__" or d.endswith(_SKIP_DIR_SUFFIXES) or (skip_tests and _is_test_dir(d)):
            return False
    return not (skip_tests and _is_test_file(parts[-1]))


def resolve_source_set(packages: dict[str, str] | None = None, stdlib: bool = True,
                       search_path: Sequence[str] | None = None, skip_tests: bool = True) -> SourceSet:
    """The files of the standard library (if ``stdlib``) and of the named distributions.

    A distribution contributes exactly the ``*.py`` files listed in its installed ``RECORD``
    (:func:`importlib.metadata.distribution` files), test files and directories left out with
    ``skip_tests``; nothing else under ``site-packages`` is read. A missing distribution, or one whose
    installed version differs from its pin, is logged as a warning and listed in the description.

    Args:
        packages: distribution name -> pinned version; default :data:`DEFAULT_PACKAGES`.
        stdlib: include the standard library (``sysconfig`` ``stdlib``, without ``site-packages``).
        search_path: where to look for distributions (default ``sys.path``).
        skip_tests: leave out test directories and files.
    """
    import platform
    from importlib import metadata

    packages = dict(DEFAULT_PACKAGES if packages is None else packages)
    roots: list[str] = []
    files: list[tuple[int, str, str]] = []
    if stdlib:
        std = sysconfig.get_paths()["stdlib"]
        roots.append(std)
        files += list_source_files([std], skip_tests)
    installed: dict[str, str] = {}
    missing: list[str] = []
    mismatch: list[str] = []
    for name in sorted(packages):
        where = {"path": list(search_path)} if search_path is not None else {}
        dists = list(metadata.distributions(name=name, **where))
        if not dists:
            missing.append(name)
            continue
        dist = dists[0]
        installed[name] = dist.version
        if packages[name] and dist.version != packages[name]:
            mismatch.append(f"{name} {dist.version} (pinned {packages[name]})")
        base = os.path.normpath(str(dist.locate_file("")))
        if base not in roots:
            roots.append(base)
        ri = roots.index(base)
        files += [(ri, base, str(f).replace(os.sep, "/")) for f in (dist.files or [])
                  if _keep_relpath(str(f).replace(os.sep, "/"), skip_tests)]
    if missing:
        log.warning("codesearch: pinned distribution(s) not installed, left out of the corpus: %s", ", ".join(missing))
    if mismatch:
        log.warning("codesearch: installed version differs from the pin (the corpus differs from the "
                    "reference one): %s", "; ".join(mismatch))
    files = sorted(set(files), key=lambda t: (t[0], t[2]))
    description = {"python": platform.python_version(), "stdlib": stdlib, "packages": installed,
                   "pinned": packages, "missing": missing, "version_mismatch": mismatch}
    return SourceSet(files, description)


_SKIP_DIR_SUFFIXES = (".dist-info", ".egg-info", ".data")


def _is_test_dir(name: str) -> bool:
    n = name.lower()
    return n in ("test", "tests", "testing_data") or n.startswith("test_") or n.endswith(("_test", "_tests"))


def _is_test_file(name: str) -> bool:
    n = name.lower()
    return n.startswith("test_") or n.endswith("_test.py") or n in ("conftest.py", "tests.py", "test.py")


def list_source_files(roots: Sequence[str], skip_tests: bool = True) -> list[tuple[int, str, str]]:
    """``(root index, root, path relative to root)`` for every ``*.py`` file, sorted by root then path.

    Skipped: hidden and ``__pycache__`` directories, ``site-packages``/``dist-packages`` and any other
    root nested inside a root (each file is listed once), ``*.dist-info``/``*.egg-info``, and with
    ``skip_tests`` test directories (``test``, ``tests``, ``test_*``, ``*_test(s)``) and test files
    (``test_*.py``, ``*_test.py``, ``conftest.py``). Symlinked directories are not followed.
    """
    real_roots = [os.path.realpath(r) for r in roots]
    out: list[tuple[int, str, str]] = []
    for ri, root in enumerate(roots):
        others = {r for j, r in enumerate(real_roots) if j != ri}
        if os.path.isfile(root):
            if root.endswith(".py"):
                out.append((ri, os.path.dirname(root) or ".", os.path.basename(root)))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            keep = []
            for d in dirnames:
                full = os.path.join(dirpath, d)
                if d.startswith(".") or d == "__pycache__" or d in ("site-packages", "dist-packages") \
                        or d.endswith(_SKIP_DIR_SUFFIXES) or (skip_tests and _is_test_dir(d)) \
                        or os.path.realpath(full) in others:
                    continue
                keep.append(d)
            dirnames[:] = sorted(keep)
            rel_dir = os.path.relpath(dirpath, root)
            for fn in filenames:
                if not fn.endswith(".py") or fn.startswith(".") or (skip_tests and _is_test_file(fn)):
                    continue
                rel = fn if rel_dir == "." else os.path.join(rel_dir, fn)
                out.append((ri, root, rel))
    out.sort(key=lambda t: (t[0], t[2]))
    return out


def group_of(relpath: str) -> str:
    """Split key of a file: the first path component relative to its root, ``.py`` stripped
    (``json/decoder.py -> json``, ``os.py -> os``)."""
    head = relpath.replace(os.sep, "/").split("/", 1)[0]
    return head[:-3] if head.endswith(".py") else head


def _select_files(files: list[tuple[int, str, str]], max_files: int | None) -> list[tuple[int, str, str]]:
    """All files, or the ``max_files`` with the smallest sha1 of their relative path (order kept)."""
    if max_files is None or len(files) <= max_files:
        return files
    ranked = sorted(range(len(files)), key=lambda i: (_unit_hash(files[i][2].replace(os.sep, "/")), i))
    keep = sorted(ranked[:max_files])
    return [files[i] for i in keep]


def _fingerprint(kind: str, settings: dict[str, Any], files: Iterable[str]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"kind": kind, "version": CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for p in files:
        try:
            st = os.stat(p)
            h.update(f"\n{p}\t{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", "surrogatepass"))
        except OSError:
            h.update(f"\n{p}\tmissing".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def content_fingerprint(records: Iterable[CodePair]) -> str:
    """sha1 of the records' ids, splits, duplicate groups, sources, names, queries and code: the same
    corpus gives the same value on any machine (no absolute paths or file times enter it)."""
    h = hashlib.sha1()
    for r in records:
        fields = (r.id, r.split, r.dup_group, r.source, r.func_name, r.group, r.query, r.document)
        h.update("\x1f".join(f"{len(str(x))}:{x}" for x in fields).encode("utf-8", "surrogatepass") + b"\x1e")
    return h.hexdigest()


def cached_build(kind: str, fingerprint: str, cache_dir: str | os.PathLike | None, use_cache: bool,
                 build: Callable[[], CodeSearchCorpus]) -> CodeSearchCorpus:
    """Load ``<cache>/<kind>-<fingerprint[:20]>.jsonl.gz`` if present and valid, else ``build()`` and save."""
    path = resolve_cache_dir(cache_dir) / f"{kind}-{fingerprint[:20]}.jsonl.gz"
    if use_cache and path.exists():
        try:
            corpus = CodeSearchCorpus.load(path)
        except CorpusError as e:
            log.warning("codesearch: %s; rebuilding", e)
        else:
            if corpus.fingerprint == fingerprint:
                log.info("codesearch: loaded cached corpus %s (%d records)", path, len(corpus))
                return corpus
            log.warning("codesearch: %s has fingerprint %s, expected %s; rebuilding", path, corpus.fingerprint, fingerprint)
    corpus = build()
    corpus.meta["fingerprint"] = fingerprint
    if use_cache:
        corpus.save(path)
        corpus.meta["cache_path"] = str(path)
        log.info("codesearch: cached corpus at %s", path)
    return corpus


def _extract_worker(path: str, min_query_words: int, min_code_lines: int, max_file_bytes: int | None) -> _extract.FileResult:
    return _extract.extract_file(path, min_query_words, min_code_lines, max_file_bytes)


def _run_extraction(jobs: Sequence[Any], worker: Callable[[Any], Any], workers: int, min_parallel: int = 64) -> list[Any]:
    """``[worker(j) for j in jobs]``, in order; in ``workers`` processes when there are at least
    ``min_parallel`` jobs (fork start method where available, so monkeypatched code applies too)."""
    if workers <= 1 or len(jobs) < min_parallel:
        return [worker(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        return list(ex.map(worker, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers)))))


def build_local_corpus(roots: str | Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                       max_files: int | None = DEFAULT_MAX_FILES, max_pairs: int | None = DEFAULT_MAX_PAIRS,
                       split_fractions: Sequence[float] = (0.8, 0.1, 0.1), min_query_words: int = 3,
                       min_code_lines: int = 3, skip_tests: bool = True,
                       max_file_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
                       max_group_pairs: int | None = DEFAULT_MAX_GROUP_PAIRS, split_method: str = "auto",
                       workers: int | None = None, use_cache: bool = True,
                       packages: dict[str, str] | None = None, stdlib: bool = True,
                       search_path: Sequence[str] | None = None) -> CodeSearchCorpus:
    """Build (or load from cache) the corpus of Python functions with docstrings under ``roots``.

    Args:
        roots: directories (or single ``.py`` files) to scan; default (``None``) the fixed source set of
            :func:`resolve_source_set`: the standard library plus the pinned ``packages``. Split groups are
            the first path component under each root (the top-level package or module).
        cache_dir: see :func:`default_cache_dir`.
        max_files: scan at most this many files, the ones with the smallest sha1 of their relative path
            (deterministic, spread over all packages); ``None`` = all.
        max_pairs: keep at most this many pairs (smallest sha1 of ``source|func_name``); ``None`` = all.
        split_fractions: (train, valid, test), see :func:`assign_splits`.
        min_query_words / min_code_lines: extraction filters (see :func:`~.extract.extract_pairs_from_text`).
        skip_tests: leave out test directories and files.
        max_file_bytes: skip larger files (generated tables); ``None`` = no limit.
        max_group_pairs: keep at most this many pairs per top-level package/module (see :func:`finalize`).
        split_method: ``"auto"`` | ``"hash"`` | ``"balanced"`` (see :func:`assign_splits`).
        workers: extraction processes (default ``min(4, cpu_count)``; small inputs run in-process).
        use_cache: read/write the on-disk cache.
        packages / stdlib / search_path: the default source set (used when ``roots`` is ``None``; see
            :func:`resolve_source_set`); ``packages`` defaults to :data:`DEFAULT_PACKAGES`.

    The corpus ``meta`` holds ``source_set`` (the default set's description, or the given roots) and
    ``content_fingerprint`` (sha1 of the records, independent of paths and file times: equal on two
    machines exactly when the corpora are equal).

    Raises:
        FileNotFoundError: a root does not exist. CorpusError: no Python file, no pair, or an empty split.
    """
    source_set: SourceSet | None = None
    if roots is None:
        source_set = resolve_source_set(packages, stdlib, search_path, skip_tests)
        roots = sorted({root for _, root, _ in source_set.files})
    else:
        if isinstance(roots, (str, os.PathLike)):
            roots = [os.fspath(roots)]
        roots = [os.path.abspath(os.path.expanduser(os.fspath(r))) for r in roots]
        if not roots:
            raise CorpusError("codesearch: no source roots given")
        for r in roots:
            if not os.path.exists(r):
                raise FileNotFoundError(f"codesearch source root {r!r} does not exist")
    if max_files is not None and max_files < 1 or max_pairs is not None and max_pairs < 1:
        raise CorpusError(f"max_files and max_pairs must be >= 1 or None; got {max_files}, {max_pairs}")
    check_fractions(split_fractions)
    if split_method not in SPLIT_METHODS:
        raise CorpusError(f"split_method must be one of {SPLIT_METHODS}; got {split_method!r}")
    t0 = time.perf_counter()
    if source_set is not None:
        all_files = source_set.files
        if not all_files:
            raise CorpusError(f"no Python (.py) file in the source set {source_set.summary()}")
        source_desc: Any = source_set.description
    else:
        all_files = list_source_files(roots, skip_tests)
        counts = Counter(ri for ri, _, _ in all_files)
        for ri, r in enumerate(roots):
            if not counts[ri]:
                log.warning("codesearch: source root %s contains no .py file", r)
        if not all_files:
            raise CorpusError(f"no Python (.py) files found under the source root(s) {roots}")
        source_desc = {"roots": roots}
    files = _select_files(all_files, max_files)
    abspaths = [os.path.join(root, rel) for _, root, rel in files]
    settings = {"roots": roots if source_set is None else None, "source_set": source_desc, "max_files": max_files, "max_pairs": max_pairs,
                "split_fractions": list(map(float, split_fractions)), "min_query_words": min_query_words,
                "min_code_lines": min_code_lines, "skip_tests": skip_tests, "max_file_bytes": max_file_bytes,
                "max_group_pairs": max_group_pairs, "split_method": split_method}
    fp = _fingerprint("local", settings, abspaths)

    def build() -> CodeSearchCorpus:
        n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        worker = functools.partial(_extract_worker, min_query_words=min_query_words,
                                   min_code_lines=min_code_lines, max_file_bytes=max_file_bytes)
        results = _run_extraction(abspaths, worker, n_workers)
        report = BadInputReport()
        skipped: Counter = Counter()
        items: list[Item] = []
        for (_, _, rel), path, res in zip(files, abspaths, results):
            if res.error is not None:
                reason, line, msg = res.error
                report.add(reason, f"{path}:{line}", msg)
                continue
            skipped.update(res.skipped)
            rel_posix = rel.replace(os.sep, "/")
            g = group_of(rel_posix)
            for p in res.pairs:
                items.append(Item(p.query, p.document, f"{rel_posix}:{p.line}", p.name, g, code_hash=p.code_hash))
        if report.total:
            log.warning("codesearch: %s", report.summary())
        stats: dict[str, Any] = {"files_found": len(all_files), "files_scanned": len(files),
                                 "skipped": dict(sorted(skipped.items()))}
        where = f"source set {source_set.summary()}" if source_set is not None else f"source roots {roots}"
        corpus = finalize(items, split_fractions, max_pairs, report, stats,
                          {"kind": "local", "settings": settings, "source_set": source_desc}, where=where,
                          max_group_pairs=max_group_pairs, split_method=split_method)
        corpus.meta["content_fingerprint"] = content_fingerprint(corpus.records())
        corpus.stats["build_seconds"] = round(time.perf_counter() - t0, 2)
        return corpus

    return cached_build("local", fp, cache_dir, use_cache, build)
