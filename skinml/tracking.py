"""MLflow store setup and logging helpers.

Default store: SQLite ``mlflow.db`` for tracking and the registry, artifacts under ``mlruns/``,
both at the project root, whatever the working directory. ``MLFLOW_TRACKING_URI`` wins when
set. Inside ``mlflow run`` the run it started (``MLFLOW_RUN_ID``) is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# MLflow draws a progress bar for every artifact download, even of one small CSV; the tables the
# comparison commands print would sit under a stack of them. A user who wants them sets it to true.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from skinml import constants  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = constants.EXPERIMENT_NAME
#: MLflow 3's UI opens an experiment with this kind on its training-runs table (not the GenAI view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
HOME_ENV = "SKINML_HOME"
#: Tags every skinml run carries, used to find runs of a kind without name clashes.
TAG_STEP = "skinml.step"
TAG_FAMILY = "skinml.model_family"
TAG_MODEL = "skinml.model"
TAG_RECIPE = "skinml.recipe"
TAG_SPLIT_HASH = "skinml.split_manifest_sha256"
TAG_SPLIT_RUN = "skinml.split_run_id"
TAG_TRAIN_RUN = "skinml.train_run_id"
#: Recipe fields a training changed from its preset (empty: the preset as chosen).
TAG_RECIPE_OVERRIDES = "skinml.recipe_overrides"


def project_root() -> Path:
    """The folder holding ``MLproject``: ``$SKINML_HOME``, else the checkout this package is in,
    else the current directory."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "MLproject").is_file():
        return here
    return Path.cwd().resolve()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_root() / "mlruns"


_initialised: set[str] = set()


def setup_tracking() -> str:
    """Point MLflow at the project store, creating or upgrading the database once.

    Creation happens under an exclusive file lock: several processes creating a new SQLite
    database at once corrupt it for good (README, "Facts the code relies on").
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _initialised:
        return uri
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        db_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = db_path.with_name(db_path.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                # Creating the store runs the schema migrations; the explicit artifact root
                # pins the Default experiment's artifacts under mlruns/ too.
                artifact_root().mkdir(parents=True, exist_ok=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    SqlAlchemyStore(uri, artifact_root().as_uri())
                _adopt_default_experiment()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _initialised.add(uri)
    return uri


def _adopt_default_experiment() -> None:
    """In the project's own store, MLflow's empty ``Default`` experiment becomes ``skinml``.

    ``mlflow run .`` puts its runs in experiment id 0 unless told ``--experiment-name``; naming
    that experiment ``skinml`` makes ``mlflow run`` and ``skinml`` commands land in one place.
    A store whose ``Default`` already holds runs, or that has a ``skinml`` experiment, is left
    as it is.
    """
    client = MlflowClient()
    if client.get_experiment_by_name(DEFAULT_EXPERIMENT) is not None:
        return
    default = client.get_experiment("0")
    if default.name != "Default" or client.search_runs(["0"], max_results=1):
        return
    client.rename_experiment("0", DEFAULT_EXPERIMENT)
    client.set_experiment_tag("0", EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def get_experiment_id(name: str = DEFAULT_EXPERIMENT) -> str:
    """Existing experiment id, or a new experiment whose artifacts live under ``mlruns/<name>``.

    Every experiment skinml uses is marked as a model-training experiment for the UI.
    """
    setup_tracking()
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = (artifact_root() / name).as_uri() if _is_local_store() else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment_id = client.get_experiment_by_name(name).experiment_id
        return experiment_id
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _is_local_store() -> bool:
    """The tracking URI is a database on this machine (artifacts go under the project's mlruns/).

    A tracking server (http://...) chooses its own artifact location (proxied artifacts).
    """
    return not mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))


@contextlib.contextmanager
def start_run(
    step: str,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    log_system_metrics: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, under ``mlflow run``, resume) a run tagged with its step and git commit.

    A run that raises is ended as FAILED by MLflow's context manager; nothing else is touched.
    """
    setup_tracking()
    all_tags = {TAG_STEP: step, **git_tags(), **(tags or {})}
    env_run = os.environ.get("MLFLOW_RUN_ID")
    active = mlflow.active_run()
    if active is not None:
        # A step inside another (the main pipeline): a child run in the parent's experiment.
        # (MLflow would otherwise pick $MLFLOW_RUN_ID up again, even for a nested run.)
        with outside_env_run():
            run = mlflow.start_run(experiment_id=active.info.experiment_id, run_name=run_name, nested=True,
                                   log_system_metrics=log_system_metrics)
    elif env_run:
        # `mlflow run` created this step's run: use it (its experiment was chosen there), once.
        run = mlflow.start_run(run_id=env_run, log_system_metrics=log_system_metrics)
        os.environ.pop("MLFLOW_RUN_ID", None)
        if MlflowClient().get_experiment(run.info.experiment_id).name == "Default":
            log.warning("this run is in MLflow's 'Default' experiment; `mlflow run . --experiment-name %s` "
                        "keeps it with the other skinml runs", DEFAULT_EXPERIMENT)
        if run_name:
            all_tags["mlflow.runName"] = run_name
    else:
        # Under `mlflow run`, extra runs (a split made on the way) join the experiment it chose.
        experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment_id = get_experiment_id(experiment) if experiment else (
            os.environ.get("MLFLOW_EXPERIMENT_ID") or get_experiment_id(DEFAULT_EXPERIMENT))
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, log_system_metrics=log_system_metrics)
    with run:
        mlflow.set_tags(all_tags)
        yield run


@contextlib.contextmanager
def outside_env_run() -> Iterator[None]:
    """Start runs that are not the one `mlflow run` made for this step (MLflow would reuse it)."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def git_tags() -> dict[str, str]:
    """Commit of the checkout this code runs from (and whether it had uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        # A copy without .git (a container, a batch machine) can say which commit it is.
        commit = os.environ.get("SKINML_GIT_COMMIT")
        return {"mlflow.source.git.commit": commit, "skinml.git_commit": commit} if commit else {}
    return {"mlflow.source.git.commit": commit, "skinml.git_commit": commit, "skinml.git_dirty": str(bool(dirty))}


def host_tags() -> dict[str, str]:
    """What a seeded training's figures depend on besides code, data and seed: the CPU (model and
    the instruction set torch's kernels use) and the number of threads torch computes with. The order of floating-point sums follows both, and
    a 20-epoch training amplifies the difference (README, "The default's five seeds, retrained")."""
    import platform

    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"skinml.cpu": cpu, "skinml.cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "skinml.torch_threads": str(torch.get_num_threads()),
            "skinml.torch_version": torch.__version__}


def log_json(data: Any, artifact_file: str) -> None:
    mlflow.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)


#: How a store reports that another process inserted the same row first (PostgreSQL, SQLite, MySQL).
_DUPLICATE_KEY_MARKERS = ("duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def log_input(dataset: Any, context: str, attempts: int = 4) -> None:
    """``mlflow.log_input``, safe when several runs log the same dataset at once.

    MLflow's store looks the dataset up and inserts it if absent in one transaction, so two
    trainings starting together on one tracking server can both miss it and the second insert
    fails on the dataset's primary key (``duplicate key value violates unique constraint
    "dataset_pk"``). The failed transaction is rolled back whole; logging again finds the row the
    other run inserted and only links this run to it. Any other error is raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except mlflow.exceptions.MlflowException as exc:
            if attempt == attempts or not any(marker in str(exc) for marker in _DUPLICATE_KEY_MARKERS):
                raise
            log.info("dataset %s was inserted by another run meanwhile; logging it again (%d/%d)",
                     getattr(dataset, "name", "?"), attempt, attempts)
            time.sleep(0.05 * attempt)


def param_text(value: Any) -> str:
    """How a parameter value is stored (so searches can compare against it)."""
    text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return text[:6000]


def log_params(params: dict[str, Any]) -> None:
    """Log parameters as strings (MLflow's limit is 6000 characters each).

    ``mlflow run`` has already logged the raw entry-point parameters (``data_dir=''``); a value
    we resolved differently goes in as ``resolved.<key>`` instead of failing the run.
    """
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    out = {}
    for key, value in params.items():
        text = param_text(value)
        if key in existing and existing[key] != text:
            key = f"resolved.{key}"
        if existing.get(key) != text:
            out[key] = text
    if out:
        mlflow.log_params(out)


class RunNotFound(ValueError):
    """No run with that id in the store; the message names the id and the store."""


def get_run(run_id: str) -> mlflow.entities.Run:
    """The run ``run_id``, or :class:`RunNotFound` naming it and the store (one line, no traceback)."""
    setup_tracking()
    try:
        return MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise RunNotFound(f"no run '{run_id}' in the tracking store {mlflow.get_tracking_uri()}") from exc


def run_param(run: mlflow.entities.Run, key: str, default: str | None = None) -> str | None:
    """A parameter as skinml resolved it (``resolved.<key>`` wins over the raw ``mlflow run`` value)."""
    params = run.data.params
    return params.get(f"resolved.{key}", params.get(key, default))


def download_artifact(run_id: str, path: str, dst: str | os.PathLike | None = None) -> Path:
    setup_tracking()
    dst = dst or tempfile.mkdtemp(prefix="skinml-")
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
