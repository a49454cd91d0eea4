"""Shared fixtures: an isolated MLflow store per test, synthetic data, the shared real subset."""

from __future__ import annotations

import os
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
