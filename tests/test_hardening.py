"""Issue-level guarantees: resume keeps its promise, names are checked first, the split's
choices reach every step, and only the chosen recipe competes for the champion alias."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest

from skinml import inference, tracking
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.data.split import attach_split, read_manifest
from skinml.steps import register as registry
from skinml.steps.evaluate import evaluate_run
from skinml.steps.split import MANIFEST_ARTIFACT, run_split
from skinml.steps.train import train
from skinml.training.recipe import Recipe
from skinml.training.state import TrainState
from tests.test_training import tiny


def _runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_unknown_model_or_backbone_fails_before_any_run_or_split(mlflow_store, synthetic_dir):
    with pytest.raises(ValueError, match="Unknown model 'nope'.*cnn_fusion"):
        train(Recipe(model="nope"), data_dir=str(synthetic_dir))
    with pytest.raises(ValueError, match="no_such_backbone_xyz"):
        train(tiny(backbone="no_such_backbone_xyz"), data_dir=str(synthetic_dir))
    assert _runs() == []  # not even the default split was made


def test_evaluate_unknown_run_is_one_line(mlflow_store):
    with pytest.raises(tracking.RunNotFound, match="no run 'deadbeef' in the tracking store sqlite:"):
        evaluate_run("deadbeef")


def test_resume_with_workers_equals_the_unbroken_run(mlflow_store, synthetic_dir):
    """Worker seeds and data order come from (seed, epoch), not from a generator's history."""
    recipe = tiny(epochs=3)
    whole = train(recipe, data_dir=str(synthetic_dir), seed=5, num_workers=1)
    split = mlflow.MlflowClient().get_run(whole.run_id).data.params["split_run_id"]
    cut = train(recipe, data_dir=str(synthetic_dir), split=split, seed=5, num_workers=1, max_epochs_this_call=1)
    resumed = train(recipe, data_dir=str(synthetic_dir), resume=cut.run_id, num_workers=1)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in whole.history], abs=1e-6)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in whole.history],
                                                                      abs=1e-6)


def test_resume_into_a_new_run_keeps_the_selected_epoch(mlflow_store, synthetic_dir, monkeypatch):
    """Under `mlflow run -e train -P resume=<id>` MLflow makes a new run: it must be complete."""
    recipe = tiny(epochs=3)
    cut = train(recipe, data_dir=str(synthetic_dir), seed=0, num_workers=0, max_epochs_this_call=2)
    client = mlflow.MlflowClient()
    outer = client.create_run(tracking.get_experiment_id()).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", outer)
    # The case that lost best.pt: the selected epoch came before the interruption, so the new
    # run never writes a best.pt of its own (made certain here: epoch 3 does not improve).
    monkeypatch.setattr(TrainState, "improved", lambda self, val_loss: False)
    resumed = train(recipe, data_dir=str(synthetic_dir), resume=cut.run_id, num_workers=0)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # adopted (and cleared) by the run, as under `mlflow run`
    assert resumed.run_id == outer and resumed.epochs_run == 3
    run = client.get_run(outer)
    assert run.data.metrics["best_epoch"] == cut.best_epoch
    paths = {a.path for folder in ("checkpoints", "validation") for a in client.list_artifacts(outer, folder)}
    assert {inference.BEST, inference.LAST, "validation/confusion_matrix.json"} <= paths
    best = inference.load_checkpoint(tracking.download_artifact(outer, inference.BEST))
    assert best["epoch"] == cut.best_epoch
    matrix = json.loads(tracking.download_artifact(outer, "validation/confusion_matrix.json").read_text())
    assert matrix["epoch"] == cut.best_epoch
    assert sorted(m.step for m in client.get_metric_history(outer, "val_loss")) == [1, 2, 3]
    evaluate_run(outer, n_boot=20)  # evaluate and register work on the new run alone
    assert "test_balanced_accuracy" in client.get_run(outer).data.metrics
    assert registry.register_run(outer, name="resumed")["registered"]


def test_logged_preprocessor_is_a_fit_on_the_manifest_training_rows(mlflow_store, synthetic_dir):
    result = train(tiny(model="metadata_only", epochs=1), data_dir=str(synthetic_dir), seed=0)
    run = mlflow.MlflowClient().get_run(result.run_id)
    logged = json.loads(tracking.download_artifact(result.run_id, "preprocessor.json").read_text())
    manifest = read_manifest(tracking.download_artifact(run.data.params["split_run_id"], MANIFEST_ARTIFACT))
    frame = attach_split(load_metadata(synthetic_dir), manifest)
    on_train = MetadataPreprocessor().fit(frame[frame["split"] == "train"]).to_dict()
    on_all = MetadataPreprocessor().fit(frame).to_dict()
    assert logged == json.loads(json.dumps(on_train))
    assert logged != json.loads(json.dumps(on_all))  # the check can tell the two apart


def test_drop_missing_images_reaches_train_and_evaluate(mlflow_store, synthetic_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    frame = pd.read_csv(data / "metadata.csv")
    missing = frame["img_id"].iloc[3]
    next(data.rglob(missing)).unlink()
    with pytest.raises(ValueError, match=missing.split(".")[0]):
        run_split(str(data))
    split = run_split(str(data), drop_missing_images=True)
    assert len(split.manifest) == len(frame) - 1
    result = train(tiny(epochs=1), split=split.run_id, data_dir=str(data), seed=0, num_workers=0)
    evaluated = evaluate_run(result.run_id, n_boot=20)
    assert missing not in set(evaluated.predictions["img_id"])


def _finished_training(checkpoint: str, bacc: float, recipe: str, overrides: str = "") -> str:
    tags = {tracking.TAG_FAMILY: "fusion", tracking.TAG_MODEL: "cnn_fusion", tracking.TAG_RECIPE: recipe,
            tracking.TAG_SPLIT_HASH: "ab" * 32, tracking.TAG_RECIPE_OVERRIDES: overrides}
    with tracking.start_run("train", tags=tags) as run:
        mlflow.log_metrics({"best_val_bacc": bacc, "best_val_loss": 1.0, "best_epoch": 1})
        mlflow.log_artifact(checkpoint, "checkpoints")
    return run.info.run_id


def test_only_the_chosen_recipe_takes_the_alias(mlflow_store, tiny_training):
    default = _finished_training(tiny_training.checkpoint, 0.50, "default")
    original = _finished_training(tiny_training.checkpoint, 0.90, "original")
    ablation = _finished_training(tiny_training.checkpoint, 0.95, "default", overrides="imbalance")
    first = registry.register_run(default, name="m", champion_recipe="default")
    assert first["alias_moved"]
    for run_id, why in ((original, "recipe 'original' is not the validation-chosen 'default'"),
                        (ablation, "with overrides (imbalance)")):
        info = registry.register_run(run_id, name="m", champion_recipe="default")
        assert info["registered"] and not info["alias_moved"] and why in info["reason"]
        assert info["champion_version"] == first["version"]
    # `register --recipe default` does not pick the ablation either, however high it scores.
    assert registry.select_best_run(recipe="default").info.run_id == default


def test_either_chosen_recipe_takes_the_alias_when_better(mlflow_store, tiny_training):
    from skinml.steps.main import CHAMPION_RECIPES

    assert CHAMPION_RECIPES == ("default", "default_v2", "default_lite2", "default_lite2_224")
    default = _finished_training(tiny_training.checkpoint, 0.50, "default")
    lite2 = _finished_training(tiny_training.checkpoint, 0.60, "default_lite2")
    worse = _finished_training(tiny_training.checkpoint, 0.55, "default_lite2")
    original = _finished_training(tiny_training.checkpoint, 0.90, "original")
    assert registry.register_run(default, name="m", champion_recipe=CHAMPION_RECIPES)["alias_moved"]
    info = registry.register_run(lite2, name="m", champion_recipe=CHAMPION_RECIPES)
    assert info["alias_moved"] and info["champion_version"] == info["version"]
    held = registry.register_run(worse, name="m", champion_recipe=CHAMPION_RECIPES)  # the same rule: not better
    assert not held["alias_moved"] and held["champion_version"] == info["version"]
    refused = registry.register_run(original, name="m", champion_recipe=CHAMPION_RECIPES)
    assert not refused["alias_moved"] and refused["champion_version"] == info["version"]
    assert "is not the validation-chosen one of 'default', 'default_v2', 'default_lite2', 'default_lite2_224'" in refused["reason"]
    small = _finished_training(tiny_training.checkpoint, 0.65, "default_lite2_224")  # better: takes it
    taken = registry.register_run(small, name="m", champion_recipe=CHAMPION_RECIPES)
    assert taken["alias_moved"] and taken["champion_version"] == taken["version"]


def test_batched_augmentation_trains_reproducibly(mlflow_store, synthetic_dir):
    """augment_device=batch: the loader yields uint8 crops, the device augments; same seed, same run."""
    recipe = tiny(epochs=2, augment_device="batch")
    first = train(recipe, data_dir=str(synthetic_dir), seed=1, num_workers=0)
    split = mlflow.MlflowClient().get_run(first.run_id).data.params["split_run_id"]
    again = train(recipe, data_dir=str(synthetic_dir), split=split, seed=1, num_workers=0)
    assert [h["val_loss"] for h in again.history] == pytest.approx([h["val_loss"] for h in first.history], abs=1e-6)
    workers = train(tiny(epochs=2), data_dir=str(synthetic_dir), split=split, seed=1, num_workers=0)
    assert [h["train_loss"] for h in workers.history] != [h["train_loss"] for h in first.history]
    assert mlflow.MlflowClient().get_run(first.run_id).data.params["recipe.augment_device"] == "batch"


def test_benchmark_train_reports_both_rates_and_logs_them(mlflow_store, synthetic_dir):
    from click.testing import CliRunner

    from skinml.cli import cli

    result = CliRunner().invoke(cli, ["benchmark-train", "--model", "cnn_fusion", "--backbone", "test_efficientnet",
                                      "--pretrained", "none", "--image-size", "32", "--set", "augment_resize=36",
                                      "--batch-size", "16", "--data-dir", str(synthetic_dir), "--num-workers", "0",
                                      "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):result.output.index("}") + 1])
    assert report["model_bound_images_per_second"] > 0 and report["end_to_end_images_per_second"] > 0
    assert report["ratio"] == pytest.approx(report["end_to_end_images_per_second"]
                                            / report["model_bound_images_per_second"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{tracking.TAG_STEP}` = 'benchmark'")
    assert len(runs) == 1 and runs[0].data.metrics["end_to_end_ratio"] == pytest.approx(report["ratio"])


def test_concurrent_training_jobs_start_together_and_add_up(mlflow_store, synthetic_dir):
    import re

    from click.testing import CliRunner

    from skinml.cli import cli

    args = ["benchmark-train", "--model", "cnn_fusion", "--backbone", "test_efficientnet", "--pretrained", "none",
            "--image-size", "32", "--set", "augment_resize=36", "--batch-size", "16", "--data-dir", str(synthetic_dir),
            "--num-workers", "0", "--steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--jobs", "1,2"])
    assert result.exit_code == 0, result.output
    lines = re.findall(r"^(\d) job\(s\): total ([\d.]+) images/s over ([\d.]+) s \(per job ([\d., ]+);.*"
                       r"starts within ([\d.]+) s\)", result.output, re.M)
    assert [line[0] for line in lines] == ["1", "2"]
    assert len(lines[1][3].split(",")) == 2  # two jobs reported
    assert float(lines[1][4]) < 2.0  # the barrier lines their epochs up (each takes seconds to set up)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{tracking.TAG_STEP}` = 'benchmark'")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["jobs_1_total_images_per_second"] == pytest.approx(float(lines[0][1]), abs=0.051)
    assert metrics["jobs_2_total_images_per_second"] == pytest.approx(float(lines[1][1]), abs=0.051)
    bad = CliRunner().invoke(cli, [*args, "--jobs", "1,0"])
    assert bad.exit_code != 0 and "--jobs" in bad.output and "'1,0'" in bad.output


def test_concurrent_total_is_all_images_over_the_shared_window(tmp_path):
    from skinml.benchmarks.train import ConcurrentBenchmark, TrainBenchmark, file_barrier

    def job(start, end, images):
        return TrainBenchmark("cpu", 16, 32, "batch", 0, 100.0, images / (end - start), 2, images, start, end)

    both = ConcurrentBenchmark(2, [job(0.0, 10.0, 100), job(1.0, 11.0, 100)])
    assert both.window_seconds == 11.0 and both.total_images_per_second == pytest.approx(200 / 11)
    assert both.start_spread_seconds == 1.0
    with pytest.raises(TimeoutError, match="only 1 of 2 jobs reached the barrier"):
        file_barrier(tmp_path, 2, "0", timeout=0.1)()
    (tmp_path / "failed-1").touch()  # job 1 died before it arrived: no point waiting out the timeout
    with pytest.raises(RuntimeError, match=r"job\(s\) 1 failed before the barrier"):
        file_barrier(tmp_path, 3, "2", timeout=60)()


def test_a_failing_concurrent_job_is_reported_with_its_output(mlflow_store, synthetic_dir, tmp_path):
    from skinml.benchmarks.train import concurrent_benchmark
    from skinml.steps.split import run_split
    from tests.test_training import tiny

    split = run_split(str(synthetic_dir))
    recipe = tiny(pretrained=str(tmp_path / "no-such-weights.pt"))
    with pytest.raises(RuntimeError, match=r"(?s)benchmark job 0 of 2 failed \(exit 1\).*no-such-weights\.pt"):
        concurrent_benchmark(recipe, split.manifest, str(synthetic_dir), 2, device="cpu", num_workers=0, steps=1)


@pytest.mark.timeout(300)
def test_a_terminated_training_ends_its_run_failed_not_running(mlflow_store, synthetic_dir):
    """SIGTERM (kill, a scheduler's timeout) unwinds the command: the run is closed, not left RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["train", "--model", "cnn_fusion", "--backbone", "test_efficientnet", "--pretrained", "none",
            "--epochs", "200", "--image-size", "32", "--set", "augment_resize=36", "--batch-size", "16",
            "--data-dir", str(synthetic_dir), "--num-workers", "0", "--device", "cpu", "--run-name", "to-stop"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "skinml", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + 240
    run = None
    try:
        while time.monotonic() < deadline and process.poll() is None:  # wait until it trains (an epoch is logged)
            experiments = [e.experiment_id for e in client.search_experiments()]
            found = client.search_runs(experiments, "attributes.run_name = 'to-stop'")
            if found and "train_loss" in found[0].data.metrics:
                run = found[0]
                break
            time.sleep(0.5)
        assert run is not None and run.info.status == "RUNNING", process.communicate()[0][-3000:] if process.poll() else ""
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:  # never leave a 200-epoch training behind a failed assertion
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert client.get_run(run.info.run_id).info.status == "FAILED"


@pytest.mark.timeout(120)
def test_a_terminated_launcher_stops_its_worker_processes(tmp_path):
    """SIGTERM to a sweep or concurrent benchmark stops its workers too, and they unwind (finally runs)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    (tmp_path / "sleeper.py").write_text(textwrap.dedent("""
        import sys, time
        from pathlib import Path
        from skinml.training.processes import exit_on_sigterm
        exit_on_sigterm()
        spec = Path(sys.argv[1])
        spec.with_suffix(".pid").write_text("started")
        try:
            time.sleep(120)
        finally:
            spec.with_suffix(".unwound").write_text("yes")
    """))
    launcher = textwrap.dedent(f"""
        from pathlib import Path
        from skinml.training.processes import exit_on_sigterm, run_module_processes
        exit_on_sigterm()
        run_module_processes("sleeper", [{{}}, {{}}], Path({str(tmp_path / "w")!r}), "job")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "w").glob("*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list((tmp_path / "w").glob("*.pid"))) == 2
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        # the launcher waited for its workers, and each unwound on the SIGTERM it passed on
        assert sorted(p.name for p in (tmp_path / "w").glob("*.unwound")) == ["job-0.unwound", "job-1.unwound"]
    finally:
        if parent.poll() is None:
            parent.kill()
