"""Worker processes: N copies of a Python module started at once, each reading a JSON spec (the
sweep's workers, the concurrent training benchmark's jobs), and the SIGTERM handling that lets
them and the commands that start them stop cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a scheduler's time limit, a parent stopping its workers) into ``SystemExit``.

    Python's default is to die at once, which leaves the MLflow run RUNNING for ever and skips
    every ``finally``; as an exception it unwinds like an error: the run ends FAILED, a sweep's trial
    is told FAIL, temporary files are removed. Only where nobody else has claimed the signal
    (servers install their own), and only from the main thread (where Python runs handlers).
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` that share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // processes)


def run_module_processes(module: str, specs: list[dict[str, Any]], folder: Path, stem: str) -> list[tuple[Path, int]]:
    """Run ``python -m module folder/stem-I.json`` for every spec, all at once, output appended to
    ``folder/stem-I.log``; wait for all of them. Returns (log file, exit code) per process.

    ``$MLFLOW_RUN_ID`` is not passed on: a run that `mlflow run` made is this process's, not theirs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    started = []
    try:
        for index, spec in enumerate(specs):
            spec_file = folder / f"{stem}-{index}.json"
            spec_file.write_text(json.dumps(spec))
            log_file = folder / f"{stem}-{index}.log"
            with open(log_file, "a") as out:
                started.append((log_file, subprocess.Popen([sys.executable, "-m", module, str(spec_file)], stdout=out,
                                                           stderr=subprocess.STDOUT, env=env)))
        return [(log_file, proc.wait()) for log_file, proc in started]
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed to start one: stop the ones started
        _stop([proc for _, proc in started])
        raise


def _stop(processes: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM each process still running (they unwind: runs end FAILED), SIGKILL after ``grace`` s."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace  # one grace period for all, not one each
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
