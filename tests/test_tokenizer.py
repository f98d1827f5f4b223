"""BPETokenizer: local training, special ids, save/load round trip, padding/truncation/mask shapes."""
from __future__ import annotations

import pickle

import pytest
import torch

from contrastive.encoders.tokenizer import SPECIAL_TOKENS, BPETokenizer, TokenizerError

TEXTS = [
    "Return the parsed date of the string.",
    "def parse_date(value):\n    return datetime.strptime(value, '%Y-%m-%d')\n",
    "Compute the mean of a list of numbers.",
    "def mean(xs):\n    total = sum(xs)\n    return total / len(xs)\n",
    "Open a file and read all lines.",
    "def read_lines(path):\n    with open(path) as f:\n        return f.readlines()\n",
] * 20


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(TEXTS, vocab_size=400, min_frequency=2)


def test_special_ids_and_vocab(tok):
    backend = tok.backend
    for i, t in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(t) == i
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size <= 400


def test_encode_batch_shapes_padding_truncation(tok):
    texts = ["Return the parsed date", "", "def mean(xs):\n    return sum(xs) / len(xs)\n" * 10]
    ids, mask = tok.encode_batch(texts, max_length=16)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, 16)  # the long text is truncated at max_length
    assert (ids[:, 0] == tok.cls_id).all() and mask[:, 0].all()
    assert mask[1].sum() == 1  # empty text -> [CLS] only
    assert (ids[~mask] == tok.pad_id).all()
    # padding to the longest in batch, not to max_length
    short_ids, short_mask = tok.encode_batch(["Return", "Return the parsed date"], max_length=64)
    n = len(tok.tokenize("Return the parsed date")) + 1
    assert short_ids.shape == (2, n) and short_mask.sum(1).tolist() == [len(tok.tokenize("Return")) + 1, n]
    # masks are left-aligned: real tokens first
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None])


def test_decode_round_trip(tok):
    text = "def read_lines(path):\n    return open(path).readlines()"
    ids, _ = tok.encode_batch([text], max_length=512)
    assert tok.decode(ids[0]) == text  # byte-level BPE is lossless


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    assert BPETokenizer.exists(tmp_path / "tok")
    again = BPETokenizer.load(tmp_path / "tok")
    assert again.vocab_size == tok.vocab_size
    a = tok.encode_batch(TEXTS[:6], 24)
    b = again.encode_batch(TEXTS[:6], 24)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.endswith(".tmp")]
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone.encode_batch(TEXTS[:6], 24)[0], a[0])


def test_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="vocab_size"):
        BPETokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        BPETokenizer.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        BPETokenizer.load(tmp_path / "bad")
    with pytest.raises(TokenizerError, match="max_length"):
        tok.encode_batch(["x"], max_length=0)
    with pytest.raises(TokenizerError, match="expected str"):
        tok.encode_batch(["x", None], max_length=4)  # type: ignore[list-item]


def test_code_aware_mode_splits_identifiers_and_shares_words(tmp_path):
    from contrastive.encoders.tokenizer import split_identifiers

    assert split_identifiers("self.parseJSONData_from(x)") == "self parse json data from(x)"
    assert split_identifiers("HTTPServer getX fooBar2Baz __init__") == "http server get x foo bar2 baz   init  "
    code = BPETokenizer.train(TEXTS, vocab_size=400, min_frequency=2, code_aware=True)
    assert code.code_aware and not BPETokenizer.train(TEXTS, vocab_size=400).code_aware
    # a word is one token whether it starts the text, follows a space or a dot, or sits in an identifier
    words = code.tokenize("Parse the date")
    assert code.tokenize("def parse_date(value)")[1:3] == words[0:1] + words[2:3]
    assert code.tokenize("x.parseDate") == ["x"] + words[0:1] + words[2:3]
    code.save(tmp_path)
    again = BPETokenizer.load(tmp_path)
    assert again.code_aware and again.tokenize("getParsedDate") == code.tokenize("getParsedDate")
