"""Modality dropout: train the model to diagnose from the photo when answers are missing.

In PAD-UFES-20 a missing questionnaire means "benign" (all 804 rows without one are benign), so
a fusion model can live on the absence of answers. Masking the questionnaire of a random share
of training samples, i.e. giving them exactly the encoding the preprocessor gives an
unanswered questionnaire, breaks that shortcut: "not answered" then occurs for every
diagnosis, and the image branch has to carry the decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor


class FieldDropout:
    """With probability ``p`` per sample, set ``fields`` to their "not answered" encoding."""

    def __init__(self, preprocessor: MetadataPreprocessor, p: float,
                 fields: Sequence[str] = schema.QUESTIONNAIRE_FEATURES) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"questionnaire_dropout must be in [0, 1], got {p}")
        unknown = sorted(set(fields) - set(preprocessor.input_columns))
        if unknown:
            raise ValueError(f"fields not encoded by this preprocessor: {unknown}")
        self.p = float(p)
        self.fields = tuple(fields)
        owner = preprocessor.feature_fields()
        self.columns = torch.tensor([i for i, field in enumerate(owner) if field in self.fields], dtype=torch.long)
        unanswered = preprocessor.transform(pd.DataFrame({c: [None] for c in preprocessor.input_columns}))[0]
        self.values = torch.as_tensor(unanswered[self.columns.numpy()], dtype=torch.float32)

    def __call__(self, metadata: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A copy of ``metadata`` (B, F) with the chosen rows' fields masked; draws B numbers."""
        chosen = torch.rand(len(metadata), generator=generator) < self.p
        if not bool(chosen.any()):
            return metadata
        out = metadata.clone()
        rows = chosen.nonzero().squeeze(1).to(metadata.device)
        out[rows[:, None], self.columns.to(metadata.device)[None, :]] = self.values.to(metadata.device)
        return out
