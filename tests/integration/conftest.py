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
from tests.integration.checks import FAST, ray_job, submit, wait_for_job


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    """(train, eval): the first 24 embedded UltraFeedback train pairs and the first 6 test pairs, all valid."""
    work = tmp_path_factory.mktemp("pairs")
    train, test = work / "train.parquet", work / "test.parquet"
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, 24), train)
    pq.write_table(pq.read_table(ASSETS / "ultrafeedback/test_prefs-100.parquet").slice(0, 6), test)
    return train, test


def comparison_args(out: Path, cache: Path, pairs: tuple[Path, Path], *extra: str) -> list[str]:
    """`hdpo-ray train` arguments: 2 workers, 3 epochs of 6 steps (enough steps after a lost node or worker for
    Ray Train to notice before the run ends), a checkpoint every 2 steps, eval every 6. A constant learning
    rate, so that a run cut short (a sweep's trials, max_steps) matches the first steps of the full run."""
    train, test = pairs
    return [
        "train",
        f"output_dir={out}",
        f"reference.cache_dir={cache}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{test}]",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.torch_threads=1",
        "train.zero_stage=2",
        "train.epochs=3",
        "train.lr=2e-3",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.logging_steps=1",
        "train.save_steps=2",
        "train.eval_steps=6",
        "train.keep_checkpoints=2",
        "train.max_failures=1",
        *FAST,
        *extra,
    ]


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
