from contrastive.samplers.base import InBatchSampler, NegativeSampler

__all__ = ["InBatchSampler", "NegativeSampler"]
from contrastive.samplers.mining import HardNegativeMiner, MinedNegatives, select_negatives  # noqa: E402

__all__ += ["HardNegativeMiner", "MinedNegatives", "select_negatives"]
