from contrastive.samplers.base import InBatchSampler, NegativeSampler

__all__ = ["InBatchSampler", "NegativeSampler"]
