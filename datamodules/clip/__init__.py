"""The vision–language setting: generated compositional scenes, caption perturbations (text and image
hard negatives), open_clip towers, image–text loaders for a user's data and compositional evaluation.

Modules: :mod:`.grammar` (caption grammar), :mod:`.scenes` (scene generation, rendering, cache),
:mod:`.lexicon` (concreteness), :mod:`.perturb` (SugarCrepe-style negatives), :mod:`.negatives`
(generated negatives for a batch, as tower inputs), :mod:`.models` (open_clip towers and export),
:mod:`.loaders` (manifest, COCO, WebDataset), :mod:`.evaluation` (retrieval, zero-shot, compositional
accuracy, SugarCrepe reader).
"""
from datamodules.clip import samplers  # noqa: F401,E402  (registers the generated-negative samplers)
from datamodules.clip.datamodule import ClipDataModule  # noqa: F401,E402  (registers "clip")
from datamodules.clip.model import ClipModule  # noqa: F401,E402  (registers the "clip" model)
