"""Spatial fusion: a ViT summary and the metadata each query the CNN's spatial feature map.

The CNN feature map ``(B, C, H, W)`` becomes H*W tokens (49 at 224 px for stride-32 CNNs such
as ResNet-50 or EfficientNet-Lite0). The ViT's pooled (CLS) embedding and the projected
metadata are two queries, each with its own cross-attention over those tokens, so the model can
show where in the lesion image each modality looked (``return_attention=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from skinml.models.backbones import backbone_data_config, check_backbone_name, check_pretrained, create_backbone
from skinml.models.cnn_fusion import build_cnn_branch, check_metadata, classifier_head
from skinml.models.registry import (
    SkinClassifier,
    check_data_config,
    check_num_metadata_features,
    check_positive_int,
    check_probability,
    json_data_config,
    register_model,
)


@register_model("spatial_fusion", family="fusion")
class SpatialVisionFusion(SkinClassifier):
    """ViT CLS and metadata queries cross-attend over CNN feature-map tokens; MLP head.

    One image goes in, normalised with ``data_config``, which is the CNN branch's (the feature
    map the attention reads comes from it). The ViT was trained with its own mean/std, so the
    image is re-normalised for it inside the model: an exact per-channel affine map, with no
    second preprocessing pipeline to keep in step. The ViT's position embedding is built for
    ``img_size`` pixels (default: the CNN weights' input size) and resampled for other sizes
    where timm supports it (``dynamic_img_size``), as it does for its VisionTransformer.
    """

    backbone_option = "cnn_backbone"
    weights_options = ("pretrained", "vit_pretrained")

    def __init__(
        self,
        num_metadata_features: int,
        *,
        cnn_backbone: str = "resnet50",
        vit_backbone: str = "vit_base_patch16_224",
        proj_dim: int = 512,
        num_heads: int = 8,
        attn_dropout: float = 0.1,
        head_dropout: float = 0.5,
        pretrained: str = "auto",
        vit_pretrained: str | None = None,
        img_size: int | None = None,
        data_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.num_metadata_features = check_num_metadata_features(num_metadata_features)
        cnn_backbone = check_backbone_name(cnn_backbone, "cnn_backbone")
        vit_backbone = check_backbone_name(vit_backbone, "vit_backbone")
        proj_dim = check_positive_int("proj_dim", proj_dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if proj_dim % num_heads:
            raise ValueError(f"proj_dim ({proj_dim}) must be divisible by num_heads ({num_heads}).")
        attn_dropout = check_probability("attn_dropout", attn_dropout)
        head_dropout = check_probability("head_dropout", head_dropout)
        pretrained = check_pretrained(pretrained)
        # None follows `pretrained` so that pretrained="none" alone gives a weight-free model;
        # otherwise the ViT takes its default weights (no package ships ViT weights).
        vit_weights = check_pretrained(
            vit_pretrained or ("none" if pretrained == "none" else "auto"), "vit_pretrained"
        )
        if img_size is not None:
            img_size = check_positive_int("img_size", img_size)
        data_config = check_data_config(data_config)

        cnn, self.data_config = build_cnn_branch(cnn_backbone, pretrained, data_config)
        img_size = img_size or self.data_config["input_size"]
        self.data_config = {**self.data_config, "input_size": img_size}
        vit = _create_vit(vit_backbone, vit_weights, img_size)
        self.cnn = cnn.module
        self.vit = vit.module

        vit_config = backbone_data_config(vit_backbone, vit_weights)
        scale, shift = _renormalisation(self.data_config, vit_config)
        # Derived from the config, not learned: kept out of the state dict.
        self.register_buffer("vit_input_scale", scale, persistent=False)
        self.register_buffer("vit_input_shift", shift, persistent=False)

        self.token_proj = nn.Conv2d(self.cnn.num_features, proj_dim, kernel_size=1)
        self.vit_proj = nn.Linear(self.vit.num_features, proj_dim)
        self.metadata_proj = nn.Linear(self.num_metadata_features, proj_dim)
        self.image_attention = nn.MultiheadAttention(
            proj_dim, num_heads, dropout=attn_dropout, batch_first=True
        )
        self.metadata_attention = nn.MultiheadAttention(
            proj_dim, num_heads, dropout=attn_dropout, batch_first=True
        )
        self.head = classifier_head(2 * proj_dim, head_dropout)

        #: (H, W) of the token grid the last forward pass attended over.
        self.attention_grid: tuple[int, int] | None = None
        self.weights_source = f"cnn={cnn.weights_source}; vit={vit.weights_source}"
        self.backbone_names = (cnn_backbone, vit_backbone)
        self.options = {
            "cnn_backbone": cnn_backbone,
            "vit_backbone": vit_backbone,
            "proj_dim": proj_dim,
            "num_heads": num_heads,
            "attn_dropout": attn_dropout,
            "head_dropout": head_dropout,
            "pretrained": pretrained,
            "vit_pretrained": vit_pretrained if vit_pretrained is None else vit_weights,
            "img_size": img_size,
            "data_config": json_data_config(self.data_config),
        }

    def image_backbones(self) -> list[nn.Module]:
        return [self.cnn, self.vit]

    def get_classifier(self) -> nn.Linear:
        return self.head[-1]

    def forward_features(
        self, image: torch.Tensor, metadata: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fused vector ``(B, 2 * proj_dim)``: [ViT-attended, metadata-attended]."""
        check_metadata(metadata, self.num_metadata_features)
        feature_map = self.cnn.forward_features(image)
        if feature_map.ndim != 4:
            raise ValueError(
                f"cnn_backbone={self.backbone_names[0]!r} gives features of shape {tuple(feature_map.shape)}; "
                "spatial_fusion needs a CNN whose forward_features is a (B, C, H, W) map."
            )
        height, width = feature_map.shape[-2:]
        self.attention_grid = (int(height), int(width))
        tokens = self.token_proj(feature_map).flatten(2).transpose(1, 2)  # (B, H*W, proj_dim)

        vit_embedding = self.vit(image * self.vit_input_scale + self.vit_input_shift)
        image_query = self.vit_proj(vit_embedding).unsqueeze(1)
        metadata_query = self.metadata_proj(metadata).unsqueeze(1)

        image_attended, image_weights = self.image_attention(
            image_query, tokens, tokens, need_weights=return_attention, average_attn_weights=True
        )
        metadata_attended, metadata_weights = self.metadata_attention(
            metadata_query, tokens, tokens, need_weights=return_attention, average_attn_weights=True
        )
        fused = torch.cat([image_attended.squeeze(1), metadata_attended.squeeze(1)], dim=1)
        if not return_attention:
            return fused
        # Averaged over heads; each row sums to 1 in eval mode (training applies dropout to it).
        return fused, {"image": image_weights.squeeze(1), "metadata": metadata_weights.squeeze(1)}

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(
        self, image: torch.Tensor, metadata: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits ``(B, NUM_CLASSES)``; with ``return_attention``, also ``{"image", "metadata"}``
        attention weights ``(B, H*W)`` over the grid ``self.attention_grid`` (row-major)."""
        if not return_attention:
            return self.forward_head(self.forward_features(image, metadata))
        fused, attention = self.forward_features(image, metadata, return_attention=True)
        return self.forward_head(fused), attention


def _create_vit(name: str, pretrained: str, img_size: int):
    """Build the ViT for ``img_size`` pixels, and let it take other sizes where timm can
    (position embeddings resampled on the fly), so a training recipe's image size is not
    tied to the ViT's. Models without these arguments simply do not get them."""
    attempts = ({"img_size": img_size, "dynamic_img_size": True}, {"img_size": img_size}, {})
    for kwargs in attempts:
        try:
            return create_backbone(name, pretrained, num_classes=0, **kwargs)
        except TypeError as error:
            if not any(key in str(error) for key in kwargs):
                raise
    raise AssertionError("unreachable: the last attempt passes no size arguments")


def _renormalisation(given: dict, wanted: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift turning an image normalised as ``given`` into ``wanted``:
    (x * s_g + m_g - m_w) / s_w."""
    mean_given, std_given = torch.tensor(given["mean"]), torch.tensor(given["std"])
    mean_wanted, std_wanted = torch.tensor(wanted["mean"]), torch.tensor(wanted["std"])
    scale = std_given / std_wanted
    shift = (mean_given - mean_wanted) / std_wanted
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)
