"""InfoNCE with in-batch (and any other) negatives, fixed or learnable temperature."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from contrastive.losses import functional as F
from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss, LossInputError, LossOutput
from contrastive.registry import LOSSES


class Temperature(nn.Module):
    """A fixed temperature, or a learnable one parameterised as ``log(1/t)`` and clamped
    to ``[min_temperature, max_temperature]`` (CLIP, Radford et al. 2021, clamps the logit scale at 100)."""

    def __init__(self, temperature: float = 0.05, learnable: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0) -> None:
        super().__init__()
        if not (0 < min_temperature <= temperature <= max_temperature):
            raise ValueError(
                f"temperature must satisfy 0 < min_temperature <= temperature <= max_temperature; got "
                f"{min_temperature} <= {temperature} <= {max_temperature}"
            )
        self.learnable = learnable
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        lo, hi = math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        return 1.0 / self.log_scale.clamp(lo, hi).exp()


def contrastive_logs(logits: Tensor, inputs: ContrastiveInputs) -> dict[str, Tensor]:
    """Detached monitoring values: top-1 accuracy (best candidate is a positive), mean positive and
    mean negative similarity (of the raw ``anchors @ candidates.T``)."""
    with torch.no_grad():
        pos = inputs.resolved_positive_mask()
        neg = inputs.negative_mask()
        sims = inputs.anchors.detach() @ inputs.candidates.detach().T
        top1 = logits.detach().argmax(dim=1)
        acc = pos.gather(1, top1[:, None]).float().mean()
        mean_pos = sims[pos].mean()
        mean_neg = sims[neg].mean() if neg.any() else sims.new_tensor(float("nan"))
    return {"acc": acc, "pos_sim": mean_pos, "neg_sim": mean_neg}


def reduce_rows(loss_rows: Tensor, keep: Tensor, logs: dict[str, Tensor]) -> Tensor:
    """Average per-anchor losses over ``keep``; anchors without any negative are a documented skip
    (counted in ``logs['skipped']``), and a batch where every anchor is skipped is an error."""
    skipped = (~keep).sum()
    logs["skipped"] = skipped.detach().float()
    if not keep.any():
        raise LossInputError(
            "no anchor has a negative left after masking (all candidates are positives or known false "
            "negatives); enlarge the batch or relax the false-negative filters"
        )
    return loss_rows[keep].mean()


@LOSSES.register("infonce")
class InfoNCELoss(ContrastiveLoss):
    """InfoNCE / NT-Xent (van den Oord et al. 2018, arXiv 1807.03748; Chen et al. 2020) with weighted,
    masked and multi-positive extensions.

    ``L = mean_i -log( e^{s_ii/t} / (e^{s_ii/t} + sum_{j in N_i} w_ij e^{s_ij/t}) )``, ``s = a @ c.T``.

    Args:
        temperature: initial (or fixed) temperature t.
        learnable_temperature: learn ``log(1/t)``, clamped to ``[min_temperature, max_temperature]``.
        symmetric: average with the candidate→anchor direction (CLIP).
    """

    def __init__(self, temperature: float = 0.05, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0,
                 symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature, max_temperature)

    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        t = self.temperature().to(inputs.anchors.dtype)
        logits = F.similarity_logits(inputs.anchors, inputs.candidates, t)
        rows, has_neg = F.info_nce_from_logits(logits, inputs.resolved_positive_mask(), inputs.negative_mask(), inputs.weights)
        logs = contrastive_logs(logits, inputs)
        logs["temperature"] = t.detach()
        return LossOutput(reduce_rows(rows, has_neg, logs), logs)
