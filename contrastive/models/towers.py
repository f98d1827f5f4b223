"""Towers: any ``nn.Module`` mapping one side's inputs (``dict[str, Tensor]``, first dimension ``N``) to
``(N, d)`` embeddings (the tower contract of :mod:`contrastive.models.batch`). :class:`ProjectedTower`
adds the usual linear projection and L2 normalisation on top of an encoder that follows the contract."""
from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor, nn


class ProjectedTower(nn.Module):
    """Encoder → optional linear projection → optional L2 normalisation: inputs → ``(N, D)``.

    Args:
        encoder: a tower (``dict`` inputs → ``(N, d_in)``) exposing ``output_dim``.
        projection_dim: ``D`` of a bias-free linear projection; ``None``: no projection (``D = d_in``).
        normalize: L2-normalise the output (cosine similarity).
    """

    def __init__(self, encoder: nn.Module, projection_dim: Optional[int], normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        in_dim = int(getattr(encoder, "output_dim"))
        self.projection = nn.Linear(in_dim, projection_dim, bias=False) if projection_dim else nn.Identity()
        self.normalize = normalize
        self.output_dim = int(projection_dim) if projection_dim else in_dim

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        z = self.projection(self.encoder(inputs))
        return nn.functional.normalize(z, dim=-1) if self.normalize else z
