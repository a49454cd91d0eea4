"""Where in the photo the model looked: Grad-CAM (Captum) and spatial_fusion's own attention.

Grad-CAM is taken on the last feature map the CNN backbone hands on (the map its global pooling
averages for ``cnn_fusion`` and ``image_only``; the map ``spatial_fusion`` turns into its 49
tokens). That map is the deepest one that still has a spatial layout, which is what Grad-CAM
needs; at 224 px and stride 32 it is 7 x 7. The metadata is held fixed at the row's own values
while the gradient flows to the image.

**Where a cell sits on the photo.** Upsampling a map as if each cell were centred in its block
of the image puts it half a cell off: with stride-2 convolutions padded symmetrically, a cell's
receptive field is centred near its block's top-left corner (about 15 px at stride 32), which
moves the heatmap a visible step down and right of what the model looked at.
:func:`receptive_field_offset` measures that offset once per model and input size (the
input-gradient centroid of one feature cell) and the overlay places the map accordingly.

``spatial_fusion`` also returns its cross-attention weights over those tokens: one map for the
ViT (CLS) query, one for the metadata query. Attention says which tokens were *read*, not that
they pushed the prediction either way; Grad-CAM is class-specific. Both are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class FeatureLayer:
    module: nn.Module
    description: str


def gradcam_layer(model: nn.Module) -> FeatureLayer:
    """The module whose *input* is the backbone's last spatial feature map."""
    from skinml.models import SpatialVisionFusion

    if isinstance(model, SpatialVisionFusion):
        return FeatureLayer(model.token_proj, f"the {model.backbone_names[0]} feature map that becomes the "
                                              "attention tokens (input of token_proj)")
    backbone = getattr(model, "backbone", None)
    # timm CNNs pool in `global_pool`, or inside their head (ConvNeXt-style heads).
    pool = getattr(backbone, "global_pool", None)
    if pool is None:
        pool = getattr(getattr(backbone, "head", None), "global_pool", None)
    if not getattr(model, "uses_images", True) or pool is None:
        raise ValueError(f"model {type(model).__name__} has no CNN feature map to explain (uses_images="
                         f"{getattr(model, 'uses_images', None)}); Grad-CAM needs an image model")
    name = getattr(model, "backbone_names", ("backbone",))[0]
    return FeatureLayer(pool, f"the last {name} feature map (input of its global pooling)")


def gradcam(model: nn.Module, image: torch.Tensor, metadata: torch.Tensor | None, target: int,
            relu: bool = True) -> np.ndarray:
    """Grad-CAM of class ``target`` for one image (1, 3, S, S): an (h, w) map on the feature grid.

    With ``relu`` (Grad-CAM as published) only evidence *for* the class remains and the map is
    scaled to [0, 1] (all zeros when nothing in the image speaks for the class). ``relu=False``
    gives the raw signed map, e.g. to compare rankings between models.
    """
    from captum.attr import LayerGradCam

    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one preprocessed photo of shape (1, 3, S, S), got {tuple(image.shape)}")
    layer = gradcam_layer(model)
    model.eval()

    def logits(x: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return model(x, m).float()

    with torch.enable_grad():
        attribution = LayerGradCam(logits, layer.module).attribute(
            image, target=target, additional_forward_args=(metadata,), attribute_to_layer_input=True,
            relu_attributions=relu,
        )
    heatmap = attribution.detach()[0, 0].cpu().numpy().astype(np.float64)
    if relu:
        peak = heatmap.max()
        heatmap = heatmap / peak if peak > 0 else np.zeros_like(heatmap)
    return heatmap


def attention_maps(model: nn.Module, image: torch.Tensor, metadata: torch.Tensor) -> dict[str, np.ndarray]:
    """``spatial_fusion``'s cross-attention over its tokens, as (h, w) maps scaled to [0, 1]:
    ``attention_cls`` (the ViT query) and ``attention_metadata`` (the metadata query)."""
    from skinml.models import SpatialVisionFusion

    if not isinstance(model, SpatialVisionFusion):
        return {}
    model.eval()
    with torch.no_grad():
        _, weights = model(image, metadata, return_attention=True)
    height, width = model.attention_grid
    maps = {}
    for key, name in (("image", "attention_cls"), ("metadata", "attention_metadata")):
        grid = weights[key][0].float().reshape(height, width).cpu().numpy().astype(np.float64)
        maps[name] = grid / grid.max() if grid.max() > 0 else grid
    return maps


_OFFSET_CACHE = "_skinml_receptive_field_offset"


def receptive_field_offset(model: nn.Module, image_size: int, samples: int = 4) -> tuple[float, float]:
    """(dx, dy) in model-input pixels: where the middle feature cell's receptive field is centred
    minus the centre of its block, averaged over a few random inputs (fixed seed).

    Measured as the centroid of |d cell / d input|, which is translation-invariant away from the
    borders for a convolutional stack, so one cell gives every cell's offset. Cached on the model.
    """
    cache = getattr(model, _OFFSET_CACHE, None)
    if cache is None:
        cache = {}
        object.__setattr__(model, _OFFSET_CACHE, cache)
    if image_size in cache:
        return cache[image_size]
    layer = gradcam_layer(model)
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_module, inputs):
        captured["map"] = inputs[0]

    handle = layer.module.register_forward_pre_hook(keep_input)
    generator = torch.Generator().manual_seed(0)
    features = getattr(model, "num_metadata_features", 0)
    centres = []
    model.eval()
    try:
        with torch.enable_grad():
            for _ in range(samples):
                x = torch.randn(1, 3, image_size, image_size, generator=generator).requires_grad_(True)
                model(x, torch.zeros(1, features))
                grid = captured["map"]
                height, width = grid.shape[-2:]
                (gradient,) = torch.autograd.grad(grid[0, :, height // 2, width // 2].sum(), x)
                weight = gradient.abs().sum(dim=(0, 1)).double()
                if float(weight.sum()) <= 0:
                    continue
                ys, xs = torch.meshgrid(torch.arange(image_size) + 0.5, torch.arange(image_size) + 0.5, indexing="ij")
                cx = float((weight * xs).sum() / weight.sum()) - (width // 2 + 0.5) * image_size / width
                cy = float((weight * ys).sum() / weight.sum()) - (height // 2 + 0.5) * image_size / height
                centres.append((cx, cy))
    finally:
        handle.remove()
    offset = (float(np.mean([c[0] for c in centres])), float(np.mean([c[1] for c in centres]))) if centres else (0.0, 0.0)
    cache[image_size] = offset
    return offset
