"""A Ray head of a benchmark's own on this machine, and the resident memory of the processes under it.

Other Ray clusters may share the machine (a test session's head), so every port is chosen free and the
head is stopped by killing its own process tree, never `ray stop`. Used by bench/data_scale.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]  # the checkout measured: its hdpo_ray goes first on every PYTHONPATH
SAMPLE_EVERY_S = 0.25
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_next_to_python(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else shutil.which(name)


class RayHead:
    """One Ray head of our own. Other Ray clusters share this machine, so every port is chosen free, and
    stopping it kills only the processes that name our temp dir or our GCS address, and their descendants
    (Ray renames its workers "ray::...", so they are found as the raylet's children). Never `ray stop`."""

    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="hdpo-ds-", dir="/tmp")  # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # The head's env reaches every Ray worker: they import hdpo_ray from this checkout, as the driver does, and
        # whatever in them looks a cluster up (Ray Train's placement-group cleaner) finds this one, not the newest
        # `ray start` on the machine.
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": pythonpath, "RAY_ADDRESS": self.address}
        self.roots: list[psutil.Process] = []

    def start(self) -> None:
        # With the dashboard on (loopback only): it serves the State API that Ray Train's placement-group cleaner
        # polls; without it the cleaner logs a failure every second. `hdpo-ray train` on its own starts it too.
        flags = [
            "--dashboard-port",
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        ]
        ports = [str(x) for flag in flags for x in (flag, free_port())]  # Ray's fixed defaults may be taken by others
        command = [
            bin_next_to_python("ray") or "ray",
            "start",
            "--head",
            "--num-cpus",
            str(self.num_cpus),
            "--port",
            str(self.port),
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            self.temp_dir,
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--disable-usage-stats",
            *ports,
        ]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.roots = self._own_processes()

    def _own_processes(self) -> list[psutil.Process]:
        """Processes whose command line names our temp dir or our GCS address (not a longer port that starts alike)."""
        address = re.compile(re.escape(self.address) + r"(?!\d)")
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if proc.pid != os.getpid() and (self.temp_dir in cmdline or address.search(cmdline)):
                found.append(proc)
        return found

    def descendants(self) -> list[psutil.Process]:
        """Every live process below our head's own processes: workers, actors, agents."""
        seen: dict[int, psutil.Process] = {}
        for root in self.roots:
            try:
                for child in root.children(recursive=True):
                    seen[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        return list(seen.values())

    def stop(self) -> None:
        victims = {p.pid: p for p in [*self._own_processes(), *self.roots, *self.descendants()] if p.pid != os.getpid()}
        for proc in victims.values():
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(victims.values()), timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        return [p.pid for p in self._own_processes()]


def describe(proc: psutil.Process) -> str:
    """The command line, and the name where the command line lacks it: Ray puts "ray::RayTrainWorker" in the command
    line and a 15-character cut of it in the name."""
    try:
        name, cmdline = proc.name(), " ".join(proc.cmdline()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""
    return cmdline if name in cmdline else f"{name} {cmdline}".strip()


class MemorySampler(threading.Thread):
    """Peak RSS (MB) per process, every SAMPLE_EVERY_S: the driver, and every process below our Ray head, by its
    Ray title; a process titled with one of `kept_marks` (e.g. "RayTrainWorker") keeps that title to the end."""

    def __init__(self, driver_pid: int, head: RayHead, kept_marks: tuple[str, ...]):
        super().__init__(daemon=True)
        self.driver = psutil.Process(driver_pid)
        self.head = head
        self.kept_marks = kept_marks
        self.stopping = threading.Event()
        self.driver_peak = 0.0
        self.peaks: dict[int, float] = {}
        self.labels: dict[int, str] = {}
        self.parents: dict[int, int] = {}

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(SAMPLE_EVERY_S)

    def sample(self) -> None:
        try:
            self.driver_peak = max(self.driver_peak, self.driver.memory_info().rss / MB)
        except psutil.NoSuchProcess:
            pass
        for proc in self.head.descendants():
            label = describe(proc)
            try:
                rss = proc.memory_info().rss / MB
                self.parents[proc.pid] = proc.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            # A Ray worker is renamed "ray::<actor or task>" once it has work: keep the newest name, except that a
            # kept title stays to the end (an empty command line says nothing).
            old = self.labels.get(proc.pid, "")
            if label and not any(mark in old for mark in self.kept_marks):
                self.labels[proc.pid] = label
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0.0), rss)

    def max_peak(self, mark: str) -> float | None:
        """The largest peak among the processes titled `mark`, leaving out their forks: a fork keeps its parent's
        title (DeepSpeed's py-cpuinfo probe and compiler calls in a training worker show as ray::RayTrainWorker)."""
        values = [
            peak
            for pid, peak in self.peaks.items()
            if mark in self.labels.get(pid, "") and mark not in self.labels.get(self.parents.get(pid, -1), "")
        ]
        return max(values) if values else None

    def named_peaks(self) -> dict[str, float]:
        """Peak RSS of every Ray process seen, keyed by its (shortened) title and pid, for the JSON."""
        return {f"{self.labels.get(pid, '?')[:100]} [{pid}]": round(mb, 1) for pid, mb in sorted(self.peaks.items())}
