"""Mined-negative tables: the on-disk format, fingerprints, and the corpus-level sampler base classes.

Rows and ids
------------
Every sampler here works on the **training rows given to** :meth:`NegativeSampler.setup`: ``N`` rows,
row ``i`` holding one training pair with the item id ``pair_ids[i]`` and the duplicate group ``dup_group[i]``
(text samplers also read the row texts ``texts["anchor"][i]`` / ``texts["candidate"][i]``) (equal non-negative groups are known
duplicates; a negative group means "no known duplicate"). Negatives are **row positions** ``0..N-1``
into that corpus (``-1`` = none); a collate turns them into documents and ``pair_id`` / ``dup_group``.

Mined-table format (``.npz``, version 1)
----------------------------------------
One uncompressed NumPy ``.npz`` file (``numpy.load(path, allow_pickle=False)`` reads it), written
atomically (temp file + ``os.replace``), plus a human-readable copy of its header at ``path + ".json"``
(informational; the header inside the ``.npz`` is authoritative). Arrays:

=========================  ===========  ========================================================================
key                        shape/dtype  meaning
=========================  ===========  ========================================================================
``query_rows``             (Q,) int64   training rows whose negatives were mined (usually ``arange(N)``)
``neg_rows``               (Q, k) int64 their negatives as training rows, best first, ``-1`` padding at the end
``scores``                 (Q, k) f32   query-negative scores under the mining model; NaN at padding or when
                                        unknown (random top-up, random sampler)
``positive_scores``        (Q,) f32     query-positive score (NaN when unknown)
``pair_ids``               (N,) int64   corpus id of every training row (``neg_rows`` → corpus ids)
``dup_group``              (N,) int64   duplicate group of every training row
``header``                 (B,) uint8   UTF-8 JSON header (below)
``extra_<name>``           any          optional arrays, e.g. ``extra_before_neg_rows`` / ``extra_before_scores``
                                        (what would have been mined without duplicate exclusion and the
                                        false-negative filters, for the quality report) or NGAME's
                                        ``extra_cluster_order`` / ``extra_cluster_sizes``
=========================  ===========  ========================================================================

Header keys: ``format`` (``"contrastive.negatives"``), ``version`` (1), ``key`` (cache key, below),
``config_fingerprint``, ``checkpoint`` (``{"global_step", "state_hash"}`` of the model that mined it, or
``null`` for model-free samplers), ``sampler`` (``{"name", "settings"}``), ``corpus``
(``{"size", "fingerprint"}``), ``num_queries``, ``num_negatives``, ``created`` (UTC ISO-8601), ``stats``
(the mining statistics) and free-form ``info``.

Cache key: ``sha1(config_fingerprint + checkpoint fingerprint)[:16]``; the config fingerprint covers the
sampler's settings, the training corpus and the tokenisation settings, the checkpoint fingerprint the
global step and a hash of every model tensor. A resumed run that reaches the same refresh with the same
weights finds the same key and reloads the table instead of re-mining (ANCE semantics: a table mined by
one checkpoint is used until the next refresh, methods.md §B7.4).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from contrastive.filters.functional import rowwise_isin
from contrastive.io import atomic_write
from contrastive.samplers.base import NegativeSampler

TABLE_FORMAT = "contrastive.negatives"
TABLE_VERSION = 1
_REQUIRED = ("query_rows", "neg_rows", "scores", "positive_scores", "pair_ids", "dup_group", "header")


class TableFileError(ValueError):
    """A mined-table file that cannot be read: missing, corrupt, foreign, or not matching the corpus."""


# ------------------------------------------------------------------------------------------ fingerprints
def fingerprint(obj: Any) -> str:
    """Stable 16-hex-digit sha1 of a JSON-serialisable object (keys sorted; unknown types via ``str``)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha1(blob).hexdigest()[:16]


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha1 of every tensor of ``module.state_dict()`` (names, dtypes, shapes and bytes), 16 hex digits.

    Two modules with bit-identical weights and buffers get the same fingerprint; any change of any
    tensor changes it. Costs one pass over the weights (copied to the CPU).
    """
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_fingerprint(module: torch.nn.Module, global_step: int) -> dict[str, Any]:
    """``{"global_step", "state_hash"}`` identifying the weights a table is mined with."""
    return {"global_step": int(global_step), "state_hash": model_fingerprint(module)}


def table_key(config_fp: str, checkpoint_fp: Optional[Mapping[str, Any]]) -> str:
    """The cache key of a table: ``sha1(config fingerprint, checkpoint fingerprint)[:16]``."""
    return fingerprint({"config": config_fp, "checkpoint": dict(checkpoint_fp) if checkpoint_fp else None})


def atomic_write_json(path: Union[str, os.PathLike], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file + ``os.replace``)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)

    atomic_write(Path(path), write)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Tensor) and o.numel() == 1:
        return o.item()
    return str(o)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ the table
@dataclass
class MinedTable:
    """Mined negatives of ``Q`` training queries (see the module docstring for the file format).

    Attributes:
        query_rows: ``(Q,)`` long training rows of the queries.
        neg_rows: ``(Q, k)`` long negatives as training rows, best first, ``-1`` padding.
        scores: ``(Q, k)`` float32 query–negative scores, NaN at padding / unknown.
        positive_scores: ``(Q,)`` float32 query–positive scores, NaN when unknown.
        pair_ids: ``(N,)`` long corpus id of every training row.
        dup_group: ``(N,)`` long duplicate group of every training row.
        header: JSON-serialisable metadata.
        extras: optional named arrays (``before_neg_rows``, ``before_scores``, ``cluster_order``, ...).
    """

    query_rows: Tensor
    neg_rows: Tensor
    scores: Tensor
    positive_scores: Tensor
    pair_ids: Tensor
    dup_group: Tensor
    header: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.query_rows = torch.as_tensor(self.query_rows).long()
        self.neg_rows = torch.as_tensor(self.neg_rows).long()
        self.scores = torch.as_tensor(self.scores).float()
        self.positive_scores = torch.as_tensor(self.positive_scores).float()
        self.pair_ids = torch.as_tensor(self.pair_ids).long()
        self.dup_group = torch.as_tensor(self.dup_group).long()
        self.check()

    @property
    def num_rows(self) -> int:
        return int(self.pair_ids.shape[0])

    @property
    def num_negatives(self) -> int:
        return int(self.neg_rows.shape[1])

    def check(self) -> None:
        """Raise :class:`TableFileError` when shapes or row ranges are inconsistent."""
        q = self.query_rows.shape[0]
        n = self.pair_ids.shape[0]
        if self.query_rows.dim() != 1 or self.neg_rows.dim() != 2 or self.neg_rows.shape[0] != q:
            raise TableFileError(f"mined table: query_rows must be (Q,) and neg_rows (Q, k); got "
                                 f"{tuple(self.query_rows.shape)} and {tuple(self.neg_rows.shape)}")
        if tuple(self.scores.shape) != tuple(self.neg_rows.shape):
            raise TableFileError(f"mined table: scores {tuple(self.scores.shape)} must match neg_rows {tuple(self.neg_rows.shape)}")
        if tuple(self.positive_scores.shape) != (q,):
            raise TableFileError(f"mined table: positive_scores must be (Q,) = ({q},); got {tuple(self.positive_scores.shape)}")
        if tuple(self.dup_group.shape) != (n,):
            raise TableFileError(f"mined table: dup_group must be (N,) = ({n},); got {tuple(self.dup_group.shape)}")
        for name, t in (("query_rows", self.query_rows), ("neg_rows", self.neg_rows)):
            if t.numel() and (int(t.max()) >= n or (name == "query_rows" and int(t.min()) < 0)):
                raise TableFileError(f"mined table: {name} holds rows outside [0, {n}) (corpus of {n} rows)")

    def lookup(self) -> Tensor:
        """``(N, k)`` long: the negatives of every training row, ``-1`` for rows that were not mined."""
        out = torch.full((self.num_rows, self.num_negatives), -1, dtype=torch.long)
        out[self.query_rows] = self.neg_rows
        return out

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the ``.npz`` atomically, then its JSON header copy at ``path + '.json'``; returns ``path``."""
        path = Path(path)
        header = {"format": TABLE_FORMAT, "version": TABLE_VERSION, **self.header}
        header.setdefault("created", utc_now())
        header["num_queries"] = int(self.query_rows.shape[0])
        header["num_negatives"] = self.num_negatives
        self.header = header
        arrays = {
            "query_rows": self.query_rows.numpy(),
            "neg_rows": self.neg_rows.numpy(),
            "scores": self.scores.numpy(),
            "positive_scores": self.positive_scores.numpy(),
            "pair_ids": self.pair_ids.numpy(),
            "dup_group": self.dup_group.numpy(),
            "header": np.frombuffer(json.dumps(header, sort_keys=True, default=_json_default).encode(), dtype=np.uint8),
        }
        for name, t in self.extras.items():
            arrays[f"extra_{name}"] = torch.as_tensor(t).numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)
        atomic_write_json(str(path) + ".json", header)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], expected_key: Optional[str] = None,
             expected_rows: Optional[int] = None) -> "MinedTable":
        """Read a table written by :meth:`save`; raise :class:`TableFileError` naming the file on any problem.

        Args:
            expected_key: raise unless the header's ``key`` equals it (a cache hit must be the same table).
            expected_rows: raise unless the table covers a corpus of this many training rows.
        """
        path = Path(path)
        if not path.is_file():
            raise TableFileError(f"mined table {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile / numpy raise many types for a truncated or foreign file
            raise TableFileError(f"mined table {path} is corrupt or not an .npz file ({e})") from None
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise TableFileError(f"mined table {path} lacks the arrays {missing} (not a {TABLE_FORMAT} file?)")
        try:
            header = json.loads(bytes(data["header"].astype(np.uint8)).decode())
        except ValueError as e:
            raise TableFileError(f"mined table {path}: corrupt header ({e})") from None
        if header.get("format") != TABLE_FORMAT:
            raise TableFileError(f"mined table {path}: header format is {header.get('format')!r}, not {TABLE_FORMAT!r}")
        if int(header.get("version", 0)) > TABLE_VERSION:
            raise TableFileError(f"mined table {path}: format version {header['version']} is newer than {TABLE_VERSION}")
        if expected_key is not None and header.get("key") != expected_key:
            raise TableFileError(f"mined table {path}: key {header.get('key')!r} != expected {expected_key!r}")
        extras = {k[len("extra_"):]: torch.from_numpy(np.array(v)) for k, v in data.items() if k.startswith("extra_")}
        table = cls(
            query_rows=torch.from_numpy(np.array(data["query_rows"])),
            neg_rows=torch.from_numpy(np.array(data["neg_rows"])),
            scores=torch.from_numpy(np.array(data["scores"])),
            positive_scores=torch.from_numpy(np.array(data["positive_scores"])),
            pair_ids=torch.from_numpy(np.array(data["pair_ids"])),
            dup_group=torch.from_numpy(np.array(data["dup_group"])),
            header=header,
            extras=extras,
        )
        if expected_rows is not None and table.num_rows != expected_rows:
            raise TableFileError(f"mined table {path} covers {table.num_rows} training rows, but the corpus has {expected_rows}")
        return table


# ------------------------------------------------------------------------------------------ hashing RNG
_M64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014) on uint64 arrays: a counter-based hash whose outputs
    are uniform 64-bit integers, so draws depend only on their key, not on call order or worker process."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hashed_randint(keys: Sequence[int], rows: Tensor, counters: Tensor, high: int) -> Tensor:
    """Uniform integers in ``[0, high)`` keyed by ``(keys..., row, counter)``: ``(B,)`` rows x ``(m,)``
    counters → ``(B, m)`` long. Deterministic and independent of process, call order and batch layout."""
    h = np.uint64(0)
    for k in keys:
        h = _splitmix64(np.asarray(h ^ np.uint64(int(k) & _M64), dtype=np.uint64))
    r = rows.cpu().numpy().astype(np.uint64)
    c = counters.cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        hr = _splitmix64(h + r * np.uint64(0xD1B54A32D192ED03))
        z = _splitmix64(hr[:, None] + c[None, :] * np.uint64(0x9E3779B97F4A7C15))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return torch.from_numpy(np.minimum((u * high).astype(np.int64), high - 1))


# ------------------------------------------------------------------------------------------ samplers
class CorpusSampler(NegativeSampler):
    """Base of the samplers that draw negatives from the training corpus (random, BM25, FAISS, NGAME).

    :meth:`setup` stores the corpus, validates ``num_negatives`` against it and indexes the duplicate
    groups; :meth:`draw_random` draws uniform negatives that are never the row itself nor (with
    ``exclude_duplicates``) a known duplicate of it.

    Args:
        num_negatives: extra negatives per training pair.
        exclude_duplicates: never return a row of the query's duplicate group (known false negatives).
        seed: seed of every random choice of the sampler.
    """

    #: registry name, used in error messages
    name: str = "corpus"

    def __init__(self, num_negatives: int = 0, exclude_duplicates: bool = True, seed: int = 0) -> None:
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
            raise ValueError(f"sampler.num_negatives must be an integer; got {num_negatives!r}")
        super().__init__(num_negatives=num_negatives)
        self.exclude_duplicates = bool(exclude_duplicates)
        self.seed = int(seed)
        self.texts: dict[str, list[str]] = {}
        self.pair_ids: Optional[Tensor] = None
        self.dup_group: Optional[Tensor] = None
        self._group_key: Optional[Tensor] = None
        self._corpus_fp: Optional[str] = None

    # -- corpus -------------------------------------------------------------------------------------
    @property
    def is_setup(self) -> bool:
        return self.pair_ids is not None

    @property
    def num_rows(self) -> int:
        self._check_ready()
        return int(self.pair_ids.shape[0])

    def setup(self, ids: Tensor, groups: Optional[Tensor] = None,
              texts: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        pair_ids = torch.as_tensor(ids).long().cpu().view(-1)
        n = pair_ids.shape[0]
        if n == 0:
            raise ValueError(f"sampler {self.name!r}: the training corpus is empty (setup got 0 rows)")
        if torch.unique(pair_ids).numel() != n:
            raise ValueError(f"sampler {self.name!r}: the row ids must be unique within the training corpus")
        groups = pair_ids.clone() if groups is None else torch.as_tensor(groups).long().cpu().view(-1)
        if groups.shape[0] != n:
            raise ValueError(f"sampler {self.name!r}: groups has {groups.shape[0]} entries for {n} rows")
        texts = {k: list(v) for k, v in (texts or {}).items()}
        for side, t in texts.items():
            if side not in ("anchor", "candidate"):
                raise ValueError(f"sampler {self.name!r}: texts keys must be 'anchor' / 'candidate'; got {side!r}")
            if len(t) != n:
                raise ValueError(f"sampler {self.name!r}: {len(t)} {side} texts for {n} rows")
        if self.num_negatives > n - 1:
            raise ValueError(
                f"sampler {self.name!r}: num_negatives={self.num_negatives} is larger than the {n - 1} other "
                f"records of the training corpus ({n} records); lower num_negatives"
            )
        self.texts = texts
        self.pair_ids, self.dup_group = pair_ids, groups
        # a comparison key: equal iff same non-negative group; ungrouped rows get unique keys
        top = int(groups.max().clamp_min(0)) + 1
        self._group_key = torch.where(groups >= 0, groups, top + torch.arange(n))
        order = torch.argsort(self._group_key, stable=True)
        sorted_keys = self._group_key[order]
        starts = torch.searchsorted(sorted_keys, self._group_key)
        ends = torch.searchsorted(sorted_keys, self._group_key, right=True)
        self._group_order, self._group_start, self._group_size = order, starts, ends - starts
        self._corpus_fp = None

    def row_texts(self, side: str) -> list[str]:
        """The texts of every row on ``side`` (``"anchor"`` / ``"candidate"``), for text samplers."""
        if side not in self.texts:
            raise ValueError(f"sampler {self.name!r} reads text: its datamodule must pass texts={{'anchor': ..., "
                             f"'candidate': ...}} to setup (got {sorted(self.texts) or 'none'})")
        return self.texts[side]

    def _check_ready(self) -> None:
        if self.pair_ids is None:
            raise RuntimeError(f"sampler {self.name!r}: setup() was not called (the datamodule passes it the "
                               "training corpus in its setup('fit'))")

    def corpus_fingerprint(self) -> str:
        """sha1 over the row ids, duplicate groups and (when given) texts (16 hex digits)."""
        self._check_ready()
        if self._corpus_fp is None:
            h = hashlib.sha1()
            h.update(self.pair_ids.numpy().tobytes())
            h.update(self.dup_group.numpy().tobytes())
            if self.texts:
                for q, d in zip(self.texts.get("anchor", [""] * self.num_rows),
                                self.texts.get("candidate", [""] * self.num_rows)):
                    h.update(q.encode("utf-8", "replace") + b"\0" + d.encode("utf-8", "replace") + b"\1")
            self._corpus_fp = h.hexdigest()[:16]
        return self._corpus_fp

    @property
    def max_group_size(self) -> int:
        self._check_ready()
        return int(self._group_size.max())

    def duplicate_rows(self, rows: Tensor) -> Tensor:
        """``(B, S)`` long: the other rows of each row's duplicate group, ``-1`` padded (``S`` may be 0)."""
        self._check_ready()
        rows = torch.as_tensor(rows).long().view(-1)
        size = self._group_size[rows]
        width = int(size.max()) if rows.numel() else 0
        if width <= 1:
            return torch.full((rows.shape[0], 0), -1, dtype=torch.long)
        j = torch.arange(width)
        idx = (self._group_start[rows, None] + j).clamp(max=self.num_rows - 1)
        out = torch.where(j < size[:, None], self._group_order[idx], torch.full_like(idx, -1))
        return torch.where(out == rows[:, None], torch.full_like(out, -1), out)

    def same_group(self, rows: Tensor, others: Tensor) -> Tensor:
        """``others.shape`` bool: ``others[b, j]`` is row ``rows[b]`` itself or a known duplicate of it
        (``-1`` entries are False)."""
        self._check_ready()
        safe = others.clamp_min(0)
        return (self._group_key[safe] == self._group_key[rows].view(-1, *([1] * (others.dim() - 1)))) & (others >= 0)

    # -- random draws -------------------------------------------------------------------------------
    def draw_random(self, rows: Tensor, k: int, avoid: Optional[Tensor] = None, salt: int = 0,
                    max_attempts: int = 8) -> Tensor:
        """``(B, k)`` uniform random negatives for ``rows`` ``(B,)``, without repeats, ``-1`` when too few.

        A candidate is rejected when it is the row itself, a known duplicate (with ``exclude_duplicates``),
        one of ``avoid[b]`` ``(B, t)`` (``-1`` padded) or already drawn. Draws are a counter-based hash
        of ``(seed, epoch, salt, row, draw index)``, so a row's negatives do not depend on its batch-mates
        or on the worker process that draws them.
        """
        self._check_ready()
        rows = torch.as_tensor(rows).long().view(-1)
        b, n = rows.shape[0], self.num_rows
        out = torch.full((b, k), -1, dtype=torch.long)
        if b == 0 or k == 0:
            return out
        count = torch.zeros(b, dtype=torch.long)
        m = 2 * k + 8
        earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)
        for attempt in range(max_attempts):
            need = (count < k).nonzero().flatten()
            if need.numel() == 0:
                break
            sub = rows[need]
            cand = hashed_randint((self.seed, self.epoch, salt), sub, torch.arange(attempt * m, (attempt + 1) * m), n)
            if self.exclude_duplicates:
                ok = ~self.same_group(sub, cand)
            else:
                ok = cand != sub[:, None]
            taken = out[need] if avoid is None else torch.cat([out[need], torch.as_tensor(avoid).long()[need]], dim=1)
            ok &= ~rowwise_isin(cand, taken)
            ok &= ~((cand[:, :, None] == cand[:, None, :]) & earlier).any(dim=2)
            rank = ok.long().cumsum(dim=1) - 1
            take = ok & (rank < (k - count[need])[:, None])
            bi, ci = take.nonzero(as_tuple=True)
            out[need[bi], count[need][bi] + rank[bi, ci]] = cand[bi, ci]
            count[need] += take.sum(dim=1)
        return out

    # -- description --------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor settings that change what is mined (for the table header and cache key)."""
        return {"num_negatives": self.num_negatives, "exclude_duplicates": self.exclude_duplicates, "seed": self.seed}

    def cache_context(self) -> dict[str, Any]:
        """Extra state that changes what a refresh would mine (e.g. NGAME's cluster size at this epoch)."""
        return {}


class TableSampler(CorpusSampler):
    """A sampler that serves a :class:`MinedTable`: :meth:`sample` looks each row up in the table.

    Before a table exists, :meth:`sample` uses :meth:`warmup_sample` (subclasses: random or BM25
    negatives, or none). :meth:`set_table` installs a table (freshly mined, or loaded from the cache).
    """

    def __init__(self, num_negatives: int = 0, exclude_duplicates: bool = True, seed: int = 0) -> None:
        super().__init__(num_negatives=num_negatives, exclude_duplicates=exclude_duplicates, seed=seed)
        self.table: Optional[MinedTable] = None
        self._lookup: Optional[Tensor] = None

    def set_table(self, table: MinedTable) -> None:
        """Install ``table`` (checked against the corpus); :meth:`sample` reads it from now on."""
        self._check_ready()
        if table.num_rows != self.num_rows:
            raise TableFileError(f"sampler {self.name!r}: the table covers {table.num_rows} training rows, "
                                 f"the corpus has {self.num_rows}")
        if not torch.equal(table.pair_ids, self.pair_ids):
            raise TableFileError(f"sampler {self.name!r}: the table was mined on another training corpus "
                                 "(its pair_ids differ)")
        self.table = table
        lookup = table.lookup()
        k = self.num_negatives
        if lookup.shape[1] < k:
            lookup = torch.cat([lookup, lookup.new_full((lookup.shape[0], k - lookup.shape[1]), -1)], dim=1)
        self._lookup = lookup[:, :k].contiguous()

    def mined_table(self) -> Optional[MinedTable]:
        return self.table

    def warmup_sample(self, rows: Tensor) -> Tensor:
        """Negatives before the first table: none (``-1``); subclasses override."""
        return torch.full((rows.shape[0], self.num_negatives), -1, dtype=torch.long)

    def sample(self, rows: Tensor) -> Tensor:
        rows = torch.as_tensor(rows).long().view(-1)
        if self._lookup is None:
            return self.warmup_sample(rows)
        return self._lookup[rows]


# ------------------------------------------------------------------------------------------ mining
def _sum_stats(total: dict[str, float], part: Mapping[str, Any]) -> None:
    for k, v in part.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "short_fraction":
            total[k] = total.get(k, 0) + v


def mine_table(
    sampler: CorpusSampler,
    scores: Tensor,
    candidate_rows: Tensor,
    query_rows: Tensor,
    positive_scores: Optional[Tensor],
    *,
    mining: Any,
    filters: Optional[Any] = None,
    seed: int = 0,
    fill_random: bool = False,
    anchor_embeddings: Optional[Tensor] = None,
    corpus_embeddings: Optional[Tensor] = None,
    chunk_size: int = 8192,
) -> tuple[MinedTable, dict[str, float]]:
    """Turn retrieval candidates into a :class:`MinedTable` with the mining controls and filters.

    For each query row ``r`` (positive: document row ``r``):

    1. **before** (for the quality report only): :func:`~contrastive.samplers.mining.select_negatives`
       with the positive removed but *no* duplicate exclusion and *no* false-negative filter;
    2. the false-negative ``filters`` (a :class:`~contrastive.filters.FilterChain`) flag candidates,
       which are dropped **before** the rank window, like the excluded ids (so ``range_min`` counts
       trusted candidates only);
    3. **after**: ``select_negatives`` with the query's known duplicates as ``exclude_ids`` (when
       ``sampler.exclude_duplicates``), the same controls and the same random stream;
    4. with ``fill_random``, rows left short are topped up with uniform random negatives (never the
       positive or a known duplicate; score NaN), as FlagEmbedding's miner does.

    Args:
        sampler: the set-up sampler (corpus, groups, seed).
        scores: ``(Q, K)`` float query–candidate scores (NaN / ``-inf`` padding).
        candidate_rows: ``(Q, K)`` long candidate document rows (``-1`` padding).
        query_rows: ``(Q,)`` long query rows.
        positive_scores: ``(Q,)`` float query–positive scores, or ``None`` (margins then unavailable).
        mining: the :class:`~contrastive.samplers.mining.MiningSettings`.
        filters: a ``FilterChain`` or ``None``.
        seed: seed of the ``"random"`` / ``"softmax"`` sampling.
        anchor_embeddings, corpus_embeddings: ``(Q, d)`` / ``(N, d)`` for embedding-based filters.
        chunk_size: queries per block (bounds memory).

    Returns:
        ``(table, stats)``; ``table.header`` is empty (the caller fills it).
    """
    from contrastive.filters import FilterContext
    from contrastive.samplers.mining import select_negatives

    sampler._check_ready()
    query_rows = torch.as_tensor(query_rows).long().view(-1)
    q = query_rows.shape[0]
    if scores.dim() != 2 or scores.shape[0] != q or tuple(candidate_rows.shape) != tuple(scores.shape):
        raise ValueError(f"mine_table: scores {tuple(scores.shape)} and candidate_rows {tuple(candidate_rows.shape)} "
                         f"must both be (Q, K) with Q = {q}")
    scores = scores.detach().float().cpu()
    candidate_rows = candidate_rows.long().cpu()
    pos = None if positive_scores is None else torch.as_tensor(positive_scores).detach().float().cpu().view(-1)
    k = int(mining.num_negatives)
    strict = bool(mining.strict)
    settings = dataclasses.replace(mining, strict=False)
    gen_before = torch.Generator().manual_seed(int(seed))
    gen_after = torch.Generator().manual_seed(int(seed))
    out_ids, out_scores, before_ids, before_scores = [], [], [], []
    stats: dict[str, float] = {}
    filter_removed: dict[str, float] = {}
    filter_total = 0
    for start in range(0, q, chunk_size):
        sl = slice(start, start + chunk_size)
        s, c, r = scores[sl], candidate_rows[sl], query_rows[sl]
        p = None if pos is None else pos[sl]
        before = select_negatives(s, c, r, p, settings, generator=gen_before)
        before_ids.append(before.ids)
        before_scores.append(before.scores)
        cand = c
        if filters is not None and len(filters):
            ctx = FilterContext(
                scores=s, candidate_ids=c, positive_ids=r.view(-1, 1),
                positive_scores=None if p is None else p.view(-1, 1), anchor_ids=r,
                dup_group=sampler.dup_group,
                corpus_embeddings=corpus_embeddings,
                anchor_embeddings=None if anchor_embeddings is None else anchor_embeddings[sl],
            )
            res = filters.apply(ctx)
            cand = torch.where(res.false_negative_mask, torch.full_like(c, -1), c)
            for name, v in res.removed.items():
                filter_removed[name] = filter_removed.get(name, 0) + v
            filter_total += res.total_removed
        excl = sampler.duplicate_rows(r) if sampler.exclude_duplicates else None
        after = select_negatives(s, cand, r, p, settings, generator=gen_after, exclude_ids=excl)
        _sum_stats(stats, after.stats)
        out_ids.append(after.ids)
        out_scores.append(after.scores)
    neg = torch.cat(out_ids)
    neg_scores = torch.cat(out_scores)
    counts = (neg >= 0).sum(dim=1)
    if strict and bool((counts < k).any()):
        short = (counts < k).nonzero().flatten()
        raise ValueError(
            f"sampler {sampler.name!r} (strict=True): {len(short)} of {q} queries got fewer than num_negatives={k} "
            f"negatives (query row {int(query_rows[short[0]])} got {int(counts[short[0]])}) with "
            f"range_min={mining.range_min}, range_max={mining.range_max} over "
            f"K={scores.shape[1]} candidates; removed: "
            f"{ {kk: v for kk, v in stats.items() if kk.startswith('removed_') and v} }, filters: {filter_removed}. "
            "Widen [range_min, range_max), lower num_negatives, relax the margins/filters or set strict=false."
        )
    filled = 0
    if fill_random and bool((counts < k).any()):
        short = (counts < k).nonzero().flatten()
        extra = sampler.draw_random(query_rows[short], k, avoid=neg[short], salt=0x5EED)
        merged = torch.cat([neg[short], extra], dim=1)
        merged_s = torch.cat([neg_scores[short], torch.full(extra.shape, float("nan"))], dim=1)
        real = merged >= 0
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :k]
        neg[short] = merged.gather(1, order)
        neg_scores[short] = merged_s.gather(1, order)
        filled = int((neg[short] >= 0).sum() - counts[short].sum())
        counts = (neg >= 0).sum(dim=1)
    neg_scores = torch.where((neg >= 0) & torch.isfinite(neg_scores), neg_scores, torch.full_like(neg_scores, float("nan")))
    b_ids, b_scores = torch.cat(before_ids), torch.cat(before_scores)
    b_scores = torch.where((b_ids >= 0) & torch.isfinite(b_scores), b_scores, torch.full_like(b_scores, float("nan")))
    stats["queries"] = float(q)
    stats["selected"] = float(counts.sum())
    stats["filled_random"] = float(filled)
    stats["queries_short"] = float((counts < k).sum())
    stats["short_fraction"] = float((counts < k).float().mean()) if q else 0.0
    stats["filter_removed"] = float(filter_total)
    for name, v in filter_removed.items():
        stats[f"filter_removed/{name}"] = float(v)
    table = MinedTable(
        query_rows=query_rows, neg_rows=neg, scores=neg_scores,
        positive_scores=pos if pos is not None else torch.full((q,), float("nan")),
        pair_ids=sampler.pair_ids, dup_group=sampler.dup_group,
        extras={"before_neg_rows": b_ids, "before_scores": b_scores.float()},
    )
    return table, {k2: float(v) for k2, v in stats.items()}


# ------------------------------------------------------------------------------------------ settings
def resolve_filters(filters: Optional[Sequence[Any]], setting: str = "sampler.filters") -> Optional[Any]:
    """A :class:`~contrastive.filters.FilterChain` of ``NegativeFilter`` objects, or ``None`` if empty
    (YAML specs are built by :func:`contrastive.build.build_sampler`)."""
    if not filters:
        return None
    from contrastive.filters import FilterChain, NegativeFilter

    for i, f in enumerate(filters):
        if not isinstance(f, NegativeFilter):
            raise TypeError(f"{setting}[{i}] must be a NegativeFilter (build YAML specs with "
                            f"contrastive.build.build_filters); got {type(f).__name__}")
    return FilterChain(list(filters))


def checked_mining(mining: Any, sampler_name: str) -> Any:
    """``mining`` (:class:`~contrastive.samplers.mining.MiningSettings`) after the sampler-level check:
    with ``strict``, a window narrower than ``num_negatives`` is rejected up front."""
    if mining.strict and mining.range_max is not None and mining.range_max - mining.range_min < mining.num_negatives:
        raise ValueError(
            f"sampler {sampler_name!r}: the rank window [range_min={mining.range_min}, range_max={mining.range_max}) "
            f"holds {mining.range_max - mining.range_min} candidates, fewer than num_negatives={mining.num_negatives} "
            "(strict=true); widen the window or lower num_negatives"
        )
    return mining


def candidate_depth(mining: Any, num_rows: int, max_group_size: int, slack: int,
                    filtered: bool, sampler_name: str) -> int:
    """How many candidates to retrieve per query so that the rank window survives the removals.

    ``range_max`` (or, when unset, ``range_min + num_negatives``, times 10 when score controls or
    filters will remove candidates, as sentence-transformers does) plus the positive and its known
    duplicates (``max_group_size``) plus ``slack``; capped at the corpus size ``N``. A ``range_max``
    beyond the ``N - 1`` non-positive documents raises, naming it.
    """
    rmin, rmax, k = int(mining.range_min), mining.range_max, int(mining.num_negatives)
    if rmax is not None and rmax > num_rows - 1:
        raise ValueError(
            f"sampler {sampler_name!r}: range_max={rmax} is larger than the {num_rows - 1} non-positive documents "
            f"of the training corpus ({num_rows} records); lower range_max"
        )
    if rmin > num_rows - 1 - k:
        raise ValueError(
            f"sampler {sampler_name!r}: range_min={rmin} skips too many of the {num_rows - 1} non-positive documents "
            f"to leave num_negatives={k}; lower range_min"
        )
    scored = any(v is not None for v in (mining.absolute_margin, mining.relative_margin, mining.max_score,
                                         mining.min_score))
    width = int(rmax) if rmax is not None else rmin + k * (10 if (scored or filtered) else 1)
    return max(1, min(num_rows, width + max_group_size + int(slack)))
