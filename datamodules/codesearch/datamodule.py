"""``CodeSearchDataModule``: (docstring summary -> code) retrieval pairs, the project's default dataset.

Batches (train, valid and test alike) are dicts of

- ``query_ids`` LongTensor ``(B, Lq)`` and ``query_mask`` BoolTensor ``(B, Lq)`` (True = real token),
  ``Lq <= max_query_length``, ``[CLS]`` first, right-padded with ``[PAD]`` = 0 to the longest in the batch;
- ``doc_ids`` LongTensor ``(B, Ld)`` and ``doc_mask`` BoolTensor ``(B, Ld)``, ``Ld <= max_doc_length``;
- ``pair_id`` LongTensor ``(B,)``: the record's global id in :attr:`CodeSearchDataModule.corpus`;
- ``dup_group`` LongTensor ``(B,)``: duplicate-group id; rows with equal ids are known false negatives.

Each split is tokenized once (and cached on disk next to the corpus); collation only pads.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from contrastive.encoders.tokenizer import BPETokenizer
from contrastive.io import atomic_write
from contrastive.registry import DATAMODULES
from datamodules.codesearch.corpus import (
    DEFAULT_MAX_FILES, DEFAULT_MAX_GROUP_PAIRS, DEFAULT_MAX_PAIRS, SPLIT_METHODS, SPLITS, CodePair,
    CodeSearchCorpus, CorpusError, build_local_corpus, check_fractions, resolve_cache_dir,
)
from datamodules.codesearch.jsonl import build_jsonl_corpus

log = logging.getLogger("datamodules.codesearch")

__all__ = ["CodeSearchDataModule", "PackedSequences", "PairDataset", "PairCollate", "TextCollate"]


class PackedSequences:
    """Variable-length id sequences stored flat: ``values`` int32 ``(total,)``, ``offsets`` int64 ``(N + 1,)``."""

    def __init__(self, values: Tensor, offsets: Tensor) -> None:
        self.values, self.offsets = values, offsets

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "PackedSequences":
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = [i for s in seqs for i in s]
        return cls(torch.tensor(flat, dtype=torch.int32), offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def pad(self, rows: Sequence[int], pad_id: int = 0) -> tuple[Tensor, Tensor]:
        """``ids`` LongTensor ``(B, L)`` and ``mask`` BoolTensor ``(B, L)`` for ``rows``, ``L`` = longest."""
        starts = self.offsets[list(rows)]
        lens = self.offsets[[r + 1 for r in rows]] - starts
        length = max(int(lens.max()) if len(rows) else 1, 1)
        ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
            ids[i, :n] = self.values[s:s + n]
        mask = torch.arange(length)[None, :] < lens[:, None]
        return ids, mask


class PairDataset(Dataset):
    """Tokenized pairs of one split; item ``i`` is just ``i`` (the collate function gathers the rows).

    Attributes:
        queries / docs: :class:`PackedSequences` of token ids (``[CLS]`` first, truncated).
        pair_ids / dup_groups: LongTensor ``(N,)``.
    """

    def __init__(self, queries: PackedSequences, docs: PackedSequences, pair_ids: Tensor, dup_groups: Tensor) -> None:
        if not (len(queries) == len(docs) == pair_ids.numel() == dup_groups.numel()):
            raise ValueError("PairDataset: queries, docs, pair_ids and dup_groups must have the same length")
        self.queries, self.docs, self.pair_ids, self.dup_groups = queries, docs, pair_ids, dup_groups

    def __len__(self) -> int:
        return self.pair_ids.numel()

    def __getitem__(self, i: int) -> int:
        return int(i)


class PairCollate:
    """Collate a list of row indices of a :class:`PairDataset` into the batch dict (module docstring)."""

    def __init__(self, dataset: PairDataset, pad_id: int = 0) -> None:
        self.dataset, self.pad_id = dataset, pad_id

    def __call__(self, rows: list[int]) -> dict[str, Tensor]:
        d = self.dataset
        q_ids, q_mask = d.queries.pad(rows, self.pad_id)
        d_ids, d_mask = d.docs.pad(rows, self.pad_id)
        idx = torch.as_tensor(rows, dtype=torch.long)
        return {"query_ids": q_ids, "query_mask": q_mask, "doc_ids": d_ids, "doc_mask": d_mask,
                "pair_id": d.pair_ids[idx], "dup_group": d.dup_groups[idx]}


class _TextDataset(Dataset):
    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]


class TextCollate:
    """Tokenize a list of texts into ``{"ids": LongTensor (B, L), "mask": BoolTensor (B, L)}``."""

    def __init__(self, tokenizer: BPETokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        ids, mask = self.tokenizer.encode_batch(texts, self.max_length)
        return {"ids": ids, "mask": mask}


@DATAMODULES.register("codesearch")
class CodeSearchDataModule(L.LightningDataModule):
    """Code search (natural-language query -> Python function) with leak-free splits and known duplicates.

    Args:
        source: ``"local"`` (Python source on this machine) or ``"jsonl"`` (CodeSearchNet files).
        path: for ``"jsonl"`` the ``.jsonl(.gz)`` file or directory (required); for ``"local"`` optional
            source root(s) (any directories of Python sources) replacing the default fixed source set: the
            standard library plus the pinned ``packages``
            (:func:`datamodules.codesearch.corpus.resolve_source_set`).
        packages: local default source set: distribution name -> pinned version; ``None`` =
            :data:`datamodules.codesearch.corpus.DEFAULT_PACKAGES` (the project's runtime dependencies).
        cache_dir: corpus/tokenizer cache; default ``$CONTRASTIVE_CACHE/codesearch`` or
            ``~/.cache/contrastive/codesearch``.
        max_files: local source: scan at most this many files (deterministic by path hash); None = all.
        max_pairs: keep at most this many pairs (deterministic); None = all. Applies to ``"jsonl"`` too:
            pass None (and ``max_group_pairs=None``) for a full CodeSearchNet set.
        max_group_pairs: at most this many pairs per split group (top-level package / repository).
        split_fractions: (train, valid, test) fractions for records without a fixed partition.
        split_method: ``"auto"`` | ``"hash"`` | ``"balanced"``
            (see :func:`datamodules.codesearch.corpus.assign_splits`).
        min_query_words: drop pairs whose summary has fewer words.
        min_code_lines: drop pairs whose code (docstring removed) has fewer non-blank lines.
        skip_tests: local source: leave out test directories/files.
        vocab_size: BPE vocabulary size (trained on the train split only).
        min_frequency: BPE minimum pair frequency.
        code_aware: split identifiers (camelCase, ``_``, ``.``) and lower-case before the BPE, one vocabulary
            for queries and code (see :mod:`contrastive.encoders.tokenizer`).
        max_query_length / max_doc_length: token limits including ``[CLS]``.
        batch_size: training batch size (``drop_last=True``, seeded shuffle).
        eval_batch_size: batch size of valid/test loaders and of :meth:`text_loader`.
        num_workers: DataLoader workers.
        seed: seed of the training shuffle.
        tokenizer_dir: where the tokenizer is loaded from if it exists, else trained and saved to;
            default a directory in the cache keyed by the corpus fingerprint and BPE settings.
        build_workers: processes used to build the corpus (default ``min(4, cpu_count)``).
        sampler: a :class:`contrastive.samplers.NegativeSampler` (filled by the job from ``sampler:``). It is
            set up on the train split in :meth:`setup` (row ``i`` = train item ``i``), and the train loader
            adds its extra negatives (``neg_*`` keys) and follows its batch order (NGAME); see
            :mod:`contrastive.samplers.collate`.
    """

    def __init__(
        self,
        source: str = "local",
        path: str | list[str] | None = None,
        cache_dir: str | None = None,
        max_files: int | None = DEFAULT_MAX_FILES,
        max_pairs: int | None = DEFAULT_MAX_PAIRS,
        max_group_pairs: int | None = DEFAULT_MAX_GROUP_PAIRS,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        split_method: str = "auto",
        min_query_words: int = 3,
        min_code_lines: int = 3,
        skip_tests: bool = True,
        vocab_size: int = 8000,
        min_frequency: int = 2,
        max_query_length: int = 32,
        max_doc_length: int = 256,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer_dir: str | None = None,
        build_workers: int | None = None,
        sampler: Any = None,
        packages: dict[str, str] | None = None,
        code_aware: bool = False,
    ) -> None:
        super().__init__()
        if source not in ("local", "jsonl"):
            raise ValueError(f"codesearch: source must be 'local' or 'jsonl'; got {source!r}")
        if source == "jsonl" and not path:
            raise ValueError("codesearch: source='jsonl' needs path= (a .jsonl/.jsonl.gz file or a directory)")
        if source == "jsonl" and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"codesearch: source='jsonl' takes one path; got {path!r}")
        check_fractions(split_fractions)
        if split_method not in SPLIT_METHODS:
            raise ValueError(f"codesearch: split_method must be one of {SPLIT_METHODS}; got {split_method!r}")
        for name, v, lo in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                            ("max_query_length", max_query_length, 2), ("max_doc_length", max_doc_length, 2),
                            ("num_workers", num_workers, 0), ("vocab_size", vocab_size, 260),
                            ("min_frequency", min_frequency, 1)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"codesearch: {name} must be an integer >= {lo}; got {v!r}")
        self.save_hyperparameters(ignore=["sampler"])
        self.source, self.path = source, path
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.max_files, self.max_pairs, self.max_group_pairs = max_files, max_pairs, max_group_pairs
        self.split_fractions, self.split_method = tuple(float(x) for x in split_fractions), split_method
        self.min_query_words, self.min_code_lines, self.skip_tests = min_query_words, min_code_lines, skip_tests
        self.vocab_size_requested, self.min_frequency = vocab_size, min_frequency
        self.code_aware = bool(code_aware)
        self.max_query_length, self.max_doc_length = max_query_length, max_doc_length
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.seed, self.tokenizer_dir, self.build_workers = seed, tokenizer_dir, build_workers
        self.packages = None if packages is None else {str(k): str(v) for k, v in dict(packages).items()}
        self.sampler = sampler  # a contrastive.samplers NegativeSampler, set up on the train split in setup()
        self._sampler_corpus: str | None = None
        self.corpus: CodeSearchCorpus | None = None
        self.tokenizer: BPETokenizer | None = None
        self.tokenizer_dir_used: str | None = None
        self._datasets: dict[str, PairDataset] = {}

    # ----------------------------------------------------------------------------------- building
    def _ensure_corpus(self) -> CodeSearchCorpus:
        if self.corpus is None:
            common = dict(cache_dir=self.cache_dir, max_pairs=self.max_pairs, split_fractions=self.split_fractions,
                          min_query_words=self.min_query_words, min_code_lines=self.min_code_lines,
                          max_group_pairs=self.max_group_pairs, split_method=self.split_method,
                          workers=self.build_workers)
            if self.source == "local":
                self.corpus = build_local_corpus(self.path, max_files=self.max_files, skip_tests=self.skip_tests,
                                                 packages=self.packages, **common)
            else:
                self.corpus = build_jsonl_corpus(self.path, **common)  # type: ignore[arg-type]
            if self.corpus.report.total:
                log.warning("codesearch: corpus has %d skipped bad input(s): %s", self.corpus.report.total,
                            dict(self.corpus.report.counts))
        return self.corpus

    def _resolved_tokenizer_dir(self) -> Path:
        if self.tokenizer_dir is not None:
            return Path(self.tokenizer_dir).expanduser()
        corpus = self._ensure_corpus()
        mode = "-code" if self.code_aware else ""
        return self.cache_dir / "tokenizers" / f"{corpus.fingerprint[:16]}-v{self.vocab_size_requested}-f{self.min_frequency}{mode}"

    def _ensure_tokenizer(self) -> BPETokenizer:
        if self.tokenizer is None:
            d = self._resolved_tokenizer_dir()
            if BPETokenizer.exists(d):
                self.tokenizer = BPETokenizer.load(d)
                if self.tokenizer.code_aware != self.code_aware:
                    raise ValueError(f"codesearch: the tokenizer in {d} has code_aware={self.tokenizer.code_aware} "
                                     f"but data.code_aware={self.code_aware}; remove it or change the setting")
                if self.tokenizer.vocab_size > self.vocab_size_requested:
                    log.warning("codesearch: tokenizer loaded from %s has %d ids, more than vocab_size=%d",
                                d, self.tokenizer.vocab_size, self.vocab_size_requested)
            else:
                train = self._ensure_corpus().records("train")
                texts = [r.query for r in train] + [r.document for r in train]
                log.info("codesearch: training a %d-id BPE tokenizer on %d train texts", self.vocab_size_requested, len(texts))
                self.tokenizer = BPETokenizer.train(texts, self.vocab_size_requested, self.min_frequency,
                                                    code_aware=self.code_aware)
                self.tokenizer.save(d)
            self.tokenizer_dir_used = str(d)
        return self.tokenizer

    def _tokenized_cache_path(self, split: str) -> Path:
        tok = self._ensure_tokenizer()
        digest = hashlib.sha1(tok.backend.to_str().encode("utf-8")).hexdigest()[:12]
        fp = self._ensure_corpus().fingerprint[:16] or "nofp"
        return self.cache_dir / "tokenized" / f"{fp}-{digest}-{split}-q{self.max_query_length}-d{self.max_doc_length}.pt"

    def _dataset(self, split: str) -> PairDataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split in self._datasets:
            return self._datasets[split]
        corpus, tok = self._ensure_corpus(), self._ensure_tokenizer()
        records = corpus.records(split)
        if not records:
            raise CorpusError(f"codesearch: the {split} split is empty (sizes {corpus.split_sizes()})")
        path = self._tokenized_cache_path(split)
        ds = None
        if path.exists():
            try:
                blob = torch.load(path, weights_only=True)
                ds = PairDataset(PackedSequences(blob["q_values"], blob["q_offsets"]),
                                 PackedSequences(blob["d_values"], blob["d_offsets"]), blob["pair_ids"], blob["dup_groups"])
                if not torch.equal(ds.pair_ids, torch.tensor([r.id for r in records], dtype=torch.long)):
                    ds = None
            except Exception as e:  # a corrupt cache is rebuilt, never fatal
                log.warning("codesearch: ignoring unreadable tokenized cache %s (%s)", path, e)
                ds = None
        if ds is None:
            q = PackedSequences.from_lists(tok.encode_ids([r.query for r in records], self.max_query_length))
            d = PackedSequences.from_lists(tok.encode_ids([r.document for r in records], self.max_doc_length))
            ds = PairDataset(q, d, torch.tensor([r.id for r in records], dtype=torch.long),
                             torch.tensor([r.dup_group for r in records], dtype=torch.long))
            _atomic_torch_save({"q_values": q.values, "q_offsets": q.offsets, "d_values": d.values,
                                "d_offsets": d.offsets, "pair_ids": ds.pair_ids, "dup_groups": ds.dup_groups}, path)
        self._datasets[split] = ds
        return ds

    # ---------------------------------------------------------------------------------- lightning
    def prepare_data(self) -> None:
        """Build (or load) the cached corpus and tokenizer; runs once per node before :meth:`setup`."""
        self._ensure_corpus()
        self._ensure_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Load the corpus and tokenizer (building them if needed) and tokenize the splits of ``stage``."""
        self._ensure_corpus()
        self._ensure_tokenizer()
        splits = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", SPLITS)
        for s in splits:
            self._dataset(s)
        if "train" in splits:
            self._attach_sampler()

    def _attach_sampler(self) -> DataLoader:
        """The training loader with the sampler wired in (:func:`contrastive.samplers.collate.attach_sampler`);
        the sampler is set up once per corpus on the train split (row ``i`` = train item ``i``)."""
        from contrastive.samplers.collate import TextRows, TextItems, TokenizerEncoder, attach_sampler

        ds = self._dataset("train")
        fingerprint = self._ensure_corpus().fingerprint
        records = self.records("train")
        encode = TokenizerEncoder(self.tokenizer, self.max_doc_length)
        loader = attach_sampler(
            self.sampler, ds, ids=ds.pair_ids, groups=ds.dup_groups,
            base_collate=PairCollate(ds, self.tokenizer.pad_id),
            candidate_inputs=TextRows([r.document for r in records], encode), generated_inputs=TextItems(encode),
            texts={"anchor": [r.query for r in records], "candidate": [r.document for r in records]},
            setup=self._sampler_corpus != fingerprint, batch_size=self.batch_size, seed=self.seed,
            num_workers=self.num_workers)
        self._sampler_corpus = fingerprint
        return loader

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if len(ds) < self.batch_size:
            raise CorpusError(f"codesearch: the train split has {len(ds)} pairs, fewer than batch_size={self.batch_size} "
                              f"(drop_last=True would give no batch)")
        return self._attach_sampler()

    def row_inputs(self, rows: Sequence[int], side: str) -> dict[str, Tensor]:
        """Tower inputs of training ``rows``: the tokenized queries (``side="anchor"``) or documents
        (``"candidate"``), ``{"ids": (R, L), "mask": (R, L)}`` (the refresh of model-dependent samplers)."""
        if side not in ("anchor", "candidate"):
            raise ValueError(f"side must be 'anchor' or 'candidate'; got {side!r}")
        ds = self._dataset("train")
        ids, mask = (ds.queries if side == "anchor" else ds.docs).pad(list(rows), self.tokenizer.pad_id)
        return {"ids": ids, "mask": mask}

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, drop_last=False,
                          collate_fn=PairCollate(ds, self.tokenizer.pad_id), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ------------------------------------------------------------------------------------ helpers
    def records(self, split: str | None = None) -> list[CodePair]:
        """Shortcut for ``self.corpus.records(split)``."""
        return self._ensure_corpus().records(split)

    def text_loader(self, texts: Sequence[str], kind: str, batch_size: int | None = None) -> DataLoader:
        """Loader over raw ``texts`` in order, yielding ``{"ids": LongTensor (B, L), "mask": BoolTensor (B, L)}``
        tokenized like queries (``kind="query"``, ``max_query_length``) or documents (``kind="doc"``,
        ``max_doc_length``); ``batch_size`` defaults to ``eval_batch_size``."""
        if kind not in ("query", "doc"):
            raise ValueError(f"text_loader: kind must be 'query' or 'doc'; got {kind!r}")
        tok = self._ensure_tokenizer()
        max_len = self.max_query_length if kind == "query" else self.max_doc_length
        return DataLoader(_TextDataset(texts), batch_size=batch_size or self.eval_batch_size, shuffle=False,
                          drop_last=False, collate_fn=TextCollate(tok, max_len), num_workers=self.num_workers)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (embedding rows); builds/loads the tokenizer if needed."""
        return self._ensure_tokenizer().vocab_size

    @property
    def pad_id(self) -> int:
        return 0

    def provenance(self) -> dict[str, Any]:
        """What the corpus was built from and its fingerprints (printed and saved with every run):
        ``source`` (the source set's description, the roots, or the jsonl path), ``content_fingerprint``
        (sha1 of the records: equal corpora give equal values on any machine), ``cache_fingerprint``
        (settings + input files' paths, sizes and times) and the split sizes."""
        corpus = self._ensure_corpus()
        meta = corpus.meta
        content = meta.get("content_fingerprint")
        if not content:  # jsonl corpora and caches written before content fingerprints
            from datamodules.codesearch.corpus import content_fingerprint

            content = content_fingerprint(corpus.records())
        source = meta.get("source_set") or (meta.get("settings") or {}).get("roots") or self.path
        return {"kind": meta.get("kind"), "source": source, "content_fingerprint": content,
                "cache_fingerprint": corpus.fingerprint, "splits": corpus.split_sizes(), "records": len(corpus)}

    def provenance_summary(self) -> str:
        """One line: the source set and the content fingerprint."""
        p = self.provenance()
        src = p["source"]
        if isinstance(src, dict) and "packages" in src:
            from datamodules.codesearch.corpus import SourceSet

            src = SourceSet([], src).summary()
        return (f"codesearch corpus: {p['records']} pairs {p['splits']} from {src}; "
                f"fingerprint {p['content_fingerprint'][:16]}")

    def describe(self) -> dict[str, Any]:
        """Corpus sizes per split, duplicate groups (>1 member), bad-input counts, filters, vocabulary."""
        out = self._ensure_corpus().describe()
        out["vocab_size"] = self.tokenizer.vocab_size if self.tokenizer is not None else None
        out["tokenizer_dir"] = self.tokenizer_dir_used
        out["max_query_length"], out["max_doc_length"] = self.max_query_length, self.max_doc_length
        return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
