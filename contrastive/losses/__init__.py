"""Contrastive losses: one interface (:mod:`.base`), pure maths (:mod:`.functional`), module shells
registered by name in :data:`contrastive.registry.LOSSES`:

- ``infonce`` (:class:`InfoNCELoss`; with ``tau_plus`` / ``beta`` it is DCL / HCL), ``dcl``, ``hcl``
- ``soft_infonce`` (:class:`SoftInfoNCELoss`; estimators in :mod:`.estimators`)
- ``cement`` (:class:`CementLoss`, difficulty-calibrated margin)
- ``weighted_sum`` (:class:`WeightedSumLoss`) and ``slipform`` (InfoNCE + Cement)
"""
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossInputError, LossOutput
from contrastive.losses.combined import WeightedSumLoss, slipform
from contrastive.losses.infonce import (DebiasedContrastiveLoss, HardNegativeContrastiveLoss, InfoNCELoss,
                                      ScaleTemperature, Temperature)
from contrastive.losses.margin import CementLoss
from contrastive.losses.masks import false_negative_mask_from_ids, positive_mask_from_labels
from contrastive.losses.soft_infonce import SoftInfoNCELoss

__all__ = [
    "CementLoss",
    "ContrastiveInputs",
    "ContrastiveLoss",
    "DebiasedContrastiveLoss",
    "HardNegativeContrastiveLoss",
    "InfoNCELoss",
    "LossInputError",
    "LossOutput",
    "SoftInfoNCELoss",
    "ScaleTemperature",
    "Temperature",
    "WeightedSumLoss",
    "false_negative_mask_from_ids",
    "positive_mask_from_labels",
    "slipform",
]
