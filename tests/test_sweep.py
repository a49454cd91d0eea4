"""The Optuna sweep: child runs under one parent, pruning, and resuming from the store."""

from __future__ import annotations

import re

import mlflow
import pytest

from skinml.steps.sweep import TAG_BASELINE, TAG_PRUNED, TAG_STUDY, TAG_TRIAL, baseline_params, run_sweep
from tests.test_training import tiny


def _runs(study: str):
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`{TAG_STUDY}` = '{study}'")


def test_sweep_logs_child_runs_and_resumes(mlflow_store, synthetic_dir):
    import optuna

    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    base = tiny(epochs=1)
    first = run_sweep(base, "s1", 2, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False,
                      num_workers=0)
    assert (first.n_complete, first.n_pruned, first.n_failed) == (2, 0, 0)
    runs = _runs("s1")
    parents = [r for r in runs if r.data.tags.get("skinml.step") == "sweep"]
    children = [r for r in runs if r.data.tags.get(TAG_TRIAL) is not None]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {first.parent_run_id}
    # each trial trained the recipe Optuna proposed, and its validation score is the objective
    study = optuna.load_study(study_name="s1", storage=storage)
    for trial in study.trials:
        child = next(r for r in children if r.data.tags[TAG_TRIAL] == str(trial.number))
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert trial.value == pytest.approx(child.data.metrics["best_val_bacc"])
        assert float(child.data.params["recipe.lr_head"]) == pytest.approx(trial.params["lr_head"])
        assert f'"metadata_dim": {trial.params["metadata_dim"]}' in child.data.params["recipe.model_options"]

    # a killed process leaves a RUNNING trial behind: the next call fails it and carries on
    study.ask()
    again = run_sweep(base, "s1", 3, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False,
                      num_workers=0)
    assert again.parent_run_id == first.parent_run_id
    assert (again.n_complete, again.n_failed) == (3, 1)
    assert len([r for r in _runs("s1") if r.data.tags.get(TAG_TRIAL) is not None]) == 3
    # reaching the target again trains nothing
    done = run_sweep(base, "s1", 3, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False, num_workers=0)
    assert done.n_complete == 3 and len(_runs("s1")) == 4
    parent = mlflow.MlflowClient().get_run(first.parent_run_id)
    assert parent.data.metrics["n_complete"] == 3
    assert parent.data.metrics["best_val_bacc"] == pytest.approx(done.best_value)
    with pytest.raises(ValueError, match="started with other settings"):
        run_sweep(base, "s1", 4, data_dir=str(synthetic_dir), seed=1, storage=storage, prune=False, num_workers=0)


def test_pruned_trials_are_marked(mlflow_store, synthetic_dir, monkeypatch):
    import optuna

    # a pruner that prunes every trial after its first reported epoch
    class Always(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **_: Always())
    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    result = run_sweep(tiny(epochs=3), "s2", 1, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=True,
                       num_workers=0)
    assert (result.n_complete, result.n_pruned) == (0, 1) and result.best_value is None
    child = next(r for r in _runs("s2") if r.data.tags.get(TAG_TRIAL) == "0")
    assert child.info.status == "KILLED" and child.data.tags[TAG_PRUNED] == "true"
    history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "val_balanced_accuracy")
    assert [m.step for m in history] == [1]  # stopped after the first epoch


def test_first_trial_is_the_recipe_itself(mlflow_store, synthetic_dir):
    import optuna

    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    result = run_sweep(tiny(epochs=1), "s3", 2, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False,
                       num_workers=0)
    study = optuna.load_study(study_name="s3", storage=storage)
    first, second = study.trials
    # default_v1's own values, and the cnn_fusion defaults for the options it does not set
    assert first.params == {"lr_backbone": 1e-4, "lr_head": 1e-3, "questionnaire_dropout": 0.0, "head_dropout": 0.5,
                            "metadata_dropout": 0.3, "metadata_dim": 64, "head_dim": 256}
    assert first.user_attrs["baseline"] is True and "baseline" not in second.user_attrs
    assert second.params != first.params
    assert result.baseline_value == pytest.approx(first.value)
    runs = {r.data.tags.get(TAG_TRIAL): r for r in _runs("s3")}
    assert runs["0"].data.tags[TAG_BASELINE] == "true" and runs["0"].info.run_name == "trial-0-baseline"
    assert TAG_BASELINE not in runs["1"].data.tags
    assert float(runs["0"].data.params["recipe.lr_backbone"]) == pytest.approx(1e-4)
    parent = mlflow.MlflowClient().get_run(result.parent_run_id)
    assert parent.data.metrics["baseline_val_bacc"] == pytest.approx(first.value)


def test_baseline_params_follow_the_recipe_and_its_model():
    assert baseline_params(tiny(model_options={"head_dim": 512}))["head_dim"] == 512
    assert baseline_params(tiny(model="image_only")) == {"lr_backbone": 1e-4, "lr_head": 1e-3,
                                                         "questionnaire_dropout": 0.0, "head_dropout": 0.5}
    assert baseline_params(tiny(lr_backbone=1e-5)) is None  # the original preset's rate lies below the space
    assert baseline_params(tiny(model_options={"head_dim": 100})) is None


def test_parallel_workers_share_the_study_and_stop_at_the_target(mlflow_store, synthetic_dir, tmp_path):
    import optuna

    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    logs = tmp_path / "logs"
    result = run_sweep(tiny(epochs=1), "s4", 3, data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False,
                       num_workers=0, parallel=2, logs=logs)
    study = optuna.load_study(study_name="s4", storage=storage)
    # the lock makes "count, then ask" one step: three trials in all, not one per worker more
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert (result.n_complete, result.n_failed) == (3, 0)
    assert study.trials[0].user_attrs["baseline"] is True
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(points)) == 3  # one sampler seed per worker: no two workers propose the same point
    children = [r for r in _runs("s4") if r.data.tags.get(TAG_TRIAL) is not None]
    assert sorted(r.data.tags[TAG_TRIAL] for r in children) == ["0", "1", "2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result.parent_run_id}
    assert {r.info.experiment_id for r in children} == {mlflow.MlflowClient().get_run(result.parent_run_id).info.experiment_id}
    assert all(r.info.status == "FINISHED" for r in children)
    for trial in study.trials:
        child = next(r for r in children if r.data.tags[TAG_TRIAL] == str(trial.number))
        assert trial.value == pytest.approx(child.data.metrics["best_val_bacc"])
    parent = mlflow.MlflowClient().get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["skinml.sweep_parallel"] == "2"
    assert len(mlflow.MlflowClient().get_metric_history(result.parent_run_id, "trial_best_val_bacc")) == 3
    assert sorted(p.name for p in logs.glob("*.log")) == ["s4-worker-0.log", "s4-worker-1.log"]
    # each worker's log names the trials it took and how they ended: together, each trial once
    ended = re.findall(r"trial (\d+): val bacc ([0-9.]+)", "".join(p.read_text() for p in logs.glob("*.log")))
    assert sorted(int(n) for n, _ in ended) == [0, 1, 2]
    assert {int(n): float(v) for n, v in ended} == {t.number: pytest.approx(t.value, abs=1e-4) for t in study.trials}


def test_a_failing_worker_fails_the_sweep_and_names_its_log(mlflow_store, synthetic_dir, tmp_path):
    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    missing = tmp_path / "no-such-weights.pt"
    with pytest.raises(RuntimeError, match=r"worker 0 \(exit 1; see .*s6-worker-0\.log\)"):
        run_sweep(tiny(epochs=1, pretrained=str(missing)), "s6", 2, data_dir=str(synthetic_dir), seed=0,
                  storage=storage, prune=False, num_workers=0, parallel=2, logs=tmp_path / "logs")
    assert "no-such-weights.pt" in (tmp_path / "logs" / "s6-worker-0.log").read_text()
    parent = next(r for r in _runs("s6") if r.data.tags.get("skinml.step") == "sweep")
    assert parent.info.status == "FAILED"


def test_a_resumed_study_does_not_propose_its_earlier_points_again(mlflow_store, synthetic_dir):
    import optuna

    from skinml.steps.sweep import sampler_seed_for

    storage = f"sqlite:///{mlflow_store / 'optuna.db'}"
    kwargs = dict(data_dir=str(synthetic_dir), seed=0, storage=storage, prune=False, num_workers=0)
    run_sweep(tiny(epochs=1), "s7", 2, **kwargs)  # the baseline, then TPE's first random point
    run_sweep(tiny(epochs=1), "s7", 3, **kwargs)  # a new process: must not draw that point again
    baseline, first, resumed = optuna.load_study(study_name="s7", storage=storage).trials
    assert resumed.params != first.params
    # the seed is a function of (sampler seed, worker, trials so far): reproducible, and distinct
    assert sampler_seed_for(0, 0, 2) == sampler_seed_for(0, 0, 2)
    assert len({sampler_seed_for(0, w, n) for w in range(4) for n in range(50)}) == 200
