"""HumanEval and its sandbox: every official solution passes, wrong answers fail, and hostile programs
(endless loops, orphaned children, fork bombs, 8 GB allocations, writes outside their directory, network
connections) are stopped without harming the host or the programs that run after them.

The hostile programs undo the in-process guard first (importlib.reload, `import posix`), so what these
tests check is the OS-level isolation; `ExecResult.isolation` says which protections were in effect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from hdpo_ray.eval import sandbox
from hdpo_ray.eval.sandbox import NOBODY, run_program, run_programs
from hdpo_ray.eval.tasks import TaskDataError, get_task
from hdpo_ray.eval.tasks.base import read_records
from hdpo_ray.eval.tasks.humaneval import HumanEval, build_program, solution_code
from tests.helpers import OFFICIAL_SHA256, shipped_eval_bytes

GOOD = "assert sum(range(4)) == 6"
ZERO_FUNCTION = (
    "def has_close_elements(numbers, threshold):\n    return False\n"  # wrong: half of HumanEval/0's asserts want True
)


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    """The official records (with canonical_solution) of the copy shipped in the package, by task_id."""
    return {record["task_id"]: record for _, record in read_records(HumanEval.default_source)}


@pytest.fixture(scope="module")
def problems():
    return {problem.id: problem for problem in HumanEval().load()}


@pytest.fixture(scope="module")
def isolation() -> tuple[str, ...]:
    """The OS protections the sandbox has on this machine; hostile tests that need one skip without it."""
    return run_program(GOOD, timeout_s=10, memory_mb=256).isolation


def _needs(isolation: tuple[str, ...], *any_of: str) -> None:
    if not set(any_of) & set(isolation):
        pytest.skip(
            f"the sandbox has none of {any_of} here, so this program would harm the host (see sandbox's docstring)"
        )


def _survivors(marker: str, wait_s: float = 5.0) -> list[int]:
    """Processes whose command line holds `marker`, once given up to wait_s to disappear; they are killed then."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass  # exited while we looked
        if not found or time.monotonic() > deadline:
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            return found
        time.sleep(0.1)


def test_registry_layout_and_prompt(problems):
    task = get_task("humaneval")
    assert isinstance(task, HumanEval) and task.name == "humaneval" and len(problems) == 164
    first = problems["HumanEval/0"]
    assert (
        set(first.target) == {"prompt", "test", "entry_point"} and first.target["entry_point"] == "has_close_elements"
    )
    assert (
        first.prompt.startswith("Complete the following Python function.")
        and "```python\nfrom typing import List" in first.prompt
    )
    assert first.prompt.endswith('"""\n```')
    with pytest.raises(TaskDataError, match="line 3: field 'entry_point' is missing"):
        task.problem(
            {"task_id": "x", "prompt": "def f():\n", "test": "def check(c): pass"}, "HumanEval.jsonl, line 3", 2
        )


def test_shipped_copy_is_the_official_file():
    shipped = shipped_eval_bytes("humaneval/HumanEval.jsonl")
    assert hashlib.sha256(shipped).hexdigest() == OFFICIAL_SHA256["humaneval/HumanEval.jsonl"]
    assert [json.loads(line) for line in shipped.decode().splitlines() if line.strip()] == [
        record for _, record in read_records(HumanEval.default_source)
    ]


def test_all_164_canonical_solutions_pass(problems, records):
    started = time.monotonic()
    scores = HumanEval().score_many(
        [(problems[task_id], record["canonical_solution"]) for task_id, record in records.items()]
    )
    seconds = time.monotonic() - started
    print(f"\n164 canonical solutions in {seconds:.1f} s on {os.cpu_count()} CPUs")
    assert [task_id for task_id, score in zip(records, scores, strict=True) if not score.correct] == []
    assert seconds < 120  # some 10 s on 2 idle cores; generous for a shared machine


def test_completion_forms(problems, records):
    task, zero = HumanEval(), problems["HumanEval/0"]
    body = records["HumanEval/0"]["canonical_solution"]
    full = (
        "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + body
    )
    fenced = (
        f"Here is the function:\n\n```python\n{full}```\n\nIt compares every pair.\n```python\nraise SystemExit(1)\n```"
    )
    uses_helper = (
        "```py\ndef make_palindrome(string: str) -> str:\n    i = 0\n"
        "    while not is_palindrome(string[i:]):\n        i += 1\n    return string + string[:i][::-1]\n```"
    )
    main_block = (
        f"```python\n{full}\n\nif __name__ == '__main__':\n    print(has_close_elements([float(input())], 1.0))\n```"
    )
    cut_off = f"```python\n{full}"  # no closing fence: the answer was cut off after the function
    scores = task.score_many(
        [(zero, fenced), (zero, body), (zero, main_block), (zero, cut_off), (problems["HumanEval/10"], uses_helper)]
    )
    assert [score.details for score in scores] == [{"status": "passed", "detail": ""}] * 5
    assert scores[0].extracted == full and scores[1].extracted == body


def test_wrong_answers_fail(problems):
    task, zero = HumanEval(), problems["HumanEval/0"]
    wrong, early_exit, syntax = (
        task.score(zero, answer)
        for answer in (f"```python\n{ZERO_FUNCTION}```", "    import sys; sys.exit(0)\n", "    return (\n")
    )
    assert not wrong.correct and wrong.details == {"status": "failed", "detail": "AssertionError"}
    # no pass by leaving early
    assert not early_exit.correct and early_exit.details["detail"] == "exited with status 0 before its last line"
    assert not syntax.correct and "SyntaxError" in syntax.details["detail"]


def test_build_program_follows_the_official_layout():
    target = {
        "prompt": 'def f(x):\n    """Double."""\n',
        "test": "def check(c):\n    assert c(2) == 4\n",
        "entry_point": "f",
    }
    assert build_program(target, "    return 2 * x\n").endswith(
        'def f(x):\n    """Double."""\n    return 2 * x\n\n\ndef check(c):\n    assert c(2) == 4\n\n\ncheck(f)\n'
    )
    full = build_program(target, "```\ndef f(x):\n    return x + x\n```")
    # the stub first, replaced
    assert full.count("def f(") == 2 and full.index('"""Double."""') < full.index("return x + x")


def test_infinite_loop_times_out_and_the_run_goes_on():
    started = time.monotonic()
    looped = run_program("while True:\n    pass\n", timeout_s=1.0, memory_mb=256)
    assert looped.status == "timeout" and time.monotonic() - started < 10
    assert run_program(GOOD, timeout_s=5, memory_mb=256).status == "passed"


@pytest.mark.parametrize("how", ["reloaded subprocess, then returns", "posix.fork + setsid, then loops"])
def test_no_child_outlives_its_program(how, isolation):
    # without one, a child in a session of its own outlives the program (see the docstring)
    _needs(isolation, "pid-namespace")
    marker = f"hdpo-sandbox-test-{uuid.uuid4().hex}"
    sleeper = f"[sys.executable, '-c', 'import time; time.sleep(600)', '{marker}']"
    if how.startswith("reloaded"):  # the guard set subprocess.Popen to None; a reload brings it back
        code = (
            "import importlib, subprocess, sys\nimportlib.reload(subprocess)\n"
            f"subprocess.Popen({sleeper}, start_new_session=True)\n"
        )
    else:  # os.fork is None, posix.fork is not; setsid leaves the process group the host kills
        code = (
            "import posix, sys\nif posix.fork() == 0:\n    posix.setsid()\n"
            f"    posix.execv(sys.executable, {sleeper})\nwhile True:\n    pass\n"
        )
    result = run_program(code, timeout_s=3, memory_mb=512)
    assert result.status == ("passed" if how.startswith("reloaded") else "timeout"), result
    assert _survivors(marker) == [], result.isolation
    assert run_program(GOOD, timeout_s=5, memory_mb=256).status == "passed"


def test_fork_bomb_is_contained(isolation):
    _needs(isolation, "pid-namespace", "nobody")  # a process limit, or a namespace whose end kills them all
    marker = f"hdpo-sandbox-test-{uuid.uuid4().hex}"
    # Each process forks until the process limit refuses, then
    # naps and tries again (spinning would only load the machine).
    bomb = (
        "import posix, time\\nwhile True:\\n    try:\\n        posix.fork()\\n"
        "    except OSError:\\n        time.sleep(0.05)"
    )
    code = f"import posix, sys\nposix.execv(sys.executable, [sys.executable, '-c', '{bomb}', '{marker}'])\n"
    result = run_program(code, timeout_s=1, memory_mb=256)
    assert result.status in ("timeout", "killed")
    assert _survivors(marker, wait_s=10) == [], result.isolation
    assert run_program(GOOD, timeout_s=5, memory_mb=256).status == "passed"


def test_memory_hog_fails_and_the_host_is_fine():
    started = time.monotonic()
    hog = run_program("block = bytearray(8 << 30)\n", timeout_s=10, memory_mb=512)
    assert hog.status == "failed" and hog.detail == "MemoryError" and time.monotonic() - started < 10
    assert run_program(GOOD, timeout_s=5, memory_mb=256).status == "passed"


def _attacks(canary: Path) -> list[str]:
    """Programs that undo the guard and go for the canary three ways."""
    return [
        f"import importlib, os\nimportlib.reload(os)\nos.remove({str(canary)!r})\n",
        f"open({str(canary)!r}, 'w').write('overwritten')\n",
        f"import posix\nposix.unlink({str(canary)!r})\nposix.rmdir({str(canary.parent)!r})\n",
    ]


def test_cannot_touch_files_outside_its_directory(tmp_path, isolation):
    # The canary is writable by everyone (666 in a 777 directory): neither its permissions nor the in-process
    # guard (undone by the attacks) protect it. What does is the sandbox: the program runs as `nobody`, which
    # may not enter pytest's 0700 base directory, and on top of that sees every mount read-only.
    _needs(isolation, "nobody", "read-only-mounts")
    tmp_path.chmod(0o777)
    canary = tmp_path / "canary.txt"
    canary.write_text("intact")
    canary.chmod(0o666)
    results = run_programs(_attacks(canary) + [GOOD], timeout_s=5, memory_mb=256)
    assert [r.status for r in results] == ["failed", "failed", "failed", "passed"], results
    assert canary.read_text() == "intact"


def test_cannot_touch_world_writable_places_outside_its_directory(isolation):
    # Here the canary is reachable by anyone (a 777 directory right under the temp dir), so running as nobody
    # does not protect it: only the read-only mount namespace does.
    _needs(isolation, "read-only-mounts")
    with tempfile.TemporaryDirectory(prefix="hdpo-canary-") as directory:
        os.chmod(directory, 0o777)
        canary = Path(directory) / "canary.txt"
        canary.write_text("intact")
        canary.chmod(0o666)
        results = run_programs(_attacks(canary) + [GOOD], timeout_s=5, memory_mb=256)
        assert [r.status for r in results] == ["failed", "failed", "failed", "passed"], results
        assert all("Read-only file system" in r.detail for r in results[:3]) and canary.read_text() == "intact"


def test_no_network(isolation):
    _needs(isolation, "net-namespace")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')\n"
        attempt, after = run_programs([code, GOOD], timeout_s=10, memory_mb=256)
        assert attempt.status == "failed" and "Network is unreachable" in attempt.detail and after.status == "passed"
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_hostile_programs_do_not_spoil_a_batch(problems, records, isolation):
    _needs(isolation, "pid-namespace")  # else kill(-1) would reach this user's other processes, pytest included
    task, ids = HumanEval(timeout_s=3, memory_mb=512), ["HumanEval/2", "HumanEval/13", "HumanEval/53", "HumanEval/101"]
    hostile = [
        "    while True:\n        pass\n",
        (
            "    import posix, time\n    while True:\n        try:\n            posix.fork()\n"
            "        except OSError:\n            time.sleep(0.05)\n"
        ),
        "    block = bytearray(8 << 30)\n",
        "    import posix\n    posix.kill(-1, 9)\n",  # inside its PID namespace there is no one else to kill
    ]
    items = [
        item
        for task_id, bad in zip(ids, hostile, strict=True)
        for item in ((problems[task_id], bad), (problems[task_id], records[task_id]["canonical_solution"]))
    ]
    scores = task.score_many(items)
    assert [score.correct for score in scores] == [False, True] * 4, [score.details for score in scores]


def test_the_sandbox_as_root_drops_to_nobody(isolation):
    if os.geteuid() != 0:
        pytest.skip("not root: the privilege drop to nobody does not apply")
    assert "nobody" in isolation, isolation
    print(f"\nsandbox protections in effect: {', '.join(isolation)}")
    # getcwd comes from posix: the guard took os.getcwd away.
    code = (
        "import os, posix\nassert os.getuid() == 65534 and os.getgroups() == []\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == posix.getcwd()\n"
    )
    assert run_program(code, timeout_s=5, memory_mb=256).status == "passed"


def test_unprivileged_users_get_the_namespaces_too():
    # Run as root, the other tests exercise the privileged path; here the sandbox itself runs as nobody, as it
    # would for an ordinary user, and gets its namespaces through a user namespace where the kernel allows one.
    if os.geteuid() != 0:
        pytest.skip("not root: the other tests already run the sandbox as an unprivileged user")
    with tempfile.TemporaryDirectory(prefix="hdpo-canary-") as directory:
        os.chmod(directory, 0o777)
        canary = Path(directory) / "canary.txt"
        canary.write_text("intact")
        canary.chmod(0o666)
        script = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('sandbox', {sandbox.__file__!r})\n"
            "sys.modules['sandbox'] = sandbox = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(sandbox)\n"
            f"results = sandbox.run_programs([{_attacks(canary)[1]!r}, {GOOD!r}], timeout_s=10, memory_mb=256)\n"
            "print(repr([(r.status, r.detail, r.isolation) for r in results]))\n"
        )
        python = sandbox._python_for_nobody()
        ran = subprocess.run(
            [python, "-I", "-c", script],
            check=False,
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        (attack_status, attack_detail, isolation), (good_status, _, _) = eval(ran.stdout)
        if "user-namespace" not in isolation:
            pytest.skip(f"no unprivileged user namespaces here: an unprivileged sandbox has only {isolation}")
        assert set(isolation) == {"user-namespace", "net-namespace", "pid-namespace", "read-only-mounts"}
        assert attack_status == "failed" and "Read-only file system" in attack_detail and good_status == "passed"
        assert canary.read_text() == "intact"


def test_the_python_block_is_found_after_a_block_in_another_language():
    answer = "Install it:\n```bash\npip install x\n```\nThen:\n```python\ndef f():\n    return 1\n```\nDone."
    assert solution_code(answer) == "def f():\n    return 1\n"
    assert solution_code("```\ndef f(): pass\n") == "def f(): pass\n"  # untagged, cut off before its closing fence
    assert solution_code("def f():\n    return 2") == "def f():\n    return 2"  # no fence: the answer as it is
