"""Data-parallel training under torchrun: rank slices, one MLflow run, parity with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler

from skinml.training.distributed import GlobalBatchSlices


@pytest.mark.parametrize("n, drop_last", [(37, True), (37, False), (32, True)])
def test_rank_slices_make_up_the_single_process_batches(n, drop_last):
    def base():
        return RandomSampler(range(n), generator=torch.Generator().manual_seed(5))

    single = list(base())
    batches = [single[i:i + 8] for i in range(0, n, 8)]
    if drop_last and len(batches[-1]) < 8:
        batches = batches[:-1]
    slices = [list(GlobalBatchSlices(base(), 8, rank, 2, drop_last)) for rank in range(2)]
    for rank, part in enumerate(slices):
        assert len(part) == len(GlobalBatchSlices(base(), 8, rank, 2, drop_last))
    per_rank = [[part[i:i + 4] for i in range(0, len(part), 4)] for part in slices]
    for step, batch in enumerate(batches):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(batch)
    assert sorted(slices[0] + slices[1]) == sorted(x for b in batches for x in b)  # nothing twice, nothing lost


def test_weighted_sampler_order_is_shared_by_every_rank():
    weights = torch.tensor([0.1, 0.1, 0.5, 0.3] * 10)

    def base():
        return WeightedRandomSampler(weights, 40, generator=torch.Generator().manual_seed(1))

    parts = [list(GlobalBatchSlices(base(), 8, r, 2, True)) for r in range(2)]
    single = list(base())
    assert [i for s in range(5) for r in range(2) for i in parts[r][s * 4:(s + 1) * 4]] == single


def test_refuses_a_global_batch_that_does_not_split():
    from skinml.training.distributed import DistInfo, per_rank_batch

    with pytest.raises(ValueError, match="must be a multiple of the 3 processes"):
        per_rank_batch(16, DistInfo(0, 3, 0))


#: No random augmentation or dropout: the comparison isolates data parallelism itself.
DETERMINISTIC = ["--set", "augment_hflip=0", "--set", "augment_vflip=0", "--set", "augment_brightness=0",
                 "--set", "augment_contrast=0", "--set", "augment_saturation=0", "--set", "augment_hue=0",
                 "--set", "augment_rotation=0", "--set", "augment_translate=0", "--set", "augment_scale=1,1",
                 "--set", "augment_blur_p=0", "--set", "augment_erasing_p=0", "--set", "augment_resize=32",
                 "--set", 'model_options={"metadata_dropout": 0, "head_dropout": 0}']


@pytest.mark.timeout(600)
def test_torchrun_two_processes_log_one_run_that_matches_one_process(mlflow_store, synthetic_dir):
    args = ["train", "--model", "cnn_fusion", "--backbone", "test_efficientnet", "--pretrained", "none",
            "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--imbalance", "sampler",
            "--data-dir", str(synthetic_dir), "--num-workers", "0", "--device", "cpu", "--seed", "3", *DETERMINISTIC]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "skinml", *args, "--run-name", "single"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    split = client.search_runs(experiments, "tags.`skinml.step` = 'split'")[0].info.run_id
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "skinml", *args, "--split", split, "--run-name", "ddp"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    runs = client.search_runs(experiments, "tags.`skinml.step` = 'train'")
    assert sorted(r.info.run_name for r in runs) == ["ddp", "single"]  # rank 1 logged nothing
    by_name = {r.info.run_name: r for r in runs}
    params = by_name["ddp"].data.params
    assert (params["world_size"], params["global_batch_size"], params["per_process_batch_size"],
            params["dist_backend"]) == ("2", "16", "8", "gloo")
    curves = {name: {key: [m.value for m in client.get_metric_history(run.info.run_id, key)]
                     for key in ("train_loss", "val_loss")} for name, run in by_name.items()}
    # Same global batches and averaged gradients; what differs is BatchNorm's training-mode
    # statistics, over each process's 8 rows instead of 16 (SyncBatchNorm, GPU only, removes
    # that). Stated tolerance: validation loss (eval mode) within 1%, training loss within 8%.
    print(json.dumps(curves))
    np.testing.assert_allclose(curves["ddp"]["val_loss"], curves["single"]["val_loss"], rtol=0.01)
    np.testing.assert_allclose(curves["ddp"]["train_loss"], curves["single"]["train_loss"], rtol=0.08)
    assert curves["ddp"]["train_loss"] != curves["single"]["train_loss"]  # two processes really ran
    artifacts = {a.path for a in client.list_artifacts(by_name["ddp"].info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    print(json.dumps(curves))
