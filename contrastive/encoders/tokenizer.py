"""A byte-level BPE tokenizer trained locally (HuggingFace ``tokenizers``; nothing is downloaded).

Special tokens have fixed ids: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3. Byte-level BPE
covers every input (the 256 byte symbols are always in the vocabulary), so ``[UNK]`` never appears in
practice. :meth:`BPETokenizer.encode_batch` prepends ``[CLS]``, truncates to ``max_length`` and pads to the
longest sequence of the batch.

Code-aware mode (``code_aware=True`` in :meth:`BPETokenizer.train`) splits identifiers before the BPE, as
CodeSearchNet's baselines do (Husain et al. 2019, arXiv 1909.09436): a normaliser breaks camelCase
(``parseJSONData`` -> ``parse json data``), snake_case and dotted names (``_`` and ``.`` become spaces) and
lower-cases everything; words and punctuation are then split apart (no space markers), so a word is the
same token whether it appears in a query or in code: one vocabulary serves both. The normaliser is part of
``tokenizer.json``, so a saved tokenizer keeps its mode.

Example::

    tok = BPETokenizer.train(texts, vocab_size=8000)
    ids, mask = tok.encode_batch(["parse a date", "def f(x): ..."], max_length=32)   # (2, L), (2, L)
    tok.save(run_dir / "tokenizer"); tok = BPETokenizer.load(run_dir / "tokenizer")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from contrastive.io import atomic_write

__all__ = ["BPETokenizer", "SPECIAL_TOKENS", "TokenizerError", "code_normalizer", "split_identifiers"]

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """Bad tokenizer argument or file."""


#: Word boundaries inside identifiers: lower/digit -> upper (``parseJson``), and the end of an upper-case
#: run before a capitalised word (``JSONData`` -> ``JSON Data``).
_CAMEL_BOUNDARY = r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])"


def code_normalizer() -> normalizers.Normalizer:
    """The code-aware normaliser: camelCase boundaries, ``_`` and ``.`` become spaces, then lower case."""
    return normalizers.Sequence([normalizers.Replace(Regex(_CAMEL_BOUNDARY), " "),
                                 normalizers.Replace(Regex(r"[_.]"), " "), normalizers.Lowercase()])


def split_identifiers(text: str) -> str:
    """``text`` as the code-aware tokenizer sees it before the BPE
    (``"self.parseJSONData_from(x)" -> "self parse json data from(x)"``)."""
    return code_normalizer().normalize_str(text)


class BPETokenizer:
    """Byte-level BPE with ``[PAD]``/``[UNK]``/``[CLS]``/``[SEP]`` at ids 0..3.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds the special tokens at ids 0..3
            (use :meth:`train` or :meth:`load` rather than this constructor).
        chars_per_token_cap: texts are cut to ``max_length * chars_per_token_cap`` characters before
            encoding, a speed guard for very long documents; BPE tokens are far shorter than this, so
            the first ``max_length`` tokens are unaffected in practice.
    """

    def __init__(self, tokenizer: Tokenizer, chars_per_token_cap: int = 32) -> None:
        for i, t in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(t) != i:
                raise TokenizerError(f"special token {t} must have id {i}, has {tokenizer.token_to_id(t)}")
        self._tok = tokenizer
        self.chars_per_token_cap = int(chars_per_token_cap)

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
              code_aware: bool = False) -> "BPETokenizer":
        """Train on ``texts`` (e.g. the train split's queries and code only).

        Args:
            texts: training texts (any iterable; consumed once).
            vocab_size: target vocabulary size including the 256 byte symbols and 4 special tokens
                (the result may be smaller on a tiny corpus).
            min_frequency: minimum count of a pair to be merged.
            code_aware: split identifiers and lower-case before the BPE (module docstring).
        """
        if vocab_size < _MIN_VOCAB:
            raise TokenizerError(f"vocab_size must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                                 f"tokens); got {vocab_size}")
        if min_frequency < 1:
            raise TokenizerError(f"min_frequency must be >= 1; got {min_frequency}")
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        if code_aware:
            tok.normalizer = code_normalizer()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        n = 0

        def counted() -> Iterable[str]:
            nonlocal n
            for t in texts:
                if not isinstance(t, str):
                    raise TokenizerError(f"training text #{n} is a {type(t).__name__}, expected str")
                n += 1
                yield t

        tok.train_from_iterator(counted(), trainer=trainer)
        if n == 0:
            raise TokenizerError("cannot train a tokenizer on zero texts")
        return cls(tok)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/tokenizer.json`` atomically; returns its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / TOKENIZER_FILE
        atomic_write(path, lambda tmp: Path(tmp).write_text(self._tok.to_str(), encoding="utf-8"))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BPETokenizer":
        """Load from a directory written by :meth:`save` (or a ``tokenizer.json`` path)."""
        p = Path(directory)
        path = p if p.is_file() else p / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {str(path)!r} (expected {TOKENIZER_FILE} written by BPETokenizer.save)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise TokenizerError(f"{path}: not a valid tokenizer file ({e})") from e
        return cls(tok)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        """Whether :meth:`load` would find a tokenizer file in ``directory``."""
        return (Path(directory) / TOKENIZER_FILE).is_file()

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids (embedding-table rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def code_aware(self) -> bool:
        """Whether identifiers are split before the BPE (a tokenizer trained with ``code_aware=True``)."""
        return self._tok.normalizer is not None

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def cls_id(self) -> int:
        return 2

    @property
    def sep_id(self) -> int:
        return 3

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"

    # -------------------------------------------------------------------------------------- encoding
    def encode_ids(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text: ``[CLS]`` then at most ``max_length - 1`` BPE tokens (no padding)."""
        if max_length < 1:
            raise TokenizerError(f"max_length must be >= 1; got {max_length}")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerError(f"text #{i} is a {type(t).__name__}, expected str")
        cap = max_length * self.chars_per_token_cap
        encs = self._tok.encode_batch([t[:cap] for t in texts], add_special_tokens=False)
        return [[self.cls_id] + e.ids[: max_length - 1] for e in encs]

    def pad(self, id_lists: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Right-pad with ``[PAD]`` to the longest list: ``ids`` LongTensor ``(B, L)`` and ``mask`` BoolTensor
        ``(B, L)`` (True = real token), ``L = max(1, longest list)``."""
        b = len(id_lists)
        length = max((len(x) for x in id_lists), default=1)
        ids = torch.full((b, max(length, 1)), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, max(length, 1)), dtype=torch.bool)
        for i, x in enumerate(id_lists):
            n = len(x)
            if n:
                ids[i, :n] = torch.as_tensor(x, dtype=torch.long)
                mask[i, :n] = True
        return ids, mask

    def encode_batch(self, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Encode a batch of texts.

        Returns:
            ``ids`` LongTensor ``(B, L)`` and ``mask`` BoolTensor ``(B, L)`` (True = real token), with
            ``L = min(max_length, longest text + 1)``; every row starts with ``[CLS]``; padding is ``[PAD]`` = 0.
        """
        return self.pad(self.encode_ids(texts, max_length))

    def tokenize(self, text: str) -> list[str]:
        """BPE token strings of ``text`` (byte-level symbols, no ``[CLS]``)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (1-D), dropping special tokens by default."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "chars_per_token_cap": self.chars_per_token_cap}

    def __setstate__(self, state: dict) -> None:
        self._tok = Tokenizer.from_str(state["json"])
        self.chars_per_token_cap = state["chars_per_token_cap"]
