"""Run untrusted, model-written Python programs one process each, with OS-level limits.

What it does, per program: writes it into a fresh temporary directory (removed afterwards) and runs
`python -I -B` there with a minimal environment (HOME and TMPDIR point at that directory), stdin empty
and stdout discarded. A launcher (this file, run as a script) sets the limits before the program starts:
address space (memory_mb), CPU seconds, 16 MiB per written file, no core files. Where the kernel lets it
(root, or an unprivileged user namespace) the program runs in new namespaces:
  - network: only a loopback device that is down, so no connection anywhere, not even to 127.0.0.1;
  - PID: the program is PID 1 of its namespace, so when it ends or is killed every process it started
    (even one that left its session with setsid) is killed by the kernel, and it cannot signal others;
  - mount: every mount read-only (and nosuid) except its own directory, so it cannot write elsewhere,
    even into world-writable places such as /tmp or /dev/shm.
As root, it also drops to the `nobody` user (uid/gid 65534, no groups; at most 512 processes for that
user) so the OS refuses writes to what nobody does not own, even where the mount namespace is missing;
when nobody cannot reach this interpreter (a pyenv or conda under /root), the system's python of the
same version runs the programs instead, and when there is none, programs run as root (read-only
mounts then are what keeps them from writing elsewhere; `ExecResult.isolation` has no "nobody").
The host enforces the wall-clock limit: it SIGKILLs the launcher's whole process group (the program
gets SIGKILL when the launcher dies). A guard like openai/human-eval's `reliability_guard` is prepended
to the program (os.system/kill/remove/fork, subprocess.Popen, shutil.rmtree, exit/quit/help disabled):
that is defence in depth only, any program can undo it (importlib.reload, `import posix`).

What it does NOT protect against (`ExecResult.isolation` says which protections were in effect): when
not root and user namespaces are not allowed, there is no network isolation, the program can write
whatever this user can write, and a child that calls setsid() outlives the timeout. Always: the program
can read every file its user can read (including the tests it is scored by), use CPU and memory up to
the limits (no cgroup), and attack the kernel itself. This is no security boundary against deliberately
malicious code: as openai/human-eval warns, evaluate on a machine or container you can afford to lose.
"""

from __future__ import annotations

import os
import sys

NOBODY = 65534  # uid and gid of `nobody`, which owns nothing
NOBODY_MAX_PROCESSES = 512  # RLIMIT_NPROC, for all of nobody's programs together: stops a fork bomb
MAX_FILE_BYTES = 16 << 20  # RLIMIT_FSIZE; also caps stderr, which goes to a file

# ---- The launcher, first: `python -I -S -B sandbox.py ARGS`, started by run_program in the program's directory ----

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1000, 0x4000, 0x40000, 0x2, 0x4, 0x8
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_FDCWD, AT_RECURSIVE, SYS_MOUNT_SETATTR = (
    0x1,
    0x2,
    -100,
    0x8000,
    442,  # 442 on every arch
)
PR_SET_PDEATHSIG, SIGKILL = 1, 9
_LAUNCH_ARGS = (
    "program",
    "workdir",
    "python",  # then all ints
    "host_pid",
    "report_fd",
    "memory_bytes",
    "cpu_seconds",
    "drop_to_nobody",
)


def _launch(config: dict) -> None:
    """Limits, namespaces, privilege drop, then exec the program. Writes to report_fd one line per protection in
    effect (user-namespace, net-namespace, pid-namespace, read-only-mounts, nobody), or "error: WHY"."""
    import ctypes
    import resource

    report_fd = config["report_fd"]
    os.set_inheritable(report_fd, False)  # the program must not inherit it

    def report(*lines: str) -> None:
        if lines:
            os.write(report_fd, "".join(f"{line}\n" for line in lines).encode())

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if os.getppid() != config["host_pid"]:  # the host died before that: nobody would wait for us
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_AS, (config["memory_bytes"], config["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], config["cpu_seconds"] + 1))  # SIGXCPU, then SIGKILL

    namespaces = _enter_new_namespaces(libc)
    report(*namespaces)
    if "pid-namespace" in namespaces:
        # Only a child lives in the new PID namespace (as its PID 1); the launcher stays to pass on how it ended.
        child = os.fork()
        if child:
            os.close(report_fd)
            status = os.waitpid(child, 0)[1]
            if os.WIFSIGNALED(status):  # die of the same signal, so the host sees what the program saw
                import signal

                signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                os.kill(os.getpid(), os.WTERMSIG(status))
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
    try:
        if _make_mounts_read_only(libc, config["workdir"]):
            report("read-only-mounts")
        if config["drop_to_nobody"]:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            # after setuid: it counts per user
            resource.setrlimit(resource.RLIMIT_NPROC, (NOBODY_MAX_PROCESSES, NOBODY_MAX_PROCESSES))
            report("nobody")
        # setuid cleared it
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
        os.execv(config["python"], [config["python"], "-I", "-B", config["program"]])
    except OSError as err:
        report(f"error: {err} (starting {config['python']} as uid {os.getuid()})")
        os._exit(1)


def _enter_new_namespaces(libc) -> list[str]:
    """New network and PID namespaces: directly as root, else inside a new user namespace where that is allowed."""
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0:
        return ["net-namespace", "pid-namespace"]
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) == 0:
        # The same ids inside as outside, so files keep their owners; capabilities are lost at exec.
        for path, text in (
            ("/proc/self/uid_map", f"{uid} {uid} 1"),
            ("/proc/self/setgroups", "deny"),
            ("/proc/self/gid_map", f"{gid} {gid} 1"),
        ):
            with open(path, "w") as file:
                file.write(text)
        return ["user-namespace", "net-namespace", "pid-namespace"]
    if libc.unshare(CLONE_NEWNET) == 0:
        return ["net-namespace"]
    return []


def _make_mounts_read_only(libc, workdir: str) -> bool:
    """In a new mount namespace, every mount read-only and nosuid except `workdir`; False where not permitted."""
    import ctypes

    class MountAttr(ctypes.Structure):
        _fields_ = [
            ("attr_set", ctypes.c_uint64),
            ("attr_clr", ctypes.c_uint64),
            ("propagation", ctypes.c_uint64),
            ("userns_fd", ctypes.c_uint64),
        ]

    def mount_setattr(path: bytes, flags: int, attr: MountAttr) -> bool:
        args = (
            ctypes.c_long(AT_FDCWD),
            ctypes.c_char_p(path),
            ctypes.c_ulong(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        return libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), *args) == 0

    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    path = workdir.encode()
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False  # private first, so that nothing done here propagates back to the host
    if libc.mount(path, path, None, MS_BIND, None) != 0:  # workdir as a mount of its own, to be made writable again
        return False
    # A /proc of the new PID namespace: the program sees only its own processes. Optional, as containers may refuse.
    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    if not mount_setattr(b"/", AT_RECURSIVE, MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)):
        return False
    if not mount_setattr(path, 0, MountAttr(attr_clr=MOUNT_ATTR_RDONLY)):
        return False
    os.chdir(workdir)  # the old working directory is the read-only one underneath the bind mount
    return True


if __name__ == "__main__":  # never returns: it execs the program or exits, without the host part's imports
    _launch(
        dict(zip(_LAUNCH_ARGS, sys.argv[1:4], strict=False))
        | {key: int(value) for key, value in zip(_LAUNCH_ARGS[3:], sys.argv[4:], strict=True)}
    )


# ---- The host part ----

from dataclasses import dataclass  # after the launcher, which would spend 20 ms a program importing it  # noqa: E402
from functools import lru_cache  # noqa: E402 (after the launcher too, as the line above)

STDERR_TAIL_BYTES = 4096

# Defence in depth, after openai/human-eval's reliability_guard: it stops accidents, not intent.
GUARD = """\
def _sandbox_guard():
    import builtins, faulthandler, os, shutil, subprocess, sys
    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename", "renames",
                 "replace", "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir",
                 "fchdir", "getcwd", "setuid", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "spawnv",
                 "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen"):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


_sandbox_guard()
del _sandbox_guard
"""


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" (ran to its last line, exit 0), "failed", "timeout" (wall or CPU), "killed" (by a signal)
    detail: str = ""  # the last line of stderr, or what stopped the program
    seconds: float = 0.0  # wall time, launch to exit
    isolation: tuple[str, ...] = ()  # the OS protections that were in effect, see _launch


class SandboxError(RuntimeError):
    """The sandbox could not start a program at all (not the program's fault); the message says why."""


def run_program(code: str, *, timeout_s: float, memory_mb: int) -> ExecResult:
    """Run `code` in its own sandboxed process (see the module docstring); the program's
    faults are results, not errors."""
    import secrets
    import shutil
    import tempfile
    import time

    nobody_python = _python_for_nobody() if os.geteuid() == 0 else None
    as_nobody = nobody_python is not None  # root with an interpreter nobody can run: drop to nobody
    python = nobody_python or sys.executable
    workdir = tempfile.mkdtemp(prefix="hdpo-sandbox-", dir=_tempdir_nobody_can_reach() if as_nobody else None)
    end_marker = secrets.token_hex(16)  # printed after the last line: a sys.exit(0) halfway is no pass
    report_read, report_write = os.pipe()
    try:
        program = os.path.join(workdir, "program.py")
        with open(program, "w", encoding="utf-8") as file:
            file.write(f"{GUARD}\n{code}\n\n__import__('os').write(2, b'\\n{end_marker}\\n')\n")
        if as_nobody:  # the program runs as nobody: its own directory is the one place it may write
            os.chown(workdir, NOBODY, NOBODY)
            os.chown(program, NOBODY, NOBODY)
        config = {
            "program": program,
            "workdir": workdir,
            "python": python,
            "host_pid": os.getpid(),
            "report_fd": report_write,
            "memory_bytes": memory_mb << 20,
            "cpu_seconds": int(timeout_s) + 1,
            "drop_to_nobody": int(as_nobody),
        }
        with tempfile.TemporaryFile() as stderr:
            started = time.monotonic()
            launcher = _start_launcher(config, stderr)
            os.close(report_write)
            report_write = -1
            timed_out = not _wait_then_kill_group(launcher, timeout_s)
            seconds = time.monotonic() - started
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
            stderr_tail = stderr.read().decode("utf-8", "replace")
        report = _read_available(report_read).splitlines()
    finally:
        for fd in (report_read, report_write):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, onerror=_make_removable)
    errors = [line.removeprefix("error: ") for line in report if line.startswith("error: ")]
    if errors:
        raise SandboxError(f"the sandbox could not start a program: {errors[0]}")
    status, detail = _outcome(launcher.returncode, timed_out, stderr_tail, end_marker)
    return ExecResult(status, detail, round(seconds, 3), tuple(report))


def _start_launcher(config: dict, stderr):
    """A Popen of this file run as the launcher (its __main__ part) with `config` as arguments, in a new session,
    with a bare environment; stderr goes to the given file."""
    import subprocess

    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": config["workdir"],
        "TMPDIR": config["workdir"],
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    # No preexec_fn (unsafe with threads): the launcher sets limits and namespaces after its exec.
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), *(str(config[key]) for key in _LAUNCH_ARGS)],
        cwd=config["workdir"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        pass_fds=(config["report_fd"],),
        start_new_session=True,
    )


def run_programs(
    codes: list[str], *, timeout_s: float, memory_mb: int, max_workers: int | None = None
) -> list[ExecResult]:
    """run_program for each code, several at once, results in input order; the threads only launch and wait."""
    from concurrent.futures import ThreadPoolExecutor

    # The CPUs this process may run on, not the machine's: in a container os.cpu_count() is the host's.
    with ThreadPoolExecutor(max_workers=max_workers or len(os.sched_getaffinity(0)) or 1) as pool:
        return list(pool.map(lambda code: run_program(code, timeout_s=timeout_s, memory_mb=memory_mb), codes))


def _wait_then_kill_group(launcher, timeout_s: float) -> bool:
    """Whether the launcher exited within timeout_s. Then its process group is SIGKILLed, before it is reaped so
    that the group id cannot have been reused by another process meanwhile."""
    import select
    import signal
    import subprocess

    try:
        pidfd = os.pidfd_open(launcher.pid)  # readable once it exits, while still a zombie
    except (AttributeError, OSError):  # no pidfd (kernel < 5.3): reaping first leaves a small pid-reuse window
        pidfd = None
    try:
        if pidfd is not None:
            poll = select.poll()  # not select(): the host may hold more than 1024 descriptors
            poll.register(pidfd, select.POLLIN)
            exited = bool(poll.poll(timeout_s * 1000))
        else:
            try:
                launcher.wait(timeout_s)
                exited = True
            except subprocess.TimeoutExpired:
                exited = False
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # the program's children, unless they left with setsid()
        except ProcessLookupError:
            pass
        launcher.wait()
        if pidfd is not None:
            os.close(pidfd)
    return exited


def _outcome(returncode: int, timed_out: bool, stderr_tail: str, end_marker: str) -> tuple[str, str]:
    """(status, detail) from how the program ended."""
    import signal

    lines = [line.strip() for line in stderr_tail.splitlines() if line.strip()]
    last_line = next((line[:300] for line in reversed(lines) if line != end_marker), "")
    if timed_out:
        return "timeout", "wall-clock limit reached"
    if returncode < 0:
        signum = -returncode
        if signum == signal.SIGXCPU:
            return "timeout", "CPU time limit reached (SIGXCPU)"
        name = signal.Signals(signum).name if signum in signal.valid_signals() else f"signal {signum}"
        reason = {signal.SIGXFSZ: "file size limit reached", signal.SIGKILL: "killed"}.get(signum, last_line)
        return "killed", f"{name}: {reason}" if reason else name
    if returncode == 0 and lines and lines[-1] == end_marker:
        return "passed", ""
    if returncode == 0:
        return "failed", last_line or "exited with status 0 before its last line"
    return "failed", last_line or f"exit status {returncode}"


def _tempdir_nobody_can_reach() -> str:
    """The temp dir if `nobody` may reach it (not so under a 0700 home), else /tmp."""
    import tempfile

    return tempfile.gettempdir() if _others_can_reach(tempfile.gettempdir()) else "/tmp"


@lru_cache(maxsize=1)
def _python_for_nobody() -> str | None:
    """This interpreter if `nobody` may run it, else one of the same version that it may (a pyenv or conda
    under /root is out of its reach; its packages may differ, the standard library does not), else None:
    programs then run as root, kept from writing outside their directory by the read-only mounts only."""
    import shutil

    if _others_can_reach(sys.executable) and _others_can_reach(os.path.join(sys.base_prefix, "lib")):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for found in (shutil.which(version, path="/usr/local/bin:/usr/bin:/bin"), f"/usr/bin/{version}"):
        if found and _others_can_reach(found):
            return found
    return None


def _others_can_reach(path: str) -> bool:
    """Whether a user with no claim on `path` (nobody) may reach it: execute permission for others all the way."""
    chain = [os.path.realpath(path)]
    while chain[-1] != "/":
        chain.append(os.path.dirname(chain[-1]))
    try:
        return all(os.stat(p).st_mode & 0o001 for p in chain)
    except OSError:
        return False


def _make_removable(function, path, exc_info) -> None:
    """shutil.rmtree's onerror: the program may have taken away write permission on a directory; restore, retry."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        function(path)
    except OSError:
        pass


def _read_available(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks).decode()
