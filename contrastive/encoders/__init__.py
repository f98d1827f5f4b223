"""Encoders (registered in :data:`contrastive.registry.ENCODERS`) and tokenizers."""
from contrastive.encoders.bag import BagOfWordsEncoder
from contrastive.encoders.transformer import HFTextEncoder, TransformerTextEncoder, masked_mean, text_inputs

__all__ = ["BagOfWordsEncoder", "HFTextEncoder", "TransformerTextEncoder", "masked_mean", "text_inputs"]
