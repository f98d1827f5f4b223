"""The training core shared by every setting: the batch contract, the candidate assembler, towers, the
optimiser set-up, evaluation and :class:`ContrastiveModule`."""
from contrastive.models.assembler import CandidateAssembler, CandidateSet
from contrastive.models.batch import ContrastiveBatch, ExtraNegatives
from contrastive.models.contrastive import ContrastiveModule
from contrastive.models.evaluation import EvalOutputs, RetrievalEvaluator
from contrastive.models.optim import OptimizerSettings
from contrastive.models.towers import ProjectedTower

__all__ = ["CandidateAssembler", "CandidateSet", "ContrastiveBatch", "ContrastiveModule", "EvalOutputs",
           "ExtraNegatives", "OptimizerSettings", "ProjectedTower", "RetrievalEvaluator"]
