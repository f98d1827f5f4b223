"""Code search: (docstring summary -> function code) pairs from local Python source or CodeSearchNet jsonl.

Main entry points: :class:`CodeSearchDataModule` (registered as ``"codesearch"``), :class:`CodeSearchCorpus`
with :class:`CodePair` records, :func:`build_local_corpus`, :func:`build_jsonl_corpus`.
"""
from datamodules.codesearch.corpus import (
    BadInputReport, CodePair, CodeSearchCorpus, CorpusError, build_local_corpus, default_cache_dir,
    DEFAULT_PACKAGES, SourceSet, resolve_source_set,
)
from datamodules.codesearch.datamodule import CodeSearchDataModule
from datamodules.codesearch.jsonl import build_jsonl_corpus
from datamodules.codesearch.model import DualEncoderModule, pair_batch

__all__ = [
    "BadInputReport", "CodePair", "CodeSearchCorpus", "CodeSearchDataModule", "CorpusError", "DualEncoderModule",
    "build_jsonl_corpus", "build_local_corpus", "default_cache_dir", "DEFAULT_PACKAGES", "SourceSet",
    "resolve_source_set", "pair_batch",
]
