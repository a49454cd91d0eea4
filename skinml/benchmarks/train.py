"""How much of the hardware the training pipeline uses: model-bound vs end-to-end images/s.

In one process and on one device, with the recipe's model, batch size and precision:

- **model-bound**: forward + backward + optimiser step on a batch of synthetic tensors already on
  the device (no data pipeline at all), the ceiling the pipeline could reach;
- **end-to-end**: the real training pipeline (decode cache, loaders, augmentation per the
  recipe's ``augment_device``, transfer, the same step) on the real split.

Their ratio says whether training is model-bound (close to 1) or data-bound. Used by
``skinml benchmark-train``, which also logs the figures to MLflow.

**Concurrent jobs** (``--jobs 1,2,4``): N processes, each the same benchmark, start their
end-to-end epochs together (a file barrier, after their setup and model-bound steps) and the
total rate is all their images over the window from the first start to the last end: how well N
trainings (the sweep's or the study's ``--parallel``) share one device. On a CPU each job gets
cores / N threads.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from skinml.inference import autocast, pick_device
from skinml.training.fit import build_optimizer
from skinml.training.loop import train_one_epoch
from skinml.training.prepare import build_criterion, build_loaders, build_model, prepare_data
from skinml.training.processes import exit_on_sigterm, run_module_processes, threads_per_process
from skinml.training.recipe import Recipe
from skinml.training.state import seed_everything


@dataclass
class TrainBenchmark:
    device: str
    batch_size: int
    image_size: int
    augment_device: str
    num_workers: int
    model_bound_images_per_second: float
    end_to_end_images_per_second: float
    model_bound_steps: int
    end_to_end_images: int
    started_at: float = 0.0  # wall clock (time.time()) around the end-to-end epoch
    ended_at: float = 0.0

    @property
    def ratio(self) -> float:
        return self.end_to_end_images_per_second / self.model_bound_images_per_second

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bound_rate(model, recipe: Recipe, n_features: int, device: torch.device, steps: int = 10,
                     warmup: int = 2) -> float:
    """Images/s of training steps on synthetic tensors already on ``device``."""
    model.train()
    optimizer = build_optimizer(model, recipe)
    criterion = torch.nn.CrossEntropyLoss()
    size = recipe.image_size
    image = torch.randn(recipe.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    metadata = torch.randn(recipe.batch_size, n_features, device=device)
    target = torch.randint(0, 6, (recipe.batch_size,), device=device)

    def step() -> None:
        with autocast(device):
            logits = model(image, metadata)
        loss = criterion(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * recipe.batch_size / (time.perf_counter() - start)


def benchmark_training(recipe: Recipe, manifest, data_dir: str | None, device: str = "auto", seed: int = 42,
                       num_workers: int | None = None, steps: int = 10,
                       barrier: Callable[[], None] | None = None) -> TrainBenchmark:
    """Both rates for ``recipe`` on a split (``manifest``), one epoch end to end (``barrier`` is
    called just before it)."""
    dev = pick_device(device)
    seed_everything(seed)
    data = prepare_data(recipe, manifest, data_dir)
    model, image_config = build_model(recipe, data.preprocessor)
    model.to(dev)
    if model.uses_images:
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(recipe, data, image_config, dev, seed, num_workers)
    bound = model_bound_rate(model, recipe, data.preprocessor.n_features_out, dev, steps)

    optimizer = build_optimizer(model, recipe)
    criterion = build_criterion(recipe, loaders, dev)
    loaders.set_epoch(1)
    _synchronize(dev)
    if barrier is not None:
        barrier()
    started = time.time()
    row = train_one_epoch(model, loaders.train, criterion, optimizer, dev, recipe.grad_clip, desc="benchmark",
                          batch_transform=loaders.augment if loaders.batch_augment is not None else None,
                          metadata_transform=loaders.mask_metadata if loaders.field_dropout is not None else None,
                          mix=loaders.mix if loaders.mixup is not None else None)
    _synchronize(dev)
    ended = time.time()
    seen = len(loaders.train) * recipe.batch_size
    return TrainBenchmark(str(dev), recipe.batch_size, recipe.image_size, recipe.augment_device, loaders.num_workers,
                          bound, row["images_per_second"], steps, seen, started, ended)


@dataclass
class ConcurrentBenchmark:
    jobs: int
    results: list[TrainBenchmark] = field(default_factory=list)

    @property
    def window_seconds(self) -> float:
        return max(r.ended_at for r in self.results) - min(r.started_at for r in self.results)

    @property
    def total_images_per_second(self) -> float:
        return sum(r.end_to_end_images for r in self.results) / self.window_seconds

    @property
    def start_spread_seconds(self) -> float:
        """How far apart the jobs' end-to-end epochs started (the barrier keeps it small)."""
        return max(r.started_at for r in self.results) - min(r.started_at for r in self.results)


def file_barrier(folder: Path, parties: int, name: str, timeout: float = 600.0) -> Callable[[], None]:
    """Wait until ``parties`` processes have arrived in ``folder`` (or one of them has failed:
    it leaves ``failed-<name>`` there, and waiting for it would be in vain)."""

    def wait() -> None:
        (folder / f"ready-{name}").touch()
        deadline = time.monotonic() + timeout
        while len(list(folder.glob("ready-*"))) < parties:
            failed = sorted(f.name[len("failed-"):] for f in folder.glob("failed-*"))
            if failed:
                raise RuntimeError(f"benchmark job(s) {', '.join(failed)} failed before the barrier")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(folder.glob('ready-*')))} of {parties} jobs reached the barrier "
                                   f"in {folder} within {timeout:.0f} s")
            time.sleep(0.02)

    return wait


def concurrent_benchmark(recipe: Recipe, manifest, data_dir: str | None, jobs: int, device: str = "auto",
                         seed: int = 42, num_workers: int | None = None, steps: int = 10) -> ConcurrentBenchmark:
    """``jobs`` processes of :func:`benchmark_training` whose end-to-end epochs run together."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest.to_pickle(folder / "manifest.pkl")  # exactly the split's rows and dtypes
        specs = [{"recipe": recipe.to_dict(), "manifest": str(folder / "manifest.pkl"), "data_dir": data_dir,
                  "device": device, "seed": seed, "num_workers": num_workers, "steps": steps,
                  "barrier": str(folder), "parties": jobs, "name": str(index),
                  "out": str(folder / f"result-{index}.json"), "threads": threads_per_process(jobs)}
                 for index in range(jobs)]
        exits = run_module_processes("skinml.benchmarks.train", specs, folder, f"jobs{jobs}")
        for index, (log_file, code) in enumerate(exits):
            if code:
                raise RuntimeError(f"benchmark job {index} of {jobs} failed (exit {code}):\n"
                                   f"{log_file.read_text()[-2000:]}")
        results = [TrainBenchmark(**json.loads((folder / f"result-{i}.json").read_text())) for i in range(jobs)]
    return ConcurrentBenchmark(jobs, results)


def _job_main(spec_file: str) -> None:
    """One job of :func:`concurrent_benchmark` (a process of its own)."""
    import pandas as pd

    exit_on_sigterm()  # stopped by its parent: it unwinds below and leaves failed-<job> for the barrier
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    recipe = Recipe.from_dict(spec["recipe"])
    manifest = pd.read_pickle(spec["manifest"])
    try:
        result = benchmark_training(recipe, manifest, spec["data_dir"], device=spec["device"], seed=spec["seed"],
                                    num_workers=spec["num_workers"], steps=spec["steps"],
                                    barrier=file_barrier(Path(spec["barrier"]), spec["parties"], spec["name"]))
    except BaseException:
        (Path(spec["barrier"]) / f"failed-{spec['name']}").touch()  # the others stop waiting for this job
        raise
    Path(spec["out"]).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":
    _job_main(sys.argv[1])
