"""Optimiser set-up of the contrastive modules: AdamW with linear warm-up, then a cosine, linear or
constant schedule (Loshchilov & Hutter 2019, arXiv 1711.05101), stepped every optimiser step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class OptimizerSettings:
    """AdamW settings.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay of matrices (biases, norms and ``log_scale`` temperatures get 0).
        warmup_steps: linear warm-up steps from ``lr / warmup_steps`` to ``lr``.
        scheduler: ``"cosine"`` or ``"linear"`` decay to 0 at the last step, or ``"constant"``.
    """

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"

    def __post_init__(self) -> None:
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"scheduler must be 'cosine', 'linear' or 'constant'; got {self.scheduler!r}")

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of ``lr`` at optimiser step ``step`` of ``total``."""
        warm = self.warmup_steps
        if warm and step < warm:
            return (step + 1) / warm
        if self.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if self.scheduler == "cosine" else 1.0 - progress

    def configure(self, module: nn.Module, total_steps: int) -> dict[str, Any]:
        """Lightning's ``configure_optimizers`` result for the trainable parameters of ``module``."""
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "norm" in name or "log_scale" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(1, int(total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
