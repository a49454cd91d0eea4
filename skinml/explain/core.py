"""One photo + its clinical answers -> prediction, where the model looked, which answers moved it.

:func:`explain` takes a photo (path or bytes) and clinical values as in ``metadata.csv`` and
runs them through the same preprocessing as evaluation: the fitted preprocessor for the
answers, the evaluation transform for the photo. Callers that take user input clean it first as
the served model does (:func:`skinml.serving.schema.normalise_clinical`, which turns ``UNK`` into
"missing" where it is not a category); ``skinml explain`` and the served model's ``explain``
parameter both do, then call :func:`explain`, so they give the same answer for the same input.
This package sits below ``serving`` and does not import it.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from skinml.data import schema
from skinml.data.images import open_image, resize_to_array
from skinml.data.transforms import build_eval_transform, uint8_to_tensor
from skinml.explain import image as image_attr
from skinml.explain import metadata as metadata_attr
from skinml.explain.metadata import FieldContribution
from skinml.explain.overlay import overlay, png_bytes
from skinml.inference import AveragedModel, InferenceBundle


@dataclass
class Explanation:
    """A prediction and its attributions for one photo and its clinical answers."""

    label: str  # the predicted class
    probabilities: dict[str, float]
    target: str  # the class the maps and contributions explain (the predicted one unless asked)
    photo_size: tuple[int, int] | None  # (width, height) of the photo as sent
    heatmap: np.ndarray | None  # Grad-CAM on the feature grid, [0, 1]; None for metadata-only models
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # every image map, incl. "gradcam"
    input_size: int | None = None  # the model's square input side the maps were computed at
    map_offset: tuple[float, float] = (0.0, 0.0)  # receptive-field offset (dx, dy), input pixels
    view_size: int | None = None  # the side the photo was squashed to before the centre crop
    crop_offset: int = 0  # the centre crop's top/left offset in that square
    overlays: dict[str, bytes] = field(default_factory=dict)  # PNG per map, at photo_size
    metadata_contributions: list[FieldContribution] = field(default_factory=list)
    baseline: str = ""
    baseline_probability: float | None = None  # p(target) at the baseline patient, same photo
    method: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def overlay_png(self) -> bytes | None:
        return self.overlays.get("gradcam")

    def to_dict(self, include_images: bool = True) -> dict[str, Any]:
        """JSON-ready; the served ``explanation`` column is ``json.dumps`` of this."""
        out: dict[str, Any] = {
            "label": self.label,
            "probabilities": self.probabilities,
            "target": self.target,
            "photo_size": list(self.photo_size) if self.photo_size else None,
            "method": self.method,
            "baseline": self.baseline,
            "baseline_probability": self.baseline_probability,
            "metadata_contributions": [c.to_dict() for c in self.metadata_contributions],
            "heatmaps": {name: np.round(grid, 6).tolist() for name, grid in self.maps.items()},
            "heatmap_geometry": {"input_size": self.input_size, "receptive_field_offset_px": list(self.map_offset),
                                 "view_size": self.view_size or self.input_size, "crop_offset_px": self.crop_offset,
                                 "note": "the photo is squashed to view_size x view_size and its centre input_size "
                                         "x input_size square (crop_offset_px in from the top and left) is what the "
                                         "model saw; grid cell (i, j) is centred at ((j + 0.5) * input_size / w + dx "
                                         "+ crop, (i + 0.5) * input_size / h + dy + crop) in the view_size square"},
            "warnings": self.warnings,
        }
        if include_images:
            png = self.overlay_png
            out["overlay_png_base64"] = base64.b64encode(png).decode("ascii") if png else None
            out["attention_overlays_png_base64"] = {
                name: base64.b64encode(data).decode("ascii") for name, data in self.overlays.items() if name != "gradcam"
            }
        return out

    def to_json(self, include_images: bool = True) -> str:
        return json.dumps(self.to_dict(include_images), sort_keys=True)

    def summary(self, top: int = 5) -> str:
        """A few lines in clinical words: the prediction and the top contributions."""
        lines = [f"{self.label} ({schema.LABEL_NAMES.get(self.label, self.label)}): {self.probabilities[self.label]:.3f}"]
        if self.metadata_contributions:
            lines.append(f"clinical answers, contributions to p({self.target}) "
                         f"(baseline p={self.baseline_probability:.3f}):")
            lines += ["  " + c.text() for c in self.metadata_contributions[:top]]
        return "\n".join(lines)


def clinical_frame(bundle: InferenceBundle, metadata_row: dict[str, Any] | None) -> pd.DataFrame:
    """One-row frame of the clinical fields the model reads; unknown field names are refused."""
    metadata_row = dict(metadata_row or {})
    known = set(bundle.preprocessor.input_columns)
    unknown = sorted(k for k in metadata_row if k not in known)
    if unknown:
        # A misspelled field would otherwise silently count as "not answered".
        raise ValueError(f"unknown clinical field(s) {unknown}; the model reads {sorted(known)}")
    return pd.DataFrame([metadata_row], columns=list(bundle.preprocessor.input_columns), dtype=object)


def _target_index(bundle: InferenceBundle, target: str | int | None, probabilities: np.ndarray) -> int:
    if target is None:
        return int(np.argmax(probabilities))
    if isinstance(target, str):
        if target not in bundle.labels:
            raise ValueError(f"target {target!r} is not one of the model's labels {bundle.labels}")
        return bundle.labels.index(target)
    if not 0 <= int(target) < len(bundle.labels):
        raise ValueError(f"target index {target} is out of range for {len(bundle.labels)} labels")
    return int(target)


def explain_prepared(
    bundle: InferenceBundle,
    image: torch.Tensor | None,
    metadata: np.ndarray,
    values: dict[str, str | None],
    photo: Image.Image | None = None,
    target: str | int | None = None,
    n_permutations: int = metadata_attr.DEFAULT_PERMUTATIONS,
    seed: int = metadata_attr.DEFAULT_SEED,
    warnings: list[str] | None = None,
) -> Explanation:
    """Explain one already preprocessed row: ``image`` (3, S, S) normalised, ``metadata`` (F,)
    encoded, ``values`` its answers in clinical words; overlays are drawn on ``photo``."""
    model = bundle.model
    model.eval()
    x = image[None].float() if image is not None else None
    m = torch.as_tensor(np.asarray(metadata, dtype=np.float32)).reshape(1, -1)
    with torch.no_grad():
        logits = model(x, m).float()
    probabilities = torch.softmax(logits, dim=1)[0].numpy().astype(np.float64)
    target_index = _target_index(bundle, target, probabilities)
    labels = list(bundle.labels)

    methods = []
    maps: dict[str, np.ndarray] = {}
    offset = (0.0, 0.0)
    members = list(model.members) if isinstance(model, AveragedModel) else [model]
    if x is not None:
        offset = image_attr.receptive_field_offset(members[0], x.shape[-1])
        layer = image_attr.gradcam_layer(members[0])
        # An ensemble's map is the mean of its members' maps (each scaled to [0, 1]), on the photo
        # as sent: test-time flips change the probabilities, not where the evidence is drawn.
        grids = [image_attr.gradcam(member, x, m, target_index) for member in members]
        maps["gradcam"] = np.mean(grids, axis=0)
        peak = maps["gradcam"].max()
        maps["gradcam"] = maps["gradcam"] / peak if peak > 0 else maps["gradcam"]
        of = f"the mean over the {len(members)} ensemble members of " if len(members) > 1 else ""
        methods.append(f"image: Grad-CAM (Captum LayerGradCam, ReLU, scaled to [0, 1]) of {of}the {labels[target_index]} "
                       f"logit on {layer.description}, clinical answers held fixed; cells placed at their measured "
                       "receptive-field centres on the photo")
        attention = image_attr.attention_maps(members[0], x, m) if len(members) == 1 else {}
        if attention:
            maps.update(attention)
            methods.append("image: spatial_fusion's cross-attention weights over its tokens (CLS query and "
                           "metadata query, averaged over heads, scaled to [0, 1])")

    contributions: list[FieldContribution] = []
    baseline_text, baseline_probability = "", None
    if getattr(model, "uses_metadata", True) and bundle.preprocessor.n_features_out:
        contributions, baseline_probability, _ = metadata_attr.metadata_contributions(
            model, x, m, target_index, bundle.preprocessor, values, labels, n_permutations, seed)
        baseline_text = metadata_attr.metadata_baseline(bundle.preprocessor).description
        methods.append(f"metadata: Shapley value sampling (Captum, {n_permutations} field orders, seed {seed}) of "
                       f"p({labels[target_index]}) per clinical field, photo held fixed; contributions add up to "
                       "p(input) - p(baseline)")
    else:
        baseline_text = "not applicable: the model does not read the clinical answers"

    overlays = {}
    view = bundle.image_config.decode_size if x is not None and bundle.image_config is not None else None
    crop = bundle.image_config.crop_offset if view is not None else 0
    if photo is not None:
        overlays = {name: png_bytes(overlay(photo, grid, x.shape[-1], offset, view_size=view, crop=crop))
                    for name, grid in maps.items()}
    return Explanation(
        label=labels[int(np.argmax(probabilities))],
        probabilities={label: float(p) for label, p in zip(labels, probabilities)},
        target=labels[target_index],
        photo_size=tuple(photo.size) if photo is not None else None,
        heatmap=maps.get("gradcam"),
        maps=maps,
        input_size=int(x.shape[-1]) if x is not None else None,
        map_offset=offset,
        view_size=view,
        crop_offset=crop,
        overlays=overlays,
        metadata_contributions=contributions,
        baseline=baseline_text,
        baseline_probability=baseline_probability,
        method="; ".join(methods),
        warnings=list(warnings or []),
    )


def explain(
    bundle: InferenceBundle,
    photo: str | os.PathLike | bytes | None,
    metadata_row: dict[str, Any] | None = None,
    *,
    target: str | int | None = None,
    n_permutations: int = metadata_attr.DEFAULT_PERMUTATIONS,
    seed: int = metadata_attr.DEFAULT_SEED,
    warnings: list[str] | None = None,
) -> Explanation:
    """Predict and explain one photo (path or encoded bytes) with its clinical answers.

    ``metadata_row`` maps clinical fields (``age``, ``region``, ``bleed`` ...) to values as in
    ``metadata.csv``; fields left out are imputed as in training. ``target`` explains another
    class than the predicted one; ``warnings`` are passed through to the explanation.
    """
    clinical = clinical_frame(bundle, metadata_row)
    encoded = bundle.preprocessor.transform(clinical)[0]
    values = metadata_attr.clinical_values(clinical, bundle.preprocessor)[0]

    image, picture = None, None
    if bundle.uses_images:
        if photo is None:
            raise ValueError("this model reads the photo: pass a PNG/JPEG path or bytes")
        config = bundle.image_config
        name = None if isinstance(photo, bytes) else str(photo)
        picture = open_image(photo if isinstance(photo, bytes) else os.fspath(photo), name=name,
                             max_pixels=config.max_pixels)
        # The steps of skinml.data.transforms.prepare_image, with the decoded photo kept for the overlay.
        image = build_eval_transform(config)(uint8_to_tensor(resize_to_array(picture, config.decode_size)))
    return explain_prepared(bundle, image, encoded, values, picture, target, n_permutations, seed, warnings)
