"""Single-modality baselines: ``cnn_fusion`` with one branch removed.

Both keep the ``forward(image, metadata)`` signature of the fusion models, so training,
evaluation and serving treat every model alike; the unused input is ignored (may be None).
"""

from __future__ import annotations

import torch
from torch import nn

from skinml.models.backbones import backbone_data_config, check_backbone_name, check_pretrained
from skinml.models.cnn_fusion import (
    DEFAULT_BACKBONE,
    METADATA_EMBED_DIM,
    MetadataMLP,
    build_cnn_branch,
    classifier_head,
)
from skinml.models.registry import (
    SkinClassifier,
    check_data_config,
    check_num_metadata_features,
    check_probability,
    json_data_config,
    register_model,
)


@register_model("image_only", family="baseline")
class ImageOnlyBaseline(SkinClassifier):
    """The CNN branch and head of cnn_fusion; metadata is ignored."""

    uses_metadata = False
    weights_options = ("pretrained",)

    def __init__(
        self,
        num_metadata_features: int,
        *,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str = "auto",
        head_dropout: float = 0.5,
        drop_path: float = 0.0,
        data_config: dict | None = None,
    ) -> None:
        super().__init__()
        # Kept (and allowed to be 0) so every config has the same shape and the baseline can
        # be swapped for a fusion model without touching the data pipeline.
        self.num_metadata_features = check_num_metadata_features(num_metadata_features, minimum=0)
        backbone = check_backbone_name(backbone)
        pretrained = check_pretrained(pretrained)
        head_dropout = check_probability("head_dropout", head_dropout)
        drop_path = check_probability("drop_path", drop_path)
        data_config = check_data_config(data_config)

        loaded, self.data_config = build_cnn_branch(backbone, pretrained, data_config, drop_path)
        self.backbone = loaded.module
        self.head = classifier_head(self.backbone.num_features, head_dropout)

        self.weights_source = loaded.weights_source
        self.backbone_names = (backbone,)
        self.options = {
            "backbone": backbone,
            "pretrained": pretrained,
            "head_dropout": head_dropout,
            "drop_path": drop_path,
            "data_config": json_data_config(self.data_config),
        }

    def image_backbones(self) -> list[nn.Module]:
        return [self.backbone]

    def get_classifier(self) -> nn.Linear:
        return self.head[-1]

    def forward_features(self, image: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(image)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, metadata))


@register_model("metadata_only", family="baseline")
class MetadataOnlyBaseline(SkinClassifier):
    """The metadata MLP and head of cnn_fusion; the image is ignored."""

    uses_images = False
    backbone_option = None
    weights_options = ("pretrained",)

    def __init__(
        self,
        num_metadata_features: int,
        *,
        metadata_dropout: float = 0.3,
        head_dropout: float = 0.5,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        # `pretrained` has nothing to load here; it is accepted so that every model can be
        # rebuilt from its config the same way, with pretrained="none".
        check_pretrained(pretrained)
        self.num_metadata_features = check_num_metadata_features(num_metadata_features)
        metadata_dropout = check_probability("metadata_dropout", metadata_dropout)
        head_dropout = check_probability("head_dropout", head_dropout)

        self.metadata_mlp = MetadataMLP(self.num_metadata_features, metadata_dropout)
        self.head = classifier_head(METADATA_EMBED_DIM, head_dropout)

        self.weights_source = "none (no image backbone)"
        self.backbone_names = ()
        # The image is ignored, but a pipeline shared with the image models still produces one;
        # the default backbone's preprocessing keeps that pipeline identical for every model.
        self.data_config = backbone_data_config(DEFAULT_BACKBONE)
        self.options = {
            "metadata_dropout": metadata_dropout,
            "head_dropout": head_dropout,
            "pretrained": "none",
        }

    def get_classifier(self) -> nn.Linear:
        return self.head[-1]

    def forward_features(self, image: torch.Tensor | None, metadata: torch.Tensor) -> torch.Tensor:
        return self.metadata_mlp(metadata)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, image: torch.Tensor | None, metadata: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, metadata))
