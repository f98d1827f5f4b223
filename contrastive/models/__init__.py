from contrastive.models.dual_encoder import DualEncoderModule, Tower

__all__ = ["DualEncoderModule", "Tower"]
