"""Real multi-node Ray clusters on one machine, for the scale-out tests.

- `AutoscalingHead`: a head started with `ray start` and Ray's real autoscaler on the fake multi-node
  provider (`provider.type: fake_multinode`, as Ray's own autoscaler tests run it): 0 CPUs on the head,
  worker node types starting at 0 that the autoscaler launches as real raylets on this machine.
- `ray.cluster_utils.Cluster` (Ray's own fault-tolerance tests use it) for fixed clusters of labelled
  nodes, one of which a test can take away.

Each cluster has its own temp dir and ports, and is stopped by killing exactly its own processes: never
`ray stop`, which would end every Ray process on the machine (the session's head too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

from tests.helpers import REPO, free_port, hdpo_ray_exe, kill_processes, ray_cli

EMPTY_KEYS = (
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "initialization_commands",
    "rsync_exclude",
    "rsync_filter",
    "cluster_synced_files",
)


def fake_cluster_config(gcs_address: str, node_types: dict[str, dict]) -> dict:
    """Ray's fake multi-node provider config: a 0-CPU head and `node_types` {name: {resources, max_workers}} from 0."""
    workers = {
        name: {"resources": spec["resources"], "node_config": {}, "min_workers": 0, "max_workers": spec["max_workers"]}
        for name, spec in node_types.items()
    }
    return {
        "cluster_name": "hdpo-fake",
        "max_workers": sum(spec["max_workers"] for spec in node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
        | workers,
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in EMPTY_KEYS},
    }


class AutoscalingHead:
    """`with AutoscalingHead(node_types) as head:` head.address (RAY_ADDRESS), head.dashboard (ray job --address)."""

    def __init__(self, node_types: dict[str, dict]):
        from ray._private.services import get_node_ip_address

        self.temp = Path(tempfile.mkdtemp(prefix="hdpo-as-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"{get_node_ip_address()}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        (self.temp / "autoscaler.yaml").write_text(yaml.safe_dump(fake_cluster_config(self.address, node_types)))

    def __enter__(self) -> AutoscalingHead:
        env = os.environ | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"}
        # Own temp dir and ports throughout: the default client-server and dashboard-agent ports are the session
        # head's, and a head whose agent cannot bind its port has no job server ("No available agent to submit job").
        command = [
            ray_cli(),
            "start",
            "--head",
            "--num-cpus=0",
            f"--port={self.port}",
            f"--temp-dir={self.temp}",
            f"--autoscaling-config={self.temp / 'autoscaler.yaml'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
        ]
        subprocess.run(command, check=True, capture_output=True, env=env, timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        kill_processes(str(self.temp), self.address)
        shutil.rmtree(self.temp, ignore_errors=True)

    def worker_nodes(self) -> list[dict]:
        """Alive nodes other than the head, from Ray's state API."""
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, limit=1000) if n.state == "ALIVE" and not n.is_head_node]


def start_fixed_cluster(dashboard_port: int, head_cpus: float = 1):
    """A `ray.cluster_utils.Cluster` head (dashboard on loopback for the state API and job server) that notices a
    lost node within seconds (Ray's default health check takes tens of seconds)."""
    from ray.cluster_utils import Cluster

    fast_health_check = {
        "health_check_initial_delay_ms": 0,
        "health_check_period_ms": 1000,
        "health_check_failure_threshold": 3,
    }
    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "gcs_server_port": free_port(),
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            "dashboard_agent_listen_port": free_port(),
            "labels": {"hdpo-role": "head"},
            "_system_config": fast_health_check,
        },
    )


class TimedRun:
    """`hdpo-ray ARGS` in a subprocess joined to `address`; a thread keeps its output lines with the second
    each arrived (and writes them to `log`), so the test can act while it runs."""

    def __init__(self, args: list[str], address: str, log: Path):
        env = os.environ | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        self.started = time.time()
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [hdpo_ray_exe(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        self.reader = threading.Thread(target=self._read, args=(log,), daemon=True)
        self.reader.start()

    def _read(self, log: Path) -> None:
        with log.open("w") as out:
            for line in self.process.stdout:
                self.lines.append((time.time() - self.started, line.rstrip("\n")))
                out.write(f"{self.lines[-1][0]:7.1f}  {line}")
                out.flush()

    def wait(self, timeout: float = 600) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.reader.join(timeout=30)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, text: str) -> float | None:
        """Seconds from the start to the first line holding `text`."""
        return next((t for t, line in list(self.lines) if text in line), None)
