"""Datamodules; importing this package registers them in :data:`contrastive.registry.DATAMODULES`."""
from datamodules import codesearch  # noqa: F401  (registers "codesearch")
from datamodules import clip  # noqa: F401,E402  (registers "clip")
