"""The study behind the README's results: fusion vs baselines, recipes, imbalance ablation.

It has two phases on one patient-level split (phase 1 only with ``choose_default``):

1. **Choosing the default recipe, on validation only.** Each candidate (the original recipe
   with one imbalance correction instead of two, at two backbone learning rates) is trained
   with the first seed; the candidate with the highest ``best_val_bacc`` becomes ``default``.
   The test split plays no part in the choice.
2. **The comparison.** More seeds of ``default`` and of the ``original`` recipe;
   ``image_only``, ``metadata_only`` and ``spatial_fusion`` with the default recipe; and the
   imbalance ablation (sampler / loss weights / both) of the default recipe.

Every job is an ordinary ``skinml train`` + ``skinml evaluate`` subprocess, so each row of
the results can be reproduced by the command it logs. Jobs run ``parallel`` at a time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from skinml import tracking
from skinml.training.recipe import PRESETS

#: Candidates for the default recipe: changes to the ``original`` recipe.
CANDIDATES: dict[str, dict[str, str]] = {
    "loss-lr1e-4": {"imbalance": "loss", "lr_backbone": "1e-4"},
    "sampler-lr1e-4": {"imbalance": "sampler", "lr_backbone": "1e-4"},
    "loss-lr3e-4": {"imbalance": "loss", "lr_backbone": "3e-4"},
    "sampler-lr3e-4": {"imbalance": "sampler", "lr_backbone": "3e-4"},
}
TAG_STUDY = "skinml.steps.study"


@dataclass
class Job:
    name: str
    model: str
    recipe: str
    seed: int
    overrides: dict[str, str] = field(default_factory=dict)
    recipe_tag: str | None = None
    run_id: str | None = None
    error: str | None = None

    def train_args(self, split: str, data_dir: str | None, device: str, workers: int, study: str) -> list[str]:
        args = ["train", "--model", self.model, "--recipe", self.recipe, "--seed", str(self.seed), "--split", split,
                "--device", device, "--num-workers", str(workers), "--run-name", self.name,
                "--tag", f"{TAG_STUDY}={study}"]
        if data_dir:
            args += ["--data-dir", data_dir]
        if self.recipe_tag:
            args += ["--tag", f"{tracking.TAG_RECIPE}={self.recipe_tag}"]
        for key, value in self.overrides.items():
            args += ["--set", f"{key}={value}"]
        return args


def _run_cli(args: list[str], log_file: Path) -> str:
    with open(log_file, "a") as log:
        log.write(f"$ skinml {' '.join(args)}\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "skinml", *args], stdout=subprocess.PIPE,
                              stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"skinml {args[0]} failed (exit {proc.returncode}); see {log_file}")
    return proc.stdout


def _run_job(job: Job, split: str, data_dir: str | None, device: str, workers: int, study: str, logs: Path) -> Job:
    log_file = logs / f"{job.name}.log"
    try:
        out = _run_cli(job.train_args(split, data_dir, device, workers, study), log_file)
        match = re.search(r"training run ([0-9a-f]{32})", out)
        if not match:
            raise RuntimeError(f"no run id in the output of {job.name}; see {log_file}")
        job.run_id = match.group(1)
        _run_cli(["evaluate", "--run-id", job.run_id, "--device", device], log_file)
    except Exception as exc:  # one failed job must not stop the study; it is reported
        job.error = str(exc)
    print(f"[study] {job.name}: {job.run_id or 'FAILED'} {job.error or ''}", flush=True)
    return job


def _run_all(jobs: list[Job], parallel: int, **kwargs) -> list[Job]:
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        list(pool.map(lambda j: _run_job(j, **kwargs), jobs))
    for job in jobs:  # one retry, alone, for jobs that failed (e.g. a busy database)
        if job.error:
            job.run_id = job.error = None
            _run_job(job, **kwargs)
    return jobs


def comparison_jobs(seeds: tuple[int, ...], recipe: str, overrides: dict[str, str], tag: str | None,
                    done_imbalance: frozenset[str] = frozenset()) -> list[Job]:
    """Phase 2 jobs, most important first (a time-limited study keeps the head of the list)."""
    first, more = seeds[0], list(seeds[1:])
    default_imbalance = overrides.get("imbalance") or PRESETS[recipe].get("imbalance", "both")
    spatial = {**overrides, "backbone": "efficientnet_lite0", "model_options": json.dumps({"vit_pretrained": "none"})}
    jobs = [Job(f"default-s{first}", "cnn_fusion", recipe, first, dict(overrides), tag)]
    jobs += [Job(f"original-recipe-s{first}", "cnn_fusion", "original", first)]
    jobs += [Job(f"{m}-default-s{first}", m, recipe, first, dict(overrides), tag) for m in ("metadata_only", "image_only")]
    for seed in more[:1]:
        jobs += [Job(f"default-s{seed}", "cnn_fusion", recipe, seed, dict(overrides), tag),
                 Job(f"original-recipe-s{seed}", "cnn_fusion", "original", seed)]
    for imbalance in ("sampler", "loss", "both"):
        if imbalance != default_imbalance and imbalance not in done_imbalance:
            jobs.append(Job(f"default-imbalance-{imbalance}-s{first}", "cnn_fusion", recipe, first,
                            {**overrides, "imbalance": imbalance}, tag))
    jobs.append(Job(f"spatial_fusion-default-s{first}", "spatial_fusion", recipe, first, spatial, tag))
    for seed in more[1:]:
        jobs += [Job(f"default-s{seed}", "cnn_fusion", recipe, seed, dict(overrides), tag),
                 Job(f"original-recipe-s{seed}", "cnn_fusion", "original", seed)]
    return jobs


def run_study(data_dir: str | None = None, seeds: tuple[int, ...] = (42, 43, 44), parallel: int = 1,
              device: str = "auto", workers: int = 1, split: str | None = None, logs: str = "outputs/study",
              study: str | None = None, overrides: dict[str, str] | None = None,
              choose_default: bool = False) -> dict:
    """Run the comparison (phase 2), after choosing the default recipe (phase 1) if asked.

    Without ``choose_default`` the ``default`` preset in :mod:`skinml.training.recipe` is used
    as it stands (it was chosen by phase 1 once; see the README).
    """
    from skinml.steps.split import run_split

    study = study or time.strftime("study-%Y%m%d-%H%M%S")
    logs_dir = Path(logs)
    logs_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup_tracking()  # create the store once, before parallel jobs write to it
    split = split or run_split(data_dir).run_id
    common = dict(split=split, data_dir=data_dir, device=device, workers=workers, study=study, logs=logs_dir)
    overrides = dict(overrides or {})
    first = seeds[0]
    candidates: list[Job] = []
    summary: dict = {"study": study, "split_run_id": split}

    if choose_default:
        candidates = [Job(f"candidate-{name}-s{first}", "cnn_fusion", "original", first, {**overrides, **values},
                          f"candidate:{name}") for name, values in CANDIDATES.items()]
        _run_all(candidates, parallel, **common)
        client = mlflow.MlflowClient()
        scored = [(client.get_run(j.run_id).data.metrics.get("best_val_bacc", float("-inf")), j)
                  for j in candidates if j.run_id]
        if not scored:
            raise RuntimeError(f"every candidate failed; see {logs_dir}")
        best_bacc, winner = max(scored, key=lambda item: item[0])
        chosen = {k: winner.overrides[k] for k in ("imbalance", "lr_backbone")}
        print(f"[study] default recipe chosen on validation: {winner.name} (best_val_bacc {best_bacc:.3f}) -> {chosen}")
        summary["selected_by"] = {"candidate": winner.name, "best_val_bacc": best_bacc, "default_recipe": chosen}
        # The winner, and candidates that differ from it only in imbalance handling, are the
        # default recipe and its ablation: tag them so.
        same_lr = [j for _b, j in scored if j.overrides["lr_backbone"] == chosen["lr_backbone"]]
        for job in same_lr:
            client.set_tag(job.run_id, tracking.TAG_RECIPE, "default")
        jobs = comparison_jobs(seeds, "original", {**overrides, **chosen}, "default",
                               frozenset(j.overrides["imbalance"] for j in same_lr))
        jobs = [j for j in jobs if j.name != f"default-s{first}"]  # the winner is that run
    else:
        jobs = comparison_jobs(seeds, "default", overrides, None)
    _run_all(jobs, parallel, **common)

    summary["jobs"] = [{"name": j.name, "run_id": j.run_id, "error": j.error} for j in candidates + jobs]
    (logs_dir / "study.json").write_text(json.dumps(summary, indent=2))
    failed = [j.name for j in candidates + jobs if j.error]
    print(f"[study] done: {len(candidates) + len(jobs) - len(failed)} runs, failed: {failed or 'none'}")
    return summary
