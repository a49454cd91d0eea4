"""Where a PAD-UFES-20 copy lives, and how to load and validate it.

Resolution order for the folder: an explicit ``data_dir``, else ``$SKINML_DATA_DIR``, else a
download through kagglehub (Kaggle dataset ``mahdavi1202/skin-cancer``).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path

import pandas as pd

from skinml.data import schema

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SKINML_DATA_DIR"
KAGGLE_DATASET = "mahdavi1202/skin-cancer"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
METADATA_FILE = "metadata.csv"


class DatasetError(ValueError):
    """The dataset folder or its metadata is not usable; the message says what to fix."""


class DatasetUnavailableError(DatasetError):
    """No local copy was given and the download could not happen."""


def _network_reachable(host: str = "www.kaggle.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_with_kagglehub() -> Path:
    hint = (
        f"Point skinml at a local copy instead: pass data_dir=/path/to/pad-ufes-20 (or --data-dir), "
        f"or set {DATA_DIR_ENV}=/path/to/pad-ufes-20 (a folder holding metadata.csv and the images, "
        f"e.g. ../shared/data/pad-ufes-20-subset)."
    )
    # Check reachability ourselves first: kagglehub retries for minutes when offline.
    if not _network_reachable():
        raise DatasetUnavailableError(
            f"No data folder was given and Kaggle cannot be reached to download "
            f"'{KAGGLE_DATASET}'. {hint}"
        )
    try:
        import kagglehub

        return Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as exc:  # kagglehub raises many kinds; all mean the same to the user
        raise DatasetUnavailableError(
            f"Downloading '{KAGGLE_DATASET}' with kagglehub failed ({type(exc).__name__}: {exc}). {hint}"
        ) from exc


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder that holds a PAD-UFES-20 copy (``metadata.csv`` somewhere under it)."""
    if data_dir in (None, ""):
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"${DATA_DIR_ENV}"
    else:
        source = "data_dir"
    root = _download_with_kagglehub() if data_dir is None else Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{source} points at '{root}', which is not a folder.")
    find_metadata_file(root)  # fail early, with a clear message, when the folder is wrong
    return root.resolve()


def find_metadata_file(root: Path) -> Path:
    direct = root / METADATA_FILE
    if direct.is_file():
        return direct
    found = sorted(root.rglob(METADATA_FILE))
    if not found:
        raise DatasetError(f"No {METADATA_FILE} found under '{root}'.")
    return found[0]


def index_images(root: Path) -> dict[str, Path]:
    """Map image stem -> file for every image anywhere under ``root`` (one walk).

    Matching by stem lets ``PAT_1_2_3.png`` in the metadata find ``PAT_1_2_3.jpg`` on disk; the
    Kaggle copy nests ``imgs_part_N/imgs_part_N/``. When two files share a stem the
    alphabetically first path wins, so the choice never depends on walk order.
    """
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(path.stem, path)
    return index


def read_metadata(path: Path) -> pd.DataFrame:
    """Read metadata.csv keeping every value as text (``True``/``3.0`` stay as written)."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as exc:
        raise DatasetError(f"Cannot read '{path}': {exc}") from exc
    missing = [c for c in schema.COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"'{path}' lacks column(s) {', '.join(missing)} (expected all 26 PAD-UFES-20 columns).")
    return frame


def validate_labels(frame: pd.DataFrame, path: Path | str = "metadata") -> pd.DataFrame:
    """Map diagnosis aliases (BOD -> SCC) and reject anything outside the label set."""
    raw = frame[schema.TARGET]
    mapped = raw.map(schema.canonical_label)
    bad = mapped.isna()
    if bad.any():
        rows = frame.index[bad]
        values = sorted({str(v) for v in raw[bad]})
        raise DatasetError(
            f"'{path}' has unknown diagnostic value(s) {values} in {int(bad.sum())} row(s) "
            f"(first rows: {[int(r) + 2 for r in rows[:5]]}, counting the header as line 1); "
            f"expected one of {list(schema.LABELS)} or {list(schema.DIAGNOSIS_ALIASES)}."
        )
    n_alias = int((raw.str.strip().str.upper() != mapped).sum())
    if n_alias:
        log.info("Mapped %d diagnostic value(s) %s to their class", n_alias, schema.DIAGNOSIS_ALIASES)
    frame = frame.copy()
    frame[schema.TARGET] = mapped
    return frame


def load_metadata(data_dir: str | os.PathLike | None = None, drop_missing_images: bool = False) -> pd.DataFrame:
    """Load and validate a PAD-UFES-20 copy; adds an ``image_path`` column.

    Rows whose image is absent are an error, unless ``drop_missing_images`` is set: then they
    are dropped, counted in ``frame.attrs["dropped_missing_images"]`` and warned about.
    """
    root = resolve_data_dir(data_dir)
    meta_path = find_metadata_file(root)
    frame = validate_labels(read_metadata(meta_path), meta_path)
    dup = frame[schema.IMAGE_ID].duplicated()
    if dup.any():
        raise DatasetError(f"'{meta_path}' lists img_id(s) more than once: {sorted(frame.loc[dup, schema.IMAGE_ID])[:5]}")

    index = index_images(root)
    stems = frame[schema.IMAGE_ID].map(lambda s: Path(str(s)).stem)
    frame["image_path"] = stems.map(lambda s: str(index[s]) if s in index else None)
    missing = frame["image_path"].isna()
    n_missing = int(missing.sum())
    if n_missing and not drop_missing_images:
        first = list(frame.loc[missing, schema.IMAGE_ID][:5])
        raise DatasetError(
            f"{n_missing} of {len(frame)} rows in '{meta_path}' have no image under '{root}' "
            f"(first: {first}). Pass drop_missing_images=True (--drop-missing-images) to drop them."
        )
    if n_missing:
        warnings.warn(f"Dropped {n_missing} row(s) whose image is missing under '{root}'.", stacklevel=2)
        log.warning("Dropped %d row(s) whose image is missing", n_missing)
        frame = frame.loc[~missing]
    frame = frame.reset_index(drop=True)
    frame.attrs.update(
        data_dir=str(root), metadata_path=str(meta_path), dropped_missing_images=n_missing
    )
    return frame
