"""Weighted sums of contrastive losses (e.g. "Slipform" = InfoNCE + Cement)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossOutput
from contrastive.losses.infonce import InfoNCELoss
from contrastive.losses.margin import Calibration, CementLoss, NegativeReduction
from contrastive.registry import LOSSES

#: log keys copied unprefixed from the first component (the LightningModule reads them)
MAIN_LOG_KEYS = ("acc", "pos_sim", "neg_sim", "skipped")


@LOSSES.register("weighted_sum")
class WeightedSumLoss(ContrastiveLoss):
    """``L = Σ_k λ_k L_k``: a weighted sum of losses that all see the same inputs.

    Each component keeps its own settings (temperature, ``symmetric``, ...); ``reverse`` is passed on to
    every component. Logs: ``loss_<name>`` (each component's value), ``<name>/<key>`` (each component's
    logs) and, unprefixed, ``acc``/``pos_sim``/``neg_sim``/``skipped`` of the first component.

    Args:
        losses: name → a :class:`ContrastiveLoss` (YAML specs ``{"name": <registered loss>, **kwargs}`` are
            built by :func:`contrastive.build.build_loss`). Order is kept.
        weights: name → λ_k >= 0; missing names get 1.0.
    """

    def __init__(self, losses: Mapping[str, ContrastiveLoss], weights: Optional[Mapping[str, float]] = None) -> None:
        super().__init__(symmetric=False)
        if not losses:
            raise ValueError("weighted_sum needs at least one loss")
        weights = dict(weights or {})
        unknown = set(weights) - set(losses)
        if unknown:
            raise ValueError(f"weights for unknown losses {sorted(unknown)}; losses are {list(losses)}")
        built: dict[str, ContrastiveLoss] = {}
        for name, loss in losses.items():
            if not isinstance(loss, ContrastiveLoss):
                raise TypeError(f"loss {name!r} must be a ContrastiveLoss (build YAML specs with "
                                f"contrastive.build.build_loss); got {type(loss).__name__}")
            built[name] = loss
        for name in built:
            w = float(weights.get(name, 1.0))
            if w < 0:
                raise ValueError(f"weight of {name!r} must be >= 0; got {w}")
            weights[name] = w
        self.losses = nn.ModuleDict(built)
        self.weights = {name: weights[name] for name in built}

    def _combine(self, outputs: dict[str, LossOutput]) -> LossOutput:
        total = sum(self.weights[name] * out.loss for name, out in outputs.items())
        logs: dict[str, torch.Tensor] = {}
        first = next(iter(outputs.values()))
        logs.update({k: v for k, v in first.logs.items() if k in MAIN_LOG_KEYS})
        for name, out in outputs.items():
            logs[f"loss_{name}"] = out.loss.detach()
            logs.update({f"{name}/{k}": v for k, v in out.logs.items()})
        return LossOutput(total, logs)

    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        return self._combine({name: loss.one_way(inputs) for name, loss in self.losses.items()})

    def forward_inputs(self, inputs: ContrastiveInputs, reverse: Optional[ContrastiveInputs] = None) -> LossOutput:
        return self._combine({name: loss.forward_inputs(inputs, reverse) for name, loss in self.losses.items()})


@LOSSES.register("slipform")
def slipform(temperature: float = 0.05, learnable_temperature: bool = False, symmetric: bool = False,
             infonce_weight: float = 1.0, cement_weight: float = 0.2, margin_min: float = 0.1,
             margin_max: float = 0.3, calibration: Calibration = "linear", difficulty_min: float = 0.0,
             difficulty_max: float = 1.0, negative_reduction: NegativeReduction = "mean") -> WeightedSumLoss:
    """"Slipform" objective (this project's formulation; Concrete Jungle, arXiv 2604.13313, gives no
    formula): ``L = λ_nce · InfoNCE + λ_cement · Cement``.

    InfoNCE uses every negative (and the reverse direction when ``symmetric``); Cement is one-way
    (anchor → candidates, where the difficulty-scored hard negatives are), see
    :class:`~contrastive.losses.margin.CementLoss`. The default ``cement_weight = 0.2`` follows the weight
    of the cross-modal rank loss in CE-CLIP (Zhang et al. 2023, arXiv 2306.08832), the closest published
    InfoNCE + adaptive-margin combination; tune it.
    """
    return WeightedSumLoss(
        {"infonce": InfoNCELoss(temperature=temperature, learnable_temperature=learnable_temperature,
                                symmetric=symmetric),
         "cement": CementLoss(margin_min=margin_min, margin_max=margin_max, calibration=calibration,
                              difficulty_min=difficulty_min, difficulty_max=difficulty_max,
                              negative_reduction=negative_reduction)},
        {"infonce": infonce_weight, "cement": cement_weight},
    )
