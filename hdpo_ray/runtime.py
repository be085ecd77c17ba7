"""Ray start-up for the commands: join or start a cluster with the run's environment, and keep Ray quiet.

Quiet (the default): the driver shows only what hdpo_ray prints; Ray's own warnings, its actors' and
workers' output (weight-loading bars, start-up lines) stay in Ray's log files (/tmp/ray/session_latest/logs).
Errors still reach the user: a failed worker's exception, with its traceback, is raised in the driver.
VERBOSE_ENV=1 (`--verbose`) shows everything Ray prints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from pathlib import Path

from hdpo_ray.config import Config
from hdpo_ray.errors import UserError

log = logging.getLogger("hdpo_ray")
VERBOSE_ENV = "HDPO_RAY_VERBOSE"
PROBE_S = 5.0  # how long a cluster's address may take to accept a connection before it counts as gone


class ClusterUnreachable(UserError):
    """RAY_ADDRESS names a cluster that does not answer; one line for the user."""


def init_ray(config: Config) -> None:
    """Join the cluster at RAY_ADDRESS if set (ray job submit, KubeRay), else start a local Ray
    whose dashboard listens on loopback only."""
    import ray

    if ray.is_initialized():
        return
    address = connection_address()
    wanted = {
        "DS_ACCELERATOR": "cuda" if config.train.use_gpu else "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        # Read by every Ray Train controller this run starts (Tune trials' too), which inherit this runtime env.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(config.train.report_poll_s),
    }
    # where converted GGUF models live: the driver's choice holds for its workers
    if os.environ.get("HDPO_RAY_MODEL_CACHE"):
        wanted["HDPO_RAY_MODEL_CACHE"] = os.environ["HDPO_RAY_MODEL_CACHE"]
    if verbose():  # the trials' and actors' own Ray Data and logging settings follow --verbose too
        wanted[VERBOSE_ENV] = "1"
    if os.environ.get("RAY_ADDRESS"):
        # Ray's State API, used inside the run's actors (Ray Train's placement-group cleaner), finds its cluster
        # from RAY_ADDRESS, else by looking for a running GCS and failing when a machine runs more than one.
        wanted["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    env = {"env_vars": {k: v for k, v in wanted.items() if k not in _job_env_vars()}}
    loud = verbose()
    if not loud:
        warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # Ray's deprecation notices, not the user's to act on
    chatter = {"log_to_driver": loud, "logging_level": logging.INFO if loud else logging.ERROR}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, **chatter)
    else:
        # The dashboard process also serves the State API, which Ray Train's placement-group cleaner needs.
        ray.init(address=address, runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1", **chatter)
    configure_ray_data()


def verbose() -> bool:
    """Whether Ray's own output is shown (`--verbose`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def connection_address() -> str | None:
    """What the driver passes to ray.init, checked first so that a dead cluster is named, not waited on (Ray
    itself retries a dead address for minutes): RAY_ADDRESS when it answers, else ClusterUnreachable; without
    RAY_ADDRESS, None (Ray joins the head the latest `ray start` on this machine recorded) when that head
    answers or there is none, "local" (a new local Ray, said in one line) when the recorded head is gone."""
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        if not answers(address):
            raise ClusterUnreachable(
                f"RAY_ADDRESS={address}: no Ray cluster answers there; start it (`ray start --head`), point "
                "RAY_ADDRESS at a running one, or unset it to run on a local Ray"
            )
        return address
    recorded = recorded_head()
    if recorded is None or answers(recorded):
        return None
    log.warning(
        "the Ray head recorded by the latest `ray start` on this machine (%s) does not answer: starting a local "
        "Ray instead (`ray stop` clears the record; set RAY_ADDRESS to join a cluster)",
        recorded,
    )
    return "local"


def recorded_head() -> str | None:
    """The head address the latest `ray start` on this machine recorded (where ray.init looks without an address)."""
    try:
        from ray._common.utils import get_ray_address_file  # Ray's own record: no public accessor in Ray 2.60
    except ImportError:
        return None
    record = Path(get_ray_address_file(None))
    return (record.read_text().strip() or None) if record.is_file() else None


def answers(address: str, timeout_s: float = PROBE_S) -> bool:
    """Whether a host:port address accepts a TCP connection; other forms (ray://, auto) are left to Ray."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return True
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env `ray job submit` gave this driver's job. Ray refuses to merge a driver's
    runtime env that sets one of them again, so the job's values win."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def configure_ray_data() -> None:
    """This process's Ray Data settings, set before it builds a dataset: no progress bars (the reference pass
    turns them on, on a terminal), Ray Data's log lines only with `--verbose`, rows kept in order, and parquet
    read by Ray Data's V1 reader.

    In order: the cache entries hold the pairs in input order whatever the cluster (the reference pool's
    actors finish batches in any order), so training sees the same pairs in the same steps anywhere.

    Ray 2.60's V2 parquet reader lists files in a task holding one CPU that starts 32 FooterReader
    actors, each needing one more CPU to be scheduled. Where little CPU is free (a sweep's trials side
    by side, each worker reading the eval split, on a cluster the workers fill), the listing tasks hold
    every free CPU and their footer readers never start: the run hangs. V1 reads with data.cache.READ_CPUS.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # but for the reference pass on a terminal (data/prepare.py)
    context.enable_operator_progress_bars = True
    context.print_on_execution_start = False
    context.use_datasource_v2 = False
    context.execution_options.preserve_order = True
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose() else logging.ERROR)
