"""What every evaluation task provides: problems to prompt with, and a scorer for one completion.

A task reads its official file layout (local file, `embedded:eval/...` shipped in the package, a URI,
or a hub dataset id `owner/name:split`), turns each record into a `Problem` whose `prompt` is the user
turn (the runner sends it through the same chat template as training), and scores a completion into a
`Score`. `Score.correct` is what pass@k counts; `summarize` adds the task's own metrics (IFEval's four
accuracies, MMLU-Pro's per-category accuracy) over all scored samples.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hdpo_ray.errors import UserError


class TaskDataError(UserError, ValueError):
    """A task's data source is missing, unreadable or lacks a field; one line naming the file and row."""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within the task: "HumanEval/0", "gsm8k/12", "ifeval/1000", "mmlu_pro/70"
    prompt: str  # the user turn, sent through the chat template
    target: Any  # what the scorer needs (JSON-serialisable): a number, a letter, test code, instructions
    category: str = ""  # MMLU-Pro's subject; "" for the others


@dataclass
class Score:
    correct: bool  # what pass@k counts
    extracted: Any = None  # the answer read from the completion; None when none was found
    details: dict[str, Any] = field(default_factory=dict)  # task-specific, kept in samples.jsonl


class Task(ABC):
    name: str
    default_source: str  # the copy shipped in the package: "embedded:eval/<task>/<file>"
    summary_metrics: tuple[str, ...] = ()  # the keys `summarize` always returns (a sweep may select on them)

    def load(self, source: str | None = None, limit: int | None = None) -> list[Problem]:
        """The first `limit` problems (all when None) of `source` (default: the shipped copy), in file order."""
        problems, seen = [], set()
        for index, (where, record) in enumerate(read_records(source or self.default_source)):
            if limit is not None and index >= limit:
                break
            problem = self.problem(record, where, index)
            if problem.id in seen:  # samples are grouped by id: a repeat would merge two problems' samples
                raise TaskDataError(f"{where}: problem id {problem.id} appears twice")
            seen.add(problem.id)
            problems.append(problem)
        if not problems:
            raise TaskDataError(f"{self.name}: {source or self.default_source} holds no problems")
        return problems

    @abstractmethod
    def problem(self, record: dict[str, Any], where: str, index: int) -> Problem:
        """Record number `index` (0-based) of the official layout -> Problem; a missing
        field raises TaskDataError naming `where`."""

    @abstractmethod
    def score(self, problem: Problem, completion: str) -> Score:
        """Score one completion (the generated text only, without the prompt)."""

    def score_many(self, items: list[tuple[Problem, str]]) -> list[Score]:
        """Score many completions; tasks that run code override this to run them in parallel."""
        return [self.score(problem, completion) for problem, completion in items]

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Task-specific metrics over samples.jsonl records (keys: problem_id, category, correct, details)."""
        return {}


def require(record: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[key] when present and of `kind`; otherwise one TaskDataError line naming the row and the field."""
    value = record.get(key)
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise TaskDataError(
            f"{where}: field '{key}' is {found}, expected {names} (is this the task's official layout?)"
        )
    return value


def read_records(source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every record of a task source, where = "file, line N"; raises TaskDataError."""
    from hdpo_ray.config import looks_like_hub_id
    from hdpo_ray.data.read import SourceError, expand_sources, file_records, row_name

    try:
        files = expand_sources([source])
    except SourceError as err:
        raise TaskDataError(str(err)) from None
    folders = sorted({file.rsplit("/", 1)[0] for file in files})
    if looks_like_hub_id(source) and len(folders) > 1:  # e.g. openai/gsm8k:test holds main/ and socratic/
        raise TaskDataError(
            f"{source} matches the split in {len(folders)} folders ({', '.join(folders)}): give one, e.g. {folders[0]}/"
        )
    for file in files:
        try:
            for row, raw, error in file_records(file):
                where = row_name(file, row)
                if error is not None:
                    raise TaskDataError(f"{where}: {error}")
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise TaskDataError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
                yield where, record
        except (OSError, EOFError) as err:
            raise TaskDataError(f"{file} could not be read ({type(err).__name__}: {err})") from None
