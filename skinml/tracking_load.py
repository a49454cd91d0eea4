"""Concurrent-write load on a tracking store: N ``skinml train`` processes at once.

Used by the team-server test and to measure a SQLite store against the PostgreSQL-backed
server with the same load::

    python -m skinml.tracking_load --tracking-uri http://127.0.0.1:5000 --data-dir /tmp/synthetic --jobs 4
    python -m skinml.tracking_load --tracking-uri sqlite:////tmp/load/mlflow.db --data-dir /tmp/synthetic --jobs 4

Each job is a separate OS process, as on a team: nothing is shared but the store. What
arrived is counted from the store afterwards (runs, metric steps per key, parameters,
artifact files and bytes), so a lost write shows as a count that differs between jobs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

#: Tag that marks the runs of one load batch, so counting finds exactly them.
BATCH_TAG = "skinml.load_batch"
#: The tiny model every job trains (seconds per epoch on a CPU).
TINY_TRAINING = ["--model", "cnn_fusion", "--backbone", "test_efficientnet", "--pretrained", "none",
                 "--image-size", "32", "--set", "augment_resize=36", "--batch-size", "16", "--num-workers", "0"]
_RUN_LINE = re.compile(r"training run ([0-9a-f]{32})")


@dataclass
class JobResult:
    seed: int
    returncode: int
    seconds: float
    run_id: str | None
    error: str = ""


@dataclass
class LoadResult:
    tracking_uri: str
    batch: str
    wall_seconds: float
    jobs: list[JobResult] = field(default_factory=list)

    @property
    def failed(self) -> list[JobResult]:
        return [job for job in self.jobs if job.returncode != 0 or job.run_id is None]


def _client_env(tracking_uri: str, home: str | os.PathLike | None) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    if home is not None:
        env["SKINML_HOME"] = str(home)
    return env


def make_split(tracking_uri: str, data_dir: str | os.PathLike, home: str | os.PathLike | None = None,
               timeout: float = 300) -> str:
    """One split run in the store (every job of a batch trains on it); its run id."""
    from mlflow.tracking import MlflowClient

    env = _client_env(tracking_uri, home)
    tag = uuid.uuid4().hex
    done = subprocess.run([sys.executable, "-m", "skinml", "split", "--data-dir", str(data_dir), "--experiment",
                           f"load-split-{tag[:8]}"], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"skinml split failed against {tracking_uri}: {done.stderr[-2000:]}")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"load-split-{tag[:8]}")
    runs = client.search_runs([experiment.experiment_id])
    return runs[0].info.run_id


def run_trainings(tracking_uri: str, data_dir: str | os.PathLike, split_run_id: str, jobs: int = 4,
                  epochs: int = 2, home: str | os.PathLike | None = None, timeout: float = 600,
                  extra_args: list[str] | None = None) -> LoadResult:
    """Start ``jobs`` tiny trainings at once (seeds 0..jobs-1) and wait for all of them."""
    batch = uuid.uuid4().hex[:12]
    env = _client_env(tracking_uri, home)
    # One thread each: N jobs on a few cores should contend on the store, not on the CPU.
    env["OMP_NUM_THREADS"] = "1"
    procs = []
    start = time.perf_counter()
    for seed in range(jobs):
        command = [sys.executable, "-m", "skinml", "train", *TINY_TRAINING, "--epochs", str(epochs),
                   "--data-dir", str(data_dir), "--split", split_run_id, "--seed", str(seed),
                   "--tag", f"{BATCH_TAG}={batch}", "--run-name", f"load-{batch}-{seed}", *(extra_args or [])]
        procs.append((seed, time.perf_counter(), subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                                  stderr=subprocess.PIPE, text=True)))
    result = LoadResult(tracking_uri, batch, 0.0)
    deadline = start + timeout
    for seed, started, proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        found = _RUN_LINE.search(out)
        error = "" if proc.returncode == 0 else _last_error(err)
        result.jobs.append(JobResult(seed, proc.returncode, time.perf_counter() - started,
                                     found.group(1) if found else None, error))
    result.wall_seconds = time.perf_counter() - start
    return result


def _last_error(stderr: str) -> str:
    """The exception line of a traceback (or the last line), for a one-line report."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line) or line.startswith("Error:")]
    return (errors or lines or [""])[-1][:500]


def run_counts(tracking_uri: str, run_id: str) -> dict:
    """What the store holds for one run: status, parameters, steps per metric, artifact files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    steps = {key: len(client.get_metric_history(run_id, key)) for key in sorted(run.data.metrics)}
    files = {}
    pending = [None]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop()):
            if item.is_dir:
                pending.append(item.path)
            else:
                files[item.path] = item.file_size
    return {"status": run.info.status, "params": len(run.data.params), "metric_steps": steps, "artifacts": files}


def shape(counts: dict) -> dict:
    """Counts without what legitimately differs between jobs: file sizes, and system metrics
    (sampled every few seconds, so their step count follows each job's wall time)."""
    steps = {key: n for key, n in counts["metric_steps"].items() if not key.startswith("system/")}
    return {"status": counts["status"], "params": counts["params"], "metric_steps": steps,
            "artifacts": sorted(counts["artifacts"])}


def summarise(result: LoadResult) -> dict:
    runs = {job.run_id: run_counts(result.tracking_uri, job.run_id) for job in result.jobs if job.run_id}
    return {
        "tracking_uri": result.tracking_uri.split("@")[-1],
        "jobs": len(result.jobs),
        "failed": [asdict(job) for job in result.failed],
        "wall_seconds": round(result.wall_seconds, 1),
        "job_seconds": [round(job.seconds, 1) for job in result.jobs],
        "runs_found": len(runs),
        "metric_steps_total": sum(sum(c["metric_steps"].values()) for c in runs.values()),
        "artifact_files_total": sum(len(c["artifacts"]) for c in runs.values()),
        "distinct_shapes": len({json.dumps(shape(c), sort_keys=True) for c in runs.values()}),
    }


_LOGGING_JOB = """
import sys, time, mlflow, tempfile, os
uri, steps, files, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
mlflow.set_tracking_uri(uri)
errors, start = [], time.perf_counter()
try:
    with mlflow.start_run(tags={"skinml.load_batch": tag}) as run:
        for step in range(steps):
            try:
                mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc).splitlines()[0][:200])
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(files):
                path = os.path.join(tmp, f"file{i}.bin")
                with open(path, "wb") as fh:
                    fh.write(os.urandom(64 * 1024))
                mlflow.log_artifact(path, "blobs")
    print("RUN", run.info.run_id)
except Exception as exc:
    errors.append(type(exc).__name__ + ": " + str(exc).splitlines()[0][:200])
print("SECONDS", time.perf_counter() - start)
for e in errors:
    print("ERROR", e)
"""


def run_logging_load(tracking_uri: str, jobs: int = 4, steps: int = 300, files: int = 5,
                     timeout: float = 600) -> dict:
    """``jobs`` plain-MLflow processes at once, each one run logging ``steps`` metric values one
    call at a time (as a training loop does) and ``files`` 64 KiB artifacts. No skinml code runs,
    so nothing guards the store's creation: against a new SQLite file this is the unguarded case."""
    from mlflow.tracking import MlflowClient

    batch = uuid.uuid4().hex[:12]
    env = _client_env(tracking_uri, None)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _LOGGING_JOB, tracking_uri, str(steps), str(files), batch],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(jobs)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, start + timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        outputs.append((proc.returncode, out, err))
    wall = time.perf_counter() - start
    run_ids = [m.group(1) for _, out, _ in outputs for m in [re.search(r"^RUN (\w+)", out, re.M)] if m]
    errors = [line[6:] for _, out, _ in outputs for line in out.splitlines() if line.startswith("ERROR ")]
    errors += [_last_error(err) for code, _, err in outputs if code != 0]
    stored_steps = stored_files = 0
    try:
        client = MlflowClient(tracking_uri)
        for run_id in run_ids:
            stored_steps += len(client.get_metric_history(run_id, "loss"))
            stored_files += len(client.list_artifacts(run_id, "blobs"))
    except Exception as exc:  # a corrupted store cannot even be read back
        errors.append(f"reading back: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return {"tracking_uri": tracking_uri.split("@")[-1], "jobs": jobs, "wall_seconds": round(wall, 1),
            "runs_stored": len(run_ids), "metric_steps_sent": jobs * steps, "metric_steps_stored": stored_steps,
            "artifact_files_sent": jobs * files, "artifact_files_stored": stored_files,
            "metric_calls_per_second": round(stored_steps / wall, 1), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--split", default=None, help="Split run id in that store (default: make one).")
    parser.add_argument("--home", default=None, help="SKINML_HOME for the jobs (where a SQLite store's mlruns/ is).")
    parser.add_argument("--logging-only", type=int, default=0, metavar="STEPS",
                        help="Instead of trainings: plain MLflow processes each logging STEPS metric values.")
    args = parser.parse_args(argv)
    if args.logging_only:
        print(json.dumps(run_logging_load(args.tracking_uri, args.jobs, args.logging_only), indent=2))
        return
    split = args.split or make_split(args.tracking_uri, args.data_dir, args.home)
    result = run_trainings(args.tracking_uri, args.data_dir, split, args.jobs, args.epochs, args.home)
    print(json.dumps(summarise(result), indent=2))


if __name__ == "__main__":
    main()
