"""The team tracking server (PostgreSQL + ``mlflow server`` proxying artifacts): its setup logic,
the pipeline run through it by the ``skinml`` CLI, and concurrent trainings logging to it."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from skinml import team_server
from skinml.team_server import ServerConfig, TeamServerError

REPO = Path(__file__).resolve().parent.parent

MODEL_NAME = "skin-lesion-classifier"
TINY_TRAIN = ["--model", "cnn_fusion", "--backbone", "test_efficientnet", "--pretrained", "none", "--epochs", "1",
              "--image-size", "32", "--set", "augment_resize=36", "--batch-size", "16", "--num-workers", "0"]


# ------------------------------------------------------------------------------------------------
# Setup logic, no server
# ------------------------------------------------------------------------------------------------

def test_config_lays_out_home_and_survives_a_round_trip(tmp_path):
    config = ServerConfig(home=tmp_path, host="0.0.0.0", port=5123, db_port=5433)
    assert config.pgdata == tmp_path.resolve() / "pgdata"
    assert config.artifacts == tmp_path.resolve() / "artifacts"
    assert config.url == "http://127.0.0.1:5123"  # a wildcard bind is reached on loopback locally
    config.save()
    loaded = ServerConfig.load(tmp_path)
    assert (loaded.port, loaded.db_port, loaded.pgdata, loaded.host) == (5123, 5433, config.pgdata, "0.0.0.0")


def test_stop_and_status_name_a_folder_without_a_server(tmp_path):
    with pytest.raises(TeamServerError, match=r"no team server was started in .*server\.json is missing"):
        ServerConfig.load(tmp_path)
    from skinml.cli.server import server

    result = CliRunner().invoke(server, ["status", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert "server.json is missing" in result.output


def test_backend_uri_names_the_driver_and_quotes_the_password(tmp_path):
    config = ServerConfig(home=tmp_path, db_port=6543)
    config.password_file.write_text("p@ss/w:rd%\n")
    uri = team_server.backend_store_uri(config)
    assert uri == "postgresql+psycopg2://skinml:p%40ss%2Fw%3Ard%25@127.0.0.1:6543/skinml"


def test_password_is_created_once_and_private(tmp_path):
    config = ServerConfig(home=tmp_path)
    first = team_server.db_password(config)
    assert len(first) >= 24 and team_server.db_password(config) == first
    assert config.password_file.stat().st_mode & 0o777 == 0o600


def test_init_refuses_a_folder_that_is_not_a_cluster(tmp_path):
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "notes.txt").write_text("not a database")
    with pytest.raises(TeamServerError, match=r"pgdata is not empty and holds no PostgreSQL cluster"):
        team_server.init_cluster(ServerConfig(home=tmp_path))


def test_socket_goes_to_tmp_when_the_path_is_too_long(tmp_path):
    assert team_server.socket_dir(ServerConfig(home=tmp_path, db_port=5432)) == (tmp_path / "pgdata").resolve()
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert team_server.socket_dir(ServerConfig(home=deep)) == Path("/tmp")


def test_root_needs_the_postgres_user(monkeypatch):
    import pwd

    def missing(name):
        raise KeyError(name)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", missing)
    with pytest.raises(TeamServerError, match=r"'postgres'.*apt-get install postgresql"):
        team_server.db_os_user()


def test_pg_bin_override_must_hold_initdb(tmp_path, monkeypatch):
    monkeypatch.setenv(team_server.PG_BIN_ENV, str(tmp_path))
    with pytest.raises(TeamServerError, match=r"SKINML_PG_BIN=.* holds no initdb"):
        team_server.pg_bin_dir()


# ------------------------------------------------------------------------------------------------
# A real server
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    """PostgreSQL and the MLflow server on free loopback ports, for this module's tests.

    Not under pytest's tmp_path: as root the database runs as `postgres`, which cannot pass
    through pytest's private /tmp/pytest-of-root."""
    home = Path(tempfile.mkdtemp(prefix="skinml-team-"))
    config = ServerConfig(home=home, port=team_server.free_port(), db_port=team_server.free_port(), workers=2)
    try:
        team_server.start(config, timeout=240)
        yield config
    finally:
        team_server.stop(config)
        shutil.rmtree(home, ignore_errors=True)


def _client_env(server: ServerConfig, client_home: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.url, SKINML_HOME=str(client_home),
               MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def _skinml(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "skinml", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"skinml {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _pg(server: ServerConfig):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=server.db_port, dbname=team_server.DB_NAME,
                            user=team_server.DB_ROLE, password=team_server.db_password(server), connect_timeout=10)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a real database, server and several trainings; minutes on a busy 2-core CI machine
def test_server_status_and_restart_keep_the_data(server, tmp_path):
    from skinml.cli.server import server as server_cli

    result = CliRunner().invoke(server_cli, ["status", "--home", str(server.home)])
    assert result.exit_code == 0, result.output
    assert '"mlflow_healthy": true' in result.output and '"postgres_running": true' in result.output
    # Starting a running server again is a no-op that keeps the same MLflow process.
    pid = team_server.status(server)["mlflow_pid"]
    team_server.start(ServerConfig.load(server.home))
    assert team_server.status(server)["mlflow_pid"] == pid


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a real database, server and several trainings; minutes on a busy 2-core CI machine
def test_pipeline_runs_through_the_team_server(server, synthetic_dir, tmp_path, monkeypatch):
    """split -> train -> evaluate -> register with the unchanged CLI, then the champion is loaded
    from the registry and scores a photo; runs live in PostgreSQL, files under the artifacts
    destination, nothing on the client's disk."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from skinml.data import schema
    from skinml.serving import client as serving_client

    client_home = tmp_path / "client"
    client_home.mkdir()
    env = _client_env(server, client_home)
    experiment = "team-pipeline"

    _skinml(env, "split", "--data-dir", str(synthetic_dir), "--experiment", experiment)
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name(experiment)
    # The server chose the artifact location: proxied, not a path on the client's disk.
    assert exp.artifact_location == f"mlflow-artifacts:/{exp.experiment_id}"
    (split_run,) = client.search_runs([exp.experiment_id])

    out = _skinml(env, "train", *TINY_TRAIN, "--split", split_run.info.run_id, "--data-dir", str(synthetic_dir),
                  "--experiment", experiment)
    run_id = re.search(r"training run ([0-9a-f]{32})", out).group(1)
    _skinml(env, "evaluate", "--run-id", run_id, "--n-boot", "50")
    _skinml(env, "compare", run_id, "--out", str(tmp_path / "compare"))
    assert run_id in (tmp_path / "compare" / "runs.csv").read_text()
    out = _skinml(env, "register", "--run-id", run_id)
    version = re.search(rf"registered {MODEL_NAME} version (\d+) from training run {run_id}", out).group(1)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test_balanced_accuracy"] <= 1.0
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == version

    # The rows are in PostgreSQL.
    with _pg(server) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, experiment_id FROM runs WHERE run_uuid = %s", (run_id,))
        assert cur.fetchone() == ("FINISHED", int(exp.experiment_id))
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,))
        steps = sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics)
        assert cur.fetchone()[0] == steps
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL_NAME,))
        assert cur.fetchall() == [("champion", int(version))]

    # The files are under the artifacts destination, byte for byte what a client downloads.
    on_server = server.artifacts / exp.experiment_id / run_id / "artifacts" / "checkpoints" / "best.pt"
    assert on_server.is_file()
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/best.pt",
                                                          dst_path=str(tmp_path / "dl"), tracking_uri=server.url))
    assert _sha256(downloaded) == _sha256(on_server)
    assert not (client_home / "mlruns").exists() and not (client_home / "mlflow.db").exists()

    # The champion, loaded through the registry on the server, scores a photo.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    photo = next(p for p in sorted(Path(synthetic_dir).rglob("*.png")))
    answer = model.predict(serving_client.build_request([photo], [{"age": 55, "region": "FACE"}]))
    assert len(answer) == 1
    assert answer.loc[0, "label"] in schema.LABELS
    assert sum(answer.loc[0, label] for label in schema.LABELS) == pytest.approx(1.0, abs=1e-4)

    # The demo page, pointed at the server, loads the same champion and gives the same answer.
    from fastapi.testclient import TestClient

    from skinml.app import build_app

    mlflow.set_tracking_uri(server.url)
    try:
        app = build_app(f"models:/{MODEL_NAME}@champion")
        with TestClient(app) as page:
            body = page.post("/api/predict", files={"image": ("lesion.png", photo.read_bytes(), "image/png")},
                             data={"age": "55", "region": "FACE"})
    finally:
        mlflow.set_tracking_uri(previous)
    assert body.status_code == 200, body.text
    for label in schema.LABELS:
        assert body.json()["probabilities"][label] == pytest.approx(float(answer.loc[0, label]), abs=1e-6)

    # `mlflow run .` (an MLproject entry point) logs to the server unchanged.
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "split", "--env-manager", "local",
                           "--experiment-name", "team-mlproject", "-P", f"data_dir={synthetic_dir}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    project = client.get_experiment_by_name("team-mlproject")
    (mlproject_run,) = client.search_runs([project.experiment_id])
    assert mlproject_run.info.status == "FINISHED" and mlproject_run.data.tags["skinml.step"] == "split"
    assert [a.path for a in client.list_artifacts(mlproject_run.info.run_id, "split")] == [
        "split/manifest.csv", "split/summary.csv"]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a real database, server and several trainings; minutes on a busy 2-core CI machine
def test_four_concurrent_trainings_all_arrive(server, synthetic_dir, tmp_path):
    """4 training processes log at once: every run, metric step and artifact is stored."""
    from skinml import tracking_load

    client_home = tmp_path / "client"
    client_home.mkdir()
    split = tracking_load.make_split(server.url, synthetic_dir, client_home)
    result = tracking_load.run_trainings(server.url, synthetic_dir, split, jobs=4, epochs=2, home=client_home,
                                         timeout=480)
    assert not result.failed, result.failed
    counts = {job.run_id: tracking_load.run_counts(server.url, job.run_id) for job in result.jobs}
    assert len(counts) == 4
    shapes = [tracking_load.shape(c) for c in counts.values()]
    assert all(s == shapes[0] for s in shapes), shapes
    assert shapes[0]["status"] == "FINISHED"
    assert shapes[0]["metric_steps"]["val_loss"] == 2  # one step per epoch
    assert {"checkpoints/best.pt", "checkpoints/last.pt"} <= set(shapes[0]["artifacts"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    with _pg(server) as conn, conn.cursor() as cur:
        for run_id, count in counts.items():
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s", (run_id,))
            assert cur.fetchone()[0] == sum(count["metric_steps"].values())
            experiment_id = client.get_run(run_id).info.experiment_id
            root = server.artifacts / experiment_id / run_id / "artifacts"
            for path, size in count["artifacts"].items():
                assert (root / path).stat().st_size == size, path
