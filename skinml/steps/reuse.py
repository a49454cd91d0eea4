"""Finding a step that already finished with the same inputs (MLflow's multistep ``_already_ran``).

A finished run is reused only when every parameter the step would log has the same value, it
ran from the same git commit, and (for steps downstream of a split) on the same split manifest.
"""

from __future__ import annotations

from typing import Any

import mlflow

from skinml import tracking


def find_finished_run(step: str, params: dict[str, Any], split_hash: str | None = None,
                      git_commit: str | None = None) -> mlflow.entities.Run | None:
    """The newest FINISHED run of ``step`` whose logged ``params`` all equal these.

    ``git_commit`` defaults to the commit of the running code; a run without a recorded commit
    is never reused (its code is unknown).
    """
    tracking.setup_tracking()
    client = mlflow.MlflowClient()
    commit = git_commit or tracking.git_tags().get("skinml.git_commit")
    if not commit:
        return None
    query = f"tags.`{tracking.TAG_STEP}` = '{step}' and attributes.status = 'FINISHED'"
    if split_hash:
        query += f" and tags.`{tracking.TAG_SPLIT_HASH}` = '{split_hash}'"
    wanted = {key: tracking.param_text(value) for key, value in params.items()}
    experiments = [e.experiment_id for e in client.search_experiments()]
    token = None
    while True:
        page = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=500,
                                  page_token=token)
        for run in page:
            if run.data.tags.get("skinml.git_commit") != commit:
                continue
            if all(tracking.run_param(run, key) == value for key, value in wanted.items()):
                return run
        token = page.token
        if not token:
            return None
