"""Skin-lesion classifiers: clinical photo + patient metadata -> ``schema.LABELS`` logits.

Build every model through :func:`create_model`::

    model = create_model("cnn_fusion", num_metadata_features=21)       # Lite0 weights, offline
    logits = model(image, metadata)                                     # (B, NUM_CLASSES)
    rebuilt = create_model_from_config(model.config)                    # same architecture, no weights

Importing the model modules registers them; :data:`MODEL_NAMES` lists what exists.
"""

# Importing a model module registers it; this order is the order of MODEL_NAMES.
from skinml.models import cnn_fusion  # noqa: I001, F401
from skinml.models import spatial_fusion  # noqa: F401
from skinml.models import baselines  # noqa: F401
from skinml.models.backbones import (
    PACKAGED_WEIGHTS,
    PRETRAINED_KEYWORDS,
    PretrainedWeightsUnavailable,
    backbone_data_config,
    create_backbone,
)
from skinml.models.baselines import ImageOnlyBaseline, MetadataOnlyBaseline
from skinml.models.cnn_fusion import MultiModalCNNFusion
from skinml.models.registry import (
    SkinClassifier,
    create_model,
    create_model_from_config,
    describe_models,
    model_class,
    model_options,
)
from skinml.models.registry import model_names as _model_names
from skinml.models.spatial_fusion import SpatialVisionFusion

#: Every registered model name: ``("cnn_fusion", "spatial_fusion", "image_only", "metadata_only")``.
MODEL_NAMES: tuple[str, ...] = _model_names()

__all__ = [
    "MODEL_NAMES",
    "PACKAGED_WEIGHTS",
    "PRETRAINED_KEYWORDS",
    "ImageOnlyBaseline",
    "MetadataOnlyBaseline",
    "MultiModalCNNFusion",
    "PretrainedWeightsUnavailable",
    "SkinClassifier",
    "SpatialVisionFusion",
    "backbone_data_config",
    "create_backbone",
    "create_model",
    "create_model_from_config",
    "describe_models",
    "model_class",
    "model_options",
]
