from contrastive.samplers.base import InBatchSampler, NegativeSampler

__all__ = ["InBatchSampler", "NegativeSampler"]
from contrastive.samplers.mining import HardNegativeMiner, MinedNegatives, MiningSettings, select_negatives  # noqa: E402

__all__ += ["HardNegativeMiner", "MinedNegatives", "MiningSettings", "select_negatives"]
from contrastive.samplers.table import CorpusSampler, MinedTable, TableSampler, mine_table  # noqa: E402
from contrastive.samplers.random import RandomNegativeSampler  # noqa: E402
from contrastive.samplers.bm25 import BM25NegativeSampler  # noqa: E402
from contrastive.samplers.faiss_hard import FaissHardNegativeSampler  # noqa: E402
from contrastive.samplers.ngame import NGAMESampler, balanced_clusters  # noqa: E402
from contrastive.samplers.queue import QueueSampler  # noqa: E402
from contrastive.samplers.collate import NegativeCollate, SamplerBatchSampler, TokenizerEncoder  # noqa: E402

__all__ += [
    "CorpusSampler", "MinedTable", "TableSampler", "mine_table", "RandomNegativeSampler", "BM25NegativeSampler",
    "FaissHardNegativeSampler", "NGAMESampler", "balanced_clusters", "QueueSampler", "NegativeCollate",
    "SamplerBatchSampler", "TokenizerEncoder",
]
