"""IFEval: verifiable instructions ("no commas", "at least 300 words", "end with ..."), scored by rule.

Layout: google-research instruction_following_eval/data/input_data.jsonl, one {"key", "prompt",
"instruction_id_list", "kwargs"} per line, kwargs[i] being the arguments of instruction i. The Hugging
Face copy (google/IFEval) has the same fields, with every kwarg name in every row, mostly None.

Scoring follows evaluation_lib.py: an instruction is followed *strictly* when its checker accepts the
response (an empty or blank response follows nothing), and *loosely* when it accepts any of 8 variants:
the response, it without its first line, without its last line, without both, and each of these with
every "*" removed (so a "Sure, here it is:" first line or markdown bold does not fail it). A prompt is
followed when all its instructions are. `Score.correct` is the prompt-level strict verdict; `summarize`
gives the four published accuracies: prompt- and instruction-level, strict and loose.

Runs offline: see text.py for what replaces NLTK's downloadable punkt model, and the seeded langdetect.
"""

from __future__ import annotations

from typing import Any

from hdpo_ray.eval.tasks.base import Problem, Score, Task, TaskDataError, require
from hdpo_ray.eval.tasks.ifeval.checkers import CHECKERS, Checker, InstructionError, build_checker


class IFEval(Task):
    name = "ifeval"
    default_source = "embedded:eval/ifeval/input_data.jsonl.gz"
    summary_metrics = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")

    def problem(self, record: dict[str, Any], where: str, index: int) -> Problem:
        key = require(record, "key", where, int)
        prompt = require(record, "prompt", where)
        instruction_ids = require(record, "instruction_id_list", where, list)
        kwargs = require(record, "kwargs", where, list)
        if len(kwargs) != len(instruction_ids):
            raise TaskDataError(f"{where}: {len(instruction_ids)} instruction ids but {len(kwargs)} kwargs")
        target = {"instruction_id_list": instruction_ids, "kwargs": [_present(args) for args in kwargs]}
        try:
            _checkers(target)  # fail on the row now rather than when its first response is scored
        except InstructionError as err:
            raise TaskDataError(f"{where}: {err}") from None
        return Problem(id=f"ifeval/{key}", prompt=prompt, target=target)

    def score(self, problem: Problem, completion: str) -> Score:
        try:
            checkers = _checkers(problem.target)
        except InstructionError as err:
            raise TaskDataError(f"{problem.id}: {err}") from None
        strict = [follows(checker, completion) for checker in checkers]
        variants = loose_variants(completion)[1:]  # the first variant is the response itself: its verdict is `strict`
        loose = [
            verdict or any(follows(checker, variant) for variant in variants)
            for checker, verdict in zip(checkers, strict, strict=True)
        ]
        details = {"instruction_ids": list(problem.target["instruction_id_list"]), "strict": strict, "loose": loose}
        return Score(correct=all(strict), details=details)

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Prompt-level accuracy: the share of records that follow all their instructions; instruction-level:
        the share of all instructions of all records that are followed. Strict and loose each."""
        verdicts = [
            record["details"]
            for record in records
            if isinstance(record.get("details"), dict) and "strict" in record["details"]
        ]
        if not verdicts:
            return {}
        metrics = {}
        for mode in ("strict", "loose"):
            flat = [followed for verdict in verdicts for followed in verdict[mode]]
            metrics[f"prompt_{mode}"] = sum(all(verdict[mode]) for verdict in verdicts) / len(verdicts)
            metrics[f"instruction_{mode}"] = sum(flat) / len(flat) if flat else 0.0
        return metrics


def follows(checker: Checker, response: str) -> bool:
    """The official verdict: a blank response follows no instruction, whatever the checker would say."""
    return bool(response.strip()) and checker.follows(response)


def loose_variants(response: str) -> list[str]:
    """evaluation_lib's 8 loose variants of a response, in its order (the response itself first)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, response.replace("*", ""), without_first, without_last, without_both]
    return variants + [text.replace("*", "") for text in (without_first, without_last, without_both)]


def _present(kwargs: Any) -> Any:
    """A row's kwargs without the None values (a non-dict is kept for `build_checker` to reject)."""
    return {name: value for name, value in kwargs.items() if value is not None} if isinstance(kwargs, dict) else kwargs


def _checkers(target: dict[str, Any]) -> list[Checker]:
    checkers = []
    for instruction_id, kwargs in zip(target["instruction_id_list"], target["kwargs"], strict=True):
        if not isinstance(kwargs, dict):
            raise InstructionError(f"{instruction_id}: kwargs must be an object, not {type(kwargs).__name__}")
        checkers.append(build_checker(instruction_id, kwargs))
    return checkers


__all__ = ["CHECKERS", "IFEval", "follows", "loose_variants"]
