"""A synthetic folder shaped like PAD-UFES-20, for tests and for trying skinml without the data.

Images are PNGs of a skin-coloured background with a lesion whose colour and shape depend on
the diagnosis, so a model can learn them; metadata has all 26 columns with the real
vocabularies, missing questionnaires (only on benign rows, as in the real data) and ``UNK``s.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinml.data import schema

#: Lesion colour (RGB) and shape per class: distinct enough for a tiny CNN to separate.
_LESION_STYLE = {
    "ACK": ((200, 80, 70), "disk"),
    "BCC": ((230, 170, 180), "ring"),
    "MEL": ((30, 20, 25), "disk"),
    "NEV": ((120, 70, 40), "disk"),
    "SCC": ((180, 40, 40), "square"),
    "SEK": ((140, 120, 60), "square"),
}
_CLASS_WEIGHTS = {"ACK": 0.24, "BCC": 0.32, "MEL": 0.06, "NEV": 0.18, "SCC": 0.07, "SEK": 0.13}


def _draw(label: str, size: int, rng: np.random.Generator) -> np.ndarray:
    skin = np.array([224, 180, 150]) + rng.integers(-25, 25, 3)
    image = np.clip(skin + rng.normal(0, 8, (size, size, 3)), 0, 255)
    colour, shape = _LESION_STYLE[label]
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.18, 0.3) * size
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(yy - cy, xx - cx)
    if shape == "disk":
        mask = dist < radius
    elif shape == "ring":
        mask = (dist < radius) & (dist > radius * 0.55)
    else:
        mask = (np.abs(yy - cy) < radius * 0.85) & (np.abs(xx - cx) < radius * 0.85)
    lesion = np.array(colour) + rng.normal(0, 10, (size, size, 3))
    image[mask] = lesion[mask]
    return np.clip(image, 0, 255).astype(np.uint8)


def _bool(rng: np.random.Generator, p_true: float, p_unk: float = 0.0) -> str:
    u = rng.random()
    return schema.UNKNOWN_TOKEN if u < p_unk else ("True" if u < p_unk + p_true else "False")


def make_synthetic_dataset(out: str | os.PathLike, n: int = 120, image_size: int = 64, seed: int = 0,
                           nested: bool = False) -> Path:
    """Write ``n`` images and a 26-column ``metadata.csv`` under ``out``; returns the folder.

    With ``nested`` the images go to ``imgs_part_1/imgs_part_1/`` as in the Kaggle copy.
    """
    if n < 12:
        raise ValueError(f"n must be at least 12 (two images per class), got {n}")
    rng = np.random.default_rng(seed)
    out = Path(out)
    image_dir = out / "imgs_part_1" / "imgs_part_1" if nested else out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    labels = list(schema.LABELS) * 2  # every class present
    labels += list(rng.choice(list(_CLASS_WEIGHTS), size=n - len(labels), p=list(_CLASS_WEIGHTS.values())))
    rng.shuffle(labels)

    rows, patient, image_counter, i = [], 1000, 1, 0
    while i < n:
        patient += 1
        n_images = min(int(rng.integers(1, 4)), n - i)
        lesion = int(rng.integers(1, 3000))
        complete = rng.random() < 0.65
        for k in range(n_images):
            label = labels[i + k]
            # As in the real data, a missing questionnaire only ever occurs on benign rows.
            has_questionnaire = complete or label in schema.MALIGNANT_LABELS
            img_id = f"PAT_{patient}_{lesion + k}_{image_counter}.png"
            image_counter += 1
            Image.fromarray(_draw(label, image_size, rng)).save(image_dir / img_id)
            row = {c: None for c in schema.COLUMNS}
            row.update(
                patient_id=f"PAT_{patient}",
                lesion_id=str(lesion + k),
                age=int(rng.integers(6, 95)),
                region=str(rng.choice(schema.REGIONS)),
                diagnostic=label,
                img_id=img_id,
                biopsed=str(label in schema.MALIGNANT_LABELS or rng.random() < 0.3),
                **{f: _bool(rng, 0.5, 0.1) for f in ("itch", "grew", "hurt", "changed", "bleed", "elevation")},
            )
            if has_questionnaire:
                countries = [c for c in schema.VOCABULARIES["background_father"]]
                row.update(
                    smoke=_bool(rng, 0.2),
                    drink=_bool(rng, 0.3),
                    background_father=str(rng.choice(countries)),
                    background_mother=str(rng.choice(countries)),
                    pesticide=_bool(rng, 0.4),
                    gender=str(rng.choice(["FEMALE", "MALE"])),
                    skin_cancer_history=_bool(rng, 0.45),
                    cancer_history=_bool(rng, 0.5),
                    has_piped_water=_bool(rng, 0.6),
                    has_sewage_system=_bool(rng, 0.5),
                    fitspatrick=f"{int(rng.integers(1, 5))}.0",
                    diameter_1=float(rng.integers(2, 30)),
                    diameter_2=float(rng.integers(2, 25)),
                )
            rows.append(row)
        i += n_images
    pd.DataFrame(rows, columns=list(schema.COLUMNS)).to_csv(out / "metadata.csv", index=False)
    return out
