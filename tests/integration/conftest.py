"""The run that the job, worker-kill, multi-node, lost-node and sweep tests all compare against, made once per session.

Every such run trains the embedded default on the same 24 real pairs (6 held out) with the same settings
(`comparison_args`); only where and how it runs differs (one node or several, ZeRO-2 or ZeRO-3, lost
workers or nodes), so each must end with this run's numbers.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdpo_ray.models import ASSETS
from tests.integration.checks import comparison_args, ray_job, submit, wait_for_job


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """(train, eval): the first 24 embedded UltraFeedback train pairs and the first 6 test pairs, all valid."""
    work = tmp_path_factory.mktemp("pairs")
    train, test = work / "train.parquet", work / "test.parquet"
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, 24), train)
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/test_prefs-100.parquet").slice(0, 6), test)
    return train, test


@pytest.fixture(scope="session")
def one_node_run(dashboard_url, pairs, tmp_path_factory) -> tuple[Path, str]:
    """`comparison_args` submitted with `ray job submit` to the session's one-node head and run to the end,
    MLflow (a local file store beside it) on: (output_dir, submission id). Its reference cache is
    output_dir/../cache."""
    work = tmp_path_factory.mktemp("one-node")
    out = work / "run"
    submit(
        dashboard_url,
        "hdpo-one-node",
        comparison_args(out, work / "cache", pairs, f"logging.mlflow_uri=file://{work}/mlruns"),
    )
    assert wait_for_job(dashboard_url, "hdpo-one-node") == "SUCCEEDED", ray_job(
        dashboard_url, "logs", "hdpo-one-node"
    ).stdout[-4000:]
    return out, "hdpo-one-node"
