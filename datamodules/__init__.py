"""Datamodules; importing this package registers them in :data:`contrastive.registry.DATAMODULES`."""
from datamodules import codesearch  # noqa: F401  (registers "codesearch")
