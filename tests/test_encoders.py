"""Encoders: the from-scratch Transformer and a local Hugging Face checkpoint (never downloaded)."""
from __future__ import annotations

import pytest
import torch

from contrastive.encoders import HFTextEncoder, TransformerTextEncoder


def test_transformer_pools_only_real_tokens():
    enc = TransformerTextEncoder(30, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=8, dropout=0.0).eval()
    ids = torch.tensor([[2, 5, 6, 0, 0]])
    mask = ids != 0
    a = enc(ids, mask)
    b = enc(ids[:, :3], mask[:, :3])  # padding must not change the embedding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert a.shape == (1, 16)
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool))


def test_local_huggingface_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path)
    enc = HFTextEncoder(str(tmp_path)).eval()
    ids = torch.tensor([[2, 5, 6, 0]])
    out = enc(ids, ids != 0)
    assert out.shape == (1, 16) and enc.output_dim == 16
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFTextEncoder(str(tmp_path / "missing"))


def test_bag_of_words_pooling_against_a_slow_reference():
    from contrastive.encoders import BagOfWordsEncoder
    from contrastive.registry import ENCODERS

    torch.manual_seed(0)
    ids = torch.tensor([[2, 5, 6, 0, 0], [2, 7, 7, 7, 9]])
    mask = ids != 0
    for pooling in ("attention", "weighted_mean", "mean", "max"):
        enc = ENCODERS.build("nbow", vocab_size=12, dim=8, pooling=pooling, dropout=0.0).eval()
        out = enc(ids, mask)
        assert out.shape == (2, 8) and enc.output_dim == 8
        torch.testing.assert_close(out[:1], enc(ids[:1, :3], mask[:1, :3]))  # padding changes nothing
        for b in range(2):  # one row at a time, real tokens only
            e = enc.token.weight[ids[b][mask[b]]]  # (n, d)
            if pooling == "mean":
                ref = e.mean(0)
            elif pooling == "max":
                ref = e.max(0).values
            else:
                s = (e @ enc.score.weight[0])
                w = torch.softmax(s, 0) if pooling == "attention" else torch.sigmoid(s) / torch.sigmoid(s).sum()
                ref = (w[:, None] * e).sum(0)
            torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-6)
    # an all-padding row gives zeros, not nan
    enc = BagOfWordsEncoder(12, dim=8).eval()
    assert torch.equal(enc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="pooling"):
        BagOfWordsEncoder(12, pooling="sum")


def test_bag_of_words_learns_gradients_through_attention():
    from contrastive.encoders import BagOfWordsEncoder

    enc = BagOfWordsEncoder(12, dim=8, dropout=0.0)
    ids = torch.tensor([[2, 5, 6]])
    enc(ids, ids != 0).sum().backward()
    assert enc.score.weight.grad.abs().sum() > 0 and enc.token.weight.grad[5].abs().sum() > 0
