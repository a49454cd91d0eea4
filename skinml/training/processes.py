"""N copies of a Python module started at once, each reading a JSON spec (the sweep's workers,
the concurrent training benchmark's jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


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
    for index, spec in enumerate(specs):
        spec_file = folder / f"{stem}-{index}.json"
        spec_file.write_text(json.dumps(spec))
        log_file = folder / f"{stem}-{index}.log"
        with open(log_file, "a") as out:
            started.append((log_file, subprocess.Popen([sys.executable, "-m", module, str(spec_file)], stdout=out,
                                                       stderr=subprocess.STDOUT, env=env)))
    return [(log_file, proc.wait()) for log_file, proc in started]
