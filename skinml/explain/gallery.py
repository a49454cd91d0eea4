"""An explanation gallery of a scored split: per class, where the model is surest and right, and
where it is surest and wrong.

For each true class: the most confident *correct* case (the highest p(class) among the class's
rows predicted as it) and the most confident *wrong* case (the highest winning probability among
the class's rows predicted as something else: a missed melanoma called NEV with 0.9 shows
here). Each case gets the photo, its Grad-CAM overlay (drawn on the photo as it was, not the
squashed model input), true and predicted labels, and its top clinical-answer contributions.

Written to ``out_dir``: ``class_<LABEL>.png`` (one grid per class), ``gallery.html`` (one
self-contained page, images inlined as base64, viewable in MLflow's artifact browser) and
``gallery.json`` (the cases and their explanations, without images).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from skinml.data import schema
from skinml.data.images import open_image
from skinml.data.transforms import build_eval_transform, uint8_to_tensor
from skinml.explain import metadata as metadata_attr
from skinml.explain.core import Explanation, explain_prepared
from skinml.inference import InferenceBundle

#: Longest side of the photos shown in the gallery (the overlay is drawn at this size, the
#: photo's aspect ratio kept); full-size PAD-UFES-20 photos would make the page tens of MB.
DEFAULT_MAX_SIDE = 384
TOP_CONTRIBUTIONS = 4


def select_cases(y_true: np.ndarray, proba: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """Per true class, the most confident correct and the most confident wrong row (if any)."""
    predicted = proba.argmax(axis=1)
    confidence = proba.max(axis=1)
    cases = []
    for k, label in enumerate(labels):
        of_class = np.flatnonzero(y_true == k)
        right = of_class[predicted[of_class] == k]
        wrong = of_class[predicted[of_class] != k]
        for kind, rows in (("correct", right), ("wrong", wrong)):
            if len(rows):
                # Stable: ties go to the first row, so the gallery does not depend on sort internals.
                best = rows[np.argsort(-confidence[rows], kind="stable")[0]]
                cases.append({"class": label, "kind": kind, "row": int(best)})
    return cases


def _photo(frame: pd.DataFrame, row: int, images: np.ndarray | None, max_side: int) -> Image.Image | None:
    path = frame["image_path"].iloc[row] if "image_path" in frame.columns else None
    if path is not None and not schema.is_missing(path) and os.path.isfile(str(path)):
        picture = open_image(str(path))
    elif images is not None:
        picture = Image.fromarray(images[row])  # no original at hand: the evaluation view
    else:
        return None
    picture = picture.copy()
    picture.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return picture


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(image: Image.Image) -> bytes:
    from skinml.explain.overlay import png_bytes

    return png_bytes(image)


def _class_figure(label: str, entries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, len(entries))
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 9.0), squeeze=False)
    for j, entry in enumerate(entries):
        explanation: Explanation = entry["explanation"]
        photo, overlaid = entry["photo"], entry["overlay"]
        title = f"{entry['kind']}: true {entry['true']}, predicted {entry['predicted']} (p={entry['p']:.2f})\n{entry['img_id']}"
        for i, picture in enumerate((photo, overlaid)):
            ax = axes[i, j]
            ax.axis("off")
            if picture is not None:
                ax.imshow(np.asarray(picture))
            ax.set_title(title if i == 0 else "Grad-CAM of the predicted class", fontsize=8)
        lines = [c.text() for c in explanation.metadata_contributions[:TOP_CONTRIBUTIONS]]
        axes[1, j].text(0.0, -0.04, "\n".join(lines) or "(no clinical answers read)", transform=axes[1, j].transAxes,
                        fontsize=7, va="top", family="monospace")
    fig.suptitle(f"{label} ({schema.LABEL_NAMES.get(label, label)}): most confident correct and wrong", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html_page(sections: list[tuple[str, list[dict[str, Any]]]], baseline: str, method: str) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>skinml explanations</title><style>",
             "body{font-family:sans-serif;margin:1.5em;max-width:1400px} .cases{display:flex;flex-wrap:wrap;gap:1.5em}",
             ".case{border:1px solid #ccc;padding:.6em;max-width:820px} .case img{max-width:390px;margin-right:4px}",
             "table{border-collapse:collapse;font-size:.85em} td{padding:1px 8px} .pos{color:#b00} .neg{color:#06c}",
             ".wrong h3{color:#b00} .note{font-size:.85em;color:#444}</style></head><body>",
             "<h1>Explanations: most confident correct and wrong case per true class</h1>",
             f"<p class='note'><b>Method.</b> {html.escape(method)}</p>",
             f"<p class='note'><b>Metadata baseline.</b> {html.escape(baseline)}</p>",
             "<p class='note'>Grad-CAM shows which regions raised the predicted class's score, not why, and not "
             "whether the region is the lesion for a clinically sound reason. Contributions are changes of the "
             "predicted class's probability relative to the baseline patient with the same photo.</p>"]
    for label, entries in sections:
        parts.append(f"<h2>{html.escape(label)}: {html.escape(schema.LABEL_NAMES.get(label, label))}</h2>")
        if not entries:
            parts.append("<p>no rows of this class</p>")
            continue
        parts.append("<div class='cases'>")
        for entry in entries:
            explanation: Explanation = entry["explanation"]
            predicted = entry["predicted"]
            parts.append(f"<div class='case {entry['kind']}'><h3>{entry['kind']}: true {entry['true']}, predicted "
                         f"{predicted} (p={entry['p']:.3f})</h3>"
                         f"<div class='note'>{html.escape(str(entry['img_id']))}</div>")
            for picture, alt in ((entry["photo"], "photo"), (entry["overlay"], "Grad-CAM overlay")):
                if picture is not None:
                    parts.append(f"<img alt='{alt}' src='data:image/png;base64,{_b64(_png(picture))}'>")
            rows = "".join(
                f"<tr><td>{html.escape(c.field)}</td><td>{html.escape(c.value or '(not answered)')}</td>"
                f"<td class='{'pos' if c.contribution >= 0 else 'neg'}'>{c.contribution:+.3f}</td></tr>"
                for c in explanation.metadata_contributions[:TOP_CONTRIBUTIONS])
            if rows:
                parts.append(f"<table><tr><th>field</th><th>answer</th><th>towards {html.escape(predicted)}</th></tr>"
                             f"{rows}</table><div class='note'>baseline p({html.escape(predicted)}) = "
                             f"{explanation.baseline_probability:.3f}</div>")
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_gallery(
    bundle: InferenceBundle,
    frame: pd.DataFrame,
    images: np.ndarray | None,
    proba: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    n_permutations: int = metadata_attr.DEFAULT_PERMUTATIONS,
) -> list[Path]:
    """Write the gallery of a scored split into ``out_dir``; returns the files written.

    ``frame`` holds the split's rows (``metadata.csv`` columns, ``image_path``, ``diagnostic``),
    ``images`` their evaluation view ((N, S, S, 3) uint8 from :func:`skinml.inference.decode_images`,
    None for metadata-only models) and ``proba`` the model's (N, classes) probabilities, as
    ``steps/evaluate.py`` has them.
    """
    if len(frame) != len(proba):
        raise ValueError(f"frame has {len(frame)} rows but proba has {len(proba)}")
    if images is not None and len(images) != len(frame):
        raise ValueError(f"frame has {len(frame)} rows but images has {len(images)}")
    if schema.TARGET not in frame.columns:
        raise ValueError(f"frame has no '{schema.TARGET}' column: the gallery needs the true labels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = list(bundle.labels)
    y_true = frame[schema.TARGET].map({label: i for i, label in enumerate(labels)}).to_numpy()
    if np.isnan(y_true.astype(float)).any():
        bad = sorted(set(frame[schema.TARGET][pd.isna(y_true)].astype(str)))
        raise ValueError(f"'{schema.TARGET}' holds labels the model does not know: {bad}")

    frame = frame.reset_index(drop=True)
    encoded = bundle.preprocessor.transform(frame)
    values = metadata_attr.clinical_values(frame, bundle.preprocessor)
    transform = build_eval_transform(bundle.image_config) if bundle.uses_images else None
    entries_by_class: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    records = []
    for case in select_cases(y_true.astype(int), np.asarray(proba), labels):
        row = case["row"]
        image = transform(uint8_to_tensor(images[row])) if transform is not None and images is not None else None
        photo = _photo(frame, row, images, max_side) if bundle.uses_images else None
        # The class the evaluation predicted (from ``proba``) is the one explained and shown.
        predicted = labels[int(np.argmax(proba[row]))]
        explanation = explain_prepared(bundle, image, encoded[row], values[row], photo, predicted, n_permutations)
        overlay = Image.open(io.BytesIO(explanation.overlay_png)) if explanation.overlay_png else None
        img_id = frame[schema.IMAGE_ID].iloc[row] if schema.IMAGE_ID in frame else row
        entry = {**case, "true": case["class"], "predicted": predicted, "p": float(np.max(proba[row])),
                 "img_id": img_id, "explanation": explanation, "photo": photo, "overlay": overlay}
        entries_by_class[case["class"]].append(entry)
        records.append({**explanation.to_dict(include_images=False), "class": case["class"], "kind": case["kind"],
                        "img_id": str(entry["img_id"]), "true": case["class"], "predicted": predicted,
                        "probabilities_scored": dict(zip(labels, map(float, proba[row])))})

    written = []
    for label, entries in entries_by_class.items():
        if entries:
            path = out / f"class_{label}.png"
            _class_figure(label, entries, path)
            written.append(path)
    any_explanation = next((e["explanation"] for es in entries_by_class.values() for e in es), None)
    page = _html_page(list(entries_by_class.items()), any_explanation.baseline if any_explanation else "",
                      any_explanation.method if any_explanation else "")
    (out / "gallery.html").write_text(page, encoding="utf-8")
    (out / "gallery.json").write_text(json.dumps(records, indent=2, sort_keys=True), encoding="utf-8")
    written += [out / "gallery.html", out / "gallery.json"]
    return written
