"""HumanEval (openai/human-eval): complete a Python function; correct when the problem's tests pass.

The official harness runs `prompt + completion + test + check(entry_point)`, the completion being the
function body. Chat models usually answer with the whole function in a fenced block instead, so the
program is assembled from what the answer holds (see build_program) and run in the sandbox
(hdpo_ray.eval.sandbox: own process, limits, namespaces where available), many at once.
"""

from __future__ import annotations

import re
from typing import Any

from hdpo_ray.eval.sandbox import run_programs
from hdpo_ray.eval.tasks.base import Problem, Score, Task, require

INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including its signature and any imports "
    "it needs, in a single ```python code block."
)
# Fenced blocks, each from its opening fence at a line start to its closing fence (or the end: a cut-off answer),
# so the closing fence of a ```bash block is never read as the opening of another.
FENCED_BLOCK = re.compile(
    r"^[ \t]*```[ \t]*(?P<tag>[\w+-]*)[^\n]*\n(?P<code>.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE
)
PYTHON_TAGS = {"", "python", "python3", "py"}
# As in the official harness, which exec()s the program: `if __name__ == "__main__":` blocks in answers do not run.
NOT_MAIN = "__name__ = 'solution'\n__import__('sys').modules[__name__] = __import__('sys').modules['__main__']\n"


class HumanEval(Task):
    name = "humaneval"
    default_source = "embedded:eval/humaneval/HumanEval.jsonl.gz"

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None):
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.workers = workers  # programs at once; None: the CPUs this process may use

    def problem(self, record: dict[str, Any], where: str, index: int) -> Problem:
        prompt = require(record, "prompt", where)
        target = {
            "prompt": prompt,
            "test": require(record, "test", where),
            "entry_point": require(record, "entry_point", where),
        }
        return Problem(
            id=require(record, "task_id", where),
            prompt=f"{INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```",
            target=target,
        )

    def score(self, problem: Problem, completion: str) -> Score:
        return self.score_many([(problem, completion)])[0]

    def score_many(self, items: list[tuple[Problem, str]]) -> list[Score]:
        programs = [build_program(problem.target, completion) for problem, completion in items]
        results = run_programs(programs, timeout_s=self.timeout_s, memory_mb=self.memory_mb, max_workers=self.workers)
        return [
            Score(
                correct=result.status == "passed",
                extracted=solution_code(completion),
                details={"status": result.status, "detail": result.detail},
            )
            for (_, completion), result in zip(items, results, strict=True)
        ]


def solution_code(completion: str) -> str:
    """The code of the first python (or untagged) fenced block of the answer, else the answer as it is."""
    block = next((b for b in FENCED_BLOCK.finditer(completion) if b["tag"].lower() in PYTHON_TAGS), None)
    return block["code"] if block else completion


def build_program(target: dict[str, Any], completion: str) -> str:
    """The program that passes (exit 0, to its end) exactly when the completion solves the problem.

    Code that defines `def <entry_point>(` at the top level is the whole solution; it follows the prompt,
    whose imports and helper functions it may use (HumanEval/10, 32, 38, 50 have helpers) and whose
    body-less stub it replaces. Otherwise the code is the body continuing the prompt, as in the official
    harness. Then the problem's tests and `check(<entry_point>)`.
    """
    code, prompt, entry_point = solution_code(completion), target["prompt"], target["entry_point"]
    defines_function = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE)
    solution = f"{prompt}\n\n{code}" if defines_function else prompt + code
    return f"{NOT_MAIN}\n{solution}\n\n{target['test']}\n\ncheck({entry_point})\n"
