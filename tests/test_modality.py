"""Questionnaire dropout masks exactly the questionnaire fields, at the chosen rate, reproducibly."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.steps.train import train
from skinml.training.modality import FieldDropout
from tests.test_training import tiny


@pytest.fixture(scope="module")
def answered(synthetic_dir):
    frame = load_metadata(synthetic_dir)
    complete = frame[frame[list(schema.QUESTIONNAIRE_FEATURES)].notna().all(axis=1)].reset_index(drop=True)
    return complete


@pytest.mark.parametrize("encoding, indicators", [("ordinal", False), ("onehot", True)])
def test_masks_exactly_the_questionnaire_at_the_rate(answered, encoding, indicators):
    pre = MetadataPreprocessor(missing_indicators=indicators, encoding=encoding).fit(answered)
    rows = pd.concat([answered] * 40, ignore_index=True)  # enough rows to measure the rate
    encoded = torch.from_numpy(pre.transform(rows))
    dropout = FieldDropout(pre, p=0.3)
    out = dropout(encoded, torch.Generator().manual_seed(7))

    unanswered = rows.copy()
    unanswered[list(schema.QUESTIONNAIRE_FEATURES)] = None
    expected_masked = torch.from_numpy(pre.transform(unanswered))
    fields = pre.feature_fields()
    questionnaire = torch.tensor([f in schema.QUESTIONNAIRE_FEATURES for f in fields])
    changed_rows = (out != encoded).any(dim=1)
    masked_rows = (out[:, questionnaire] == expected_masked[:, questionnaire]).all(dim=1)
    # Other fields (age, region, symptoms) are never touched.
    assert torch.equal(out[:, ~questionnaire], encoded[:, ~questionnaire])
    # Every row is either untouched or has its whole questionnaire "not answered".
    assert bool(((out == encoded).all(dim=1) | masked_rows).all())
    rate = masked_rows.float().mean().item()
    assert abs(rate - 0.3) < 0.05, rate
    assert changed_rows.sum() <= masked_rows.sum()
    # Seeded: the same generator seed masks the same rows.
    assert torch.equal(out, dropout(encoded, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, dropout(encoded, torch.Generator().manual_seed(8)))
    assert torch.equal(FieldDropout(pre, p=0.0)(encoded, torch.Generator().manual_seed(7)), encoded)
    assert set(np.array(fields)[questionnaire.numpy()]) == set(schema.QUESTIONNAIRE_FEATURES)


def test_refuses_bad_rates_and_fields(answered):
    pre = MetadataPreprocessor().fit(answered)
    with pytest.raises(ValueError, match="questionnaire_dropout must be in"):
        FieldDropout(pre, p=1.5)
    with pytest.raises(ValueError, match="not encoded by this preprocessor.*biopsed"):
        FieldDropout(pre, p=0.5, fields=("biopsed",))
    with pytest.raises(ValueError, match="questionnaire_dropout must be in"):
        tiny(questionnaire_dropout=2)


def test_training_with_questionnaire_dropout_is_logged_and_reproducible(mlflow_store, synthetic_dir):
    recipe = tiny(epochs=2, questionnaire_dropout=0.5)
    first = train(recipe, data_dir=str(synthetic_dir), seed=2, num_workers=0)
    split = mlflow.MlflowClient().get_run(first.run_id).data.params["split_run_id"]
    again = train(recipe, data_dir=str(synthetic_dir), split=split, seed=2, num_workers=0)
    assert [h["train_loss"] for h in again.history] == pytest.approx([h["train_loss"] for h in first.history])
    plain = train(tiny(epochs=2), data_dir=str(synthetic_dir), split=split, seed=2, num_workers=0)
    assert [h["train_loss"] for h in plain.history] != pytest.approx([h["train_loss"] for h in first.history])
    run = mlflow.MlflowClient().get_run(first.run_id)
    assert run.data.params["recipe.questionnaire_dropout"] == "0.5"
    assert "questionnaire_dropout" in run.data.tags["skinml.recipe_overrides"]
