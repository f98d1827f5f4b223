"""Lightning callbacks (negative refresh, reports) and the builder that reads the ``callbacks`` section."""
from __future__ import annotations

from typing import Any


def build_callbacks(cfg: dict, job: Any) -> list:
    """Callbacks implied by the config (e.g. the sampler's refresh); empty for in-batch training."""
    return []
