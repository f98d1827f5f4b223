"""Feature-space transformations between the encoder and the loss, registered in
:data:`contrastive.registry.TRANSFORMS`: ``positive_extrapolation``, ``negative_interpolation``, ``mochi``,
``pipeline``. See :mod:`contrastive.transforms.feature` for the call signature."""
from contrastive.transforms.feature import (Compose, FeatureBatch, FeatureTransform, FeatureTransformPipeline, MoCHi,
                                            MochiSample, NegativeInterpolation, PositiveExtrapolation,
                                            mochi_synthesize, to_contrastive_inputs)

__all__ = [
    "Compose",
    "FeatureBatch",
    "FeatureTransform",
    "FeatureTransformPipeline",
    "MoCHi",
    "MochiSample",
    "NegativeInterpolation",
    "PositiveExtrapolation",
    "mochi_synthesize",
    "to_contrastive_inputs",
]
