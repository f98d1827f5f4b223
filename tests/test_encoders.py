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
