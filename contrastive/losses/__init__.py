"""Contrastive losses: one interface (:mod:`.base`), pure maths (:mod:`.functional`), module shells."""
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossInputError, LossOutput
from contrastive.losses.infonce import InfoNCELoss, Temperature

__all__ = ["ContrastiveInputs", "ContrastiveLoss", "LossInputError", "LossOutput", "InfoNCELoss", "Temperature"]
