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
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float64)
        if learnable:
            self.log_scale = nn.Parameter(log_scale.float())
        else:  # float64 so that a fixed t is exact in float64 losses too (the loss casts it to its dtype)
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        lo, hi = math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        return 1.0 / self.log_scale.clamp(lo, hi).exp()


class ScaleTemperature(nn.Module):
    """The temperature ``t = 1 / scale()`` of an external logit-scale module (its ``forward()`` returns the
    0-d multiplier of the similarities, e.g. CLIP's clamped ``exp(logit_scale)``); give it to a loss with
    :meth:`~contrastive.losses.base.ContrastiveLoss.use_temperature`."""

    def __init__(self, scale: nn.Module) -> None:
        super().__init__()
        self.scale = scale

    def forward(self) -> Tensor:
        return 1.0 / self.scale()


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
    masked and multi-positive extensions, and optional debiasing / hard-negative reweighting.

    ``L = mean_i -log( e^{s_ii/t} / (e^{s_ii/t} + sum_{j in N_i} w_ij e^{s_ij/t}) )``, ``s = a @ c.T``;
    with several positives the SupCon L_out form (Khosla et al. 2020), see
    :func:`~contrastive.losses.functional.info_nce_from_logits`.

    With ``tau_plus > 0`` the negative term is the debiased estimate of DCL (Chuang et al. 2020, arXiv
    2007.00224) and with ``beta > 0`` the negatives are importance-weighted towards the hard ones as in HCL
    (Robinson et al. 2021, arXiv 2010.04592); see
    :func:`~contrastive.losses.functional.debiased_nce_from_logits` for the formula, how weights and
    several positives enter, and the floor ``W_i e^{-1/t}`` (which assumes L2-normalised embeddings).
    ``tau_plus = beta = 0`` runs plain InfoNCE exactly. ``N`` (the number of negatives) is whatever the
    caller passes as candidates: under DDP with gathered candidates it is the global count.

    Args:
        temperature: initial (or fixed) temperature t.
        learnable_temperature: learn ``log(1/t)``, clamped to ``[min_temperature, max_temperature]``.
        min_temperature, max_temperature: the clamp range of the temperature.
        symmetric: average with the candidate→anchor direction (CLIP).
        tau_plus: DCL class prior tau+ in ``[0, 1)``; 0 = no debiasing.
        beta: HCL concentration ``beta >= 0`` (multiplies ``s / t``); 0 = no hard-negative reweighting.
        detach_importance: no gradient through the HCL importance weights (default, per the reference
            notes); ``False`` reproduces the official code, which lets it flow.
    """

    def __init__(self, temperature: float = 0.05, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0,
                 symmetric: bool = False, tau_plus: float = 0.0, beta: float = 0.0,
                 detach_importance: bool = True) -> None:
        super().__init__(symmetric=symmetric)
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1); got {tau_plus}")
        if beta < 0.0:
            raise ValueError(f"beta must be >= 0; got {beta}")
        self.temperature = Temperature(temperature, learnable_temperature, min_temperature, max_temperature)
        self.tau_plus, self.beta, self.detach_importance = float(tau_plus), float(beta), detach_importance

    def one_way(self, inputs: ContrastiveInputs) -> LossOutput:
        t = self.temperature().to(inputs.anchors.dtype)
        logits = F.similarity_logits(inputs.anchors, inputs.candidates, t)
        pos, neg = inputs.resolved_positive_mask(), inputs.negative_mask()
        logs = contrastive_logs(logits, inputs)
        logs["temperature"] = t.detach()
        if self.tau_plus == 0.0 and self.beta == 0.0:
            rows, has_neg = F.info_nce_from_logits(logits, pos, neg, inputs.weights)
        else:
            rows, has_neg, clamped = F.debiased_nce_from_logits(
                logits, pos, neg, inputs.weights, temperature=t, tau_plus=self.tau_plus, beta=self.beta,
                detach_importance=self.detach_importance)
            logs["clamped"] = clamped.detach().float().mean()
        return LossOutput(reduce_rows(rows, has_neg, logs), logs)


@LOSSES.register("dcl")
class DebiasedContrastiveLoss(InfoNCELoss):
    """Debiased contrastive loss (Chuang et al. 2020, arXiv 2007.00224): :class:`InfoNCELoss` with
    ``tau_plus`` and the paper's defaults (t = 0.5, tau+ = 0.1, official ``main.py``)."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, symmetric: bool = False) -> None:
        super().__init__(temperature, learnable_temperature, min_temperature, max_temperature, symmetric,
                         tau_plus=tau_plus, beta=0.0)


@LOSSES.register("hcl")
class HardNegativeContrastiveLoss(InfoNCELoss):
    """Hard-negative contrastive loss (HCL, Robinson et al. 2021, arXiv 2010.04592): :class:`InfoNCELoss`
    with ``beta`` and ``tau_plus`` and the paper's defaults (t = 0.5, tau+ = 0.1, beta = 1.0, official
    ``image/main.py``). ``beta = 0`` is DCL; ``beta = tau_plus = 0`` is InfoNCE."""

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, beta: float = 1.0,
                 detach_importance: bool = True, learnable_temperature: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 1.0, symmetric: bool = False) -> None:
        super().__init__(temperature, learnable_temperature, min_temperature, max_temperature, symmetric,
                         tau_plus=tau_plus, beta=beta, detach_importance=detach_importance)
