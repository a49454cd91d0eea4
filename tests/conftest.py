"""Shared fixtures: an isolated MLflow store per test, synthetic data, the shared real subset."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub

REPO = Path(__file__).resolve().parent.parent
SHARED_SUBSET = Path(os.environ.get("SKINML_TEST_SUBSET", REPO.parent / "shared" / "data" / "pad-ufes-20-subset"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite store and artifact root under tmp_path; nothing touches the project's."""
    from skinml import tracking

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SKINML_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("SKINML_CACHE_DIR", str(tmp_path / "cache"))
    tracking.setup_tracking()
    yield home
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from skinml.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n=150, image_size=48, seed=0)


@pytest.fixture(scope="session")
def shared_subset() -> Path:
    if not (SHARED_SUBSET / "metadata.csv").is_file():
        raise FileNotFoundError(
            f"the real PAD-UFES-20 subset is expected at {SHARED_SUBSET} (../shared beside the checkout); "
            "set SKINML_TEST_SUBSET to its folder"
        )
    return SHARED_SUBSET


@dataclass
class TinyTraining:
    home: str
    run_id: str
    checkpoint: str


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory, synthetic_dir) -> TinyTraining:
    """cnn_fusion with the test backbone, 1 epoch on synthetic data, in a store of its own,
    trained once per session for the registry and serving tests."""
    import mlflow

    from skinml import inference, tracking
    from skinml.steps.train import train
    from skinml.training.recipe import resolve_recipe

    cache = tmp_path_factory.mktemp("tiny-training")

    home = cache / "home"
    home.mkdir(parents=True)
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINML_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.setenv("SKINML_CACHE_DIR", str(cache / "images"))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        tracking.setup_tracking()
        recipe = resolve_recipe("default_v1", model="cnn_fusion", backbone="test_efficientnet", pretrained="none",
                                epochs=1, image_size=32, augment_resize=36, batch_size=16)
        result = train(recipe, data_dir=str(synthetic_dir), seed=0, num_workers=0)
        checkpoint = tracking.download_artifact(result.run_id, inference.BEST, cache / "checkpoint")
    mlflow.set_tracking_uri(previous_uri)
    return TinyTraining(str(home), result.run_id, str(checkpoint))
