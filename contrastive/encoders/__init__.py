"""Encoders (registered in :data:`contrastive.registry.ENCODERS`) and tokenizers."""
from contrastive.encoders.transformer import HFTextEncoder, TransformerTextEncoder, masked_mean, text_inputs

__all__ = ["HFTextEncoder", "TransformerTextEncoder", "masked_mean", "text_inputs"]
