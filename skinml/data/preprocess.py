"""Metadata preprocessing, fitted on the training split only (scikit-learn's fit/transform style).

Numbers are z-scored with training statistics (training mean for missing values); categories
are encoded with the training vocabulary (training mode for missing values). Code 0 of every
categorical column is reserved for values never seen in training, so a new country or body
site at serving time maps to "unknown" instead of failing. ``UNK`` in the data is an ordinary
category of its own. The fitted state is plain JSON and round-trips exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinml.data import schema

UNSEEN = "<unseen>"
ENCODINGS = ("ordinal", "onehot")
_FORMAT_VERSION = 1


class MetadataError(ValueError):
    """A clinical field holds a value the preprocessor cannot use; names the row and column."""

    def __init__(self, message: str, row: Any = None, column: str | None = None):
        super().__init__(message)
        self.row = row
        self.column = column


class ColumnTable:
    """Raw rows held column by column, one list of values per column.

    :meth:`MetadataPreprocessor.transform` and the serving checks read a table only through
    ``columns``, ``index``, ``len()`` and ``table[column]`` (iterated), so a DataFrame works as
    well; this is the cheap form for a request of a few rows, where each pandas column access
    costs tens of microseconds and a request reads every clinical column several times.
    """

    __slots__ = ("_data", "index")

    def __init__(self, data: dict[str, list], index: Sequence):
        self._data = data
        self.index = list(index)
        for column, values in data.items():
            if len(values) != len(self.index):
                raise ValueError(f"column {column!r} has {len(values)} values for {len(self.index)} rows")

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, columns: Sequence[str] | None = None) -> ColumnTable:
        """``frame``'s ``columns`` (default all) as Python objects, as ``frame.astype(object)`` holds them."""
        if not frame.columns.is_unique:
            duplicated = list(dict.fromkeys(frame.columns[frame.columns.duplicated()]))
            raise ValueError(f"columns given more than once: {duplicated}")
        columns = list(frame.columns) if columns is None else list(columns)
        positions = frame.columns.get_indexer(columns)
        if (positions < 0).any():
            raise KeyError(f"no column {columns[int(np.argmax(positions < 0))]!r}")
        if len(frame) > 1 and len(columns) < len(frame.columns):
            # Only the wanted columns: a request's other column holds the photos, which the
            # conversion would copy (Arrow strings -> Python strings) for nothing.
            frame, positions = frame.iloc[:, positions], np.arange(len(columns))
        block = frame.to_numpy(dtype=object)  # one conversion, then plain lists (cheapest for one row)
        return cls({c: block[:, j].tolist() for c, j in zip(columns, positions)}, frame.index)

    @property
    def columns(self) -> list[str]:
        return list(self._data)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, column: str) -> list:
        return self._data[column]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self._data, index=pd.Index(self.index), columns=self.columns, dtype=object)


class MetadataPreprocessor:
    """Turn raw clinical columns (as in ``metadata.csv``) into a float32 feature matrix.

    Parameters
    ----------
    include_biopsed:
        ``biopsed`` is a label proxy and is excluded by default; True reproduces the original
        22-feature input.
    missing_indicators:
        Add a 0/1 ``<column>_missing`` feature for each column that had missing values in
        training. Off by default: in PAD-UFES-20 missingness itself predicts "benign".
    encoding:
        ``"ordinal"`` (one feature per categorical column, code = vocabulary index + 1, 0 for
        unseen) or ``"onehot"`` (one feature per training category plus one for unseen).
    """

    def __init__(self, include_biopsed: bool = False, missing_indicators: bool = False, encoding: str = "ordinal"):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.include_biopsed = bool(include_biopsed)
        self.missing_indicators = bool(missing_indicators)
        self.encoding = encoding

    # -- columns -------------------------------------------------------------------------
    @property
    def numeric_columns(self) -> list[str]:
        return list(schema.NUMERIC_FEATURES)

    @property
    def categorical_columns(self) -> list[str]:
        proxies = () if self.include_biopsed else schema.LABEL_PROXY_FEATURES
        return [c for c in schema.CATEGORICAL_FEATURES if c not in proxies]

    @property
    def input_columns(self) -> list[str]:
        used = {*self.numeric_columns, *self.categorical_columns}  # built once, not per feature
        return [c for c in schema.FEATURES if c in used]

    # -- parsing and validation, shared by fit and transform ------------------------------
    def _numeric(self, frame: pd.DataFrame, column: str) -> np.ndarray:
        values = np.full(len(frame), np.nan, dtype=np.float64)
        if column not in frame.columns:
            return values
        low, high = schema.NUMERIC_RANGES[column]
        for i, (row, raw) in enumerate(zip(frame.index, frame[column])):
            if schema.is_missing(raw):
                continue
            if isinstance(raw, bool):
                raise MetadataError(f"row {row}: {column} must be a number, got {raw!r}", row, column)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise MetadataError(f"row {row}: {column} must be a number, got {raw!r}", row, column) from None
            if not math.isfinite(value) or not low <= value <= high:
                raise MetadataError(
                    f"row {row}: {column}={raw!r} is out of range [{low:g}, {high:g}]", row, column
                )
            values[i] = value
        return values

    def _categories(self, frame: pd.DataFrame, column: str) -> list[str | None]:
        if column not in frame.columns:
            return [None] * len(frame)
        return [schema.canonical_category(column, v) for v in frame[column]]

    # -- fit / transform ------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame) -> MetadataPreprocessor:
        if len(frame) == 0:
            raise MetadataError("cannot fit the metadata preprocessor on zero rows")
        self.means_: dict[str, float] = {}
        self.stds_: dict[str, float] = {}
        self.modes_: dict[str, str] = {}
        self.vocabularies_: dict[str, list[str]] = {}
        self.indicator_columns_: list[str] = []
        for column in self.numeric_columns:
            values = self._numeric(frame, column)
            present = values[~np.isnan(values)]
            mean = float(present.mean()) if present.size else 0.0
            std = float(present.std()) if present.size > 1 else 0.0
            self.means_[column] = mean
            self.stds_[column] = std if std > 1e-12 else 1.0
            if self.missing_indicators and present.size < len(values):
                self.indicator_columns_.append(column)
        for column in self.categorical_columns:
            values = [v for v in self._categories(frame, column) if v is not None]
            counts = Counter(values)
            self.vocabularies_[column] = sorted(counts)
            # Most frequent; ties broken alphabetically so the mode never depends on row order.
            self.modes_[column] = min(counts, key=lambda v: (-counts[v], v)) if counts else UNSEEN
            if self.missing_indicators and len(values) < len(frame):
                self.indicator_columns_.append(column)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "vocabularies_"):
            raise RuntimeError("MetadataPreprocessor is not fitted: call fit() or load() first")

    def get_feature_names_out(self) -> list[str]:
        self._check_fitted()
        names = list(self.numeric_columns)
        for column in self.categorical_columns:
            if self.encoding == "ordinal":
                names.append(column)
            else:
                names += [f"{column}={v}" for v in (UNSEEN, *self.vocabularies_[column])]
        names += [f"{c}_missing" for c in self.indicator_columns_]
        return names

    def feature_fields(self) -> list[str]:
        """For each output column (in :meth:`get_feature_names_out` order), the input field it encodes."""
        self._check_fitted()
        fields = list(self.numeric_columns)
        for column in self.categorical_columns:
            fields += [column] * (1 if self.encoding == "ordinal" else len(self.vocabularies_[column]) + 1)
        return fields + list(self.indicator_columns_)

    @property
    def n_features_out(self) -> int:
        return len(self.get_feature_names_out())

    def unseen_values(self, frame: pd.DataFrame | ColumnTable) -> list[tuple[Any, str, str]]:
        """(row, column, value) for every present category not in the training vocabulary."""
        self._check_fitted()
        found = []
        for column in self.categorical_columns:
            vocab = set(self.vocabularies_[column])
            for row, value in zip(frame.index, self._categories(frame, column)):
                if value is not None and value not in vocab:
                    found.append((row, column, value))
        return found

    def transform(self, frame: pd.DataFrame | ColumnTable) -> np.ndarray:
        """Encode ``frame``; absent columns count as missing. Raises MetadataError on bad values."""
        self._check_fitted()
        blocks: list[np.ndarray] = []
        missing_masks: dict[str, np.ndarray] = {}
        for column in self.numeric_columns:
            values = self._numeric(frame, column)
            missing = np.isnan(values)
            missing_masks[column] = missing
            values = np.where(missing, self.means_[column], values)
            blocks.append(((values - self.means_[column]) / self.stds_[column])[:, None])
        for column in self.categorical_columns:
            vocab = self.vocabularies_[column]
            codes_of = {v: i + 1 for i, v in enumerate(vocab)}
            values = self._categories(frame, column)
            missing_masks[column] = np.array([v is None for v in values], dtype=bool)
            codes = np.array(
                [codes_of.get(self.modes_[column] if v is None else v, 0) for v in values], dtype=np.int64
            )
            if self.encoding == "ordinal":
                blocks.append(codes[:, None].astype(np.float64))
            else:
                onehot = np.zeros((len(frame), len(vocab) + 1))
                onehot[np.arange(len(frame)), codes] = 1.0
                blocks.append(onehot)
        for column in self.indicator_columns_:
            blocks.append(missing_masks[column][:, None].astype(np.float64))
        if not blocks:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def fit_transform(self, frame: pd.DataFrame) -> np.ndarray:
        return self.fit(frame).transform(frame)

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "format_version": _FORMAT_VERSION,
            "params": {
                "include_biopsed": self.include_biopsed,
                "missing_indicators": self.missing_indicators,
                "encoding": self.encoding,
            },
            "means": self.means_,
            "stds": self.stds_,
            "modes": self.modes_,
            "vocabularies": self.vocabularies_,
            "indicator_columns": self.indicator_columns_,
            "feature_names": self.get_feature_names_out(),
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MetadataPreprocessor:
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported preprocessor format {state.get('format_version')!r}")
        self = cls(**state["params"])
        self.means_ = {k: float(v) for k, v in state["means"].items()}
        self.stds_ = {k: float(v) for k, v in state["stds"].items()}
        self.modes_ = dict(state["modes"])
        self.vocabularies_ = {k: list(v) for k, v in state["vocabularies"].items()}
        self.indicator_columns_ = list(state["indicator_columns"])
        if self.get_feature_names_out() != state["feature_names"]:
            raise ValueError("preprocessor state is inconsistent: feature names do not match")
        return self

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MetadataPreprocessor:
        return cls.from_dict(json.loads(Path(path).read_text()))
