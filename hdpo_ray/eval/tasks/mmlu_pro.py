"""MMLU-Pro: 12,032 ten-option multiple-choice questions over 14 subjects, answered with chain of thought.

Layout: TIGER-Lab/MMLU-Pro test split, one record per line with question_id, question, options
(up to 10 strings), answer (the gold letter), answer_index, cot_content, category, src.

Prompt and scorer follow the official repository TIGER-AI-Lab/MMLU-Pro, zero-shot:
- the header is `build_prompt` of evaluate_gemini_3-1_pro_0shot.py (the official 0-shot prompt);
- the question block is `format_cot_example(curr, including_answer=False)` of evaluate_from_local.py
  (the script for open models), which ends in "Answer: Let's think step by step.";
- options equal to "N/A" are dropped first, as the official `preprocess` does;
- `extract_answer` is the official extract_answer -> extract_again -> extract_final chain, after
  removing markdown "**" as evaluate_gemini_3-1_pro_0shot.py does.
One deviation: where no letter is found the official scripts count a seeded random guess; here it
is wrong, so that pass@k counts only answers the model gave.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from hdpo_ray.eval.tasks.base import Problem, Score, Task, TaskDataError, require

LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has at most ten options

HEADER = (
    "The following is a multiple choice question (with answer) about {category}. "
    'Think step by step and then output the answer in the format of "The answer is (X)" at the end.\n\n'
)

# The official fallbacks in order (evaluate_from_local.py / evaluate_from_api.py). All are case-sensitive
# in the letter: "the answer is c" is not read by the first two, and the third then takes the last standalone
# capital A-J anywhere, which may be the pronoun "I"; that is the official behaviour and we keep it.
ANSWER_IS_RE = re.compile(r"answer is \(?([A-J])\)?")  # extract_answer: the first "answer is (X)" / "answer is X"
# extract_again: no DOTALL, so the last "Answer: X" of the first line that has one
ANSWER_COLON_RE = re.compile(r".*[aA]nswer:\s*([A-J])")
# extract_final: r"\b[A-J]\b(?!.*\b[A-J]\b)" with DOTALL is the last of these
STANDALONE_LETTER_RE = re.compile(r"\b[A-J]\b")


def extract_answer(text: str) -> str | None:
    """The chosen letter "A".."J" of a chain-of-thought completion, None when it names none."""
    text = text.replace("**", "")  # "The answer is **(B)**" -> "The answer is (B)", as the official 0-shot script
    for pattern in (ANSWER_IS_RE, ANSWER_COLON_RE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    # The official lookahead regex rescans the rest of the text for
    # every letter (quadratic); the last findall hit is the same letter.
    letters = STANDALONE_LETTER_RE.findall(text)
    return letters[-1] if letters else None


def format_prompt(category: str, question: str, options: list[str]) -> str:
    """The user turn: official 0-shot header, then the question and lettered options, ending in the CoT cue."""
    lines = [HEADER.format(category=category) + "Question:", question, "Options:"]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    lines.append("Answer: Let's think step by step.")
    return "\n".join(lines)


class MMLUPro(Task):
    name = "mmlu_pro"
    default_source = "embedded:eval/mmlu_pro/test.jsonl.gz"
    summary_metrics = ("accuracy",)

    def problem(self, record: dict[str, Any], where: str, index: int) -> Problem:
        """One MMLU-Pro record -> Problem(id "mmlu_pro/<question_id>", target=gold letter, category=subject)."""
        question_id = require(record, "question_id", where, int)
        question = require(record, "question", where)
        category = require(record, "category", where)
        answer = require(record, "answer", where)
        raw_options = require(record, "options", where, list)
        if not all(isinstance(option, str) for option in raw_options):
            raise TaskDataError(f"{where}: field 'options' must be a list of strings")
        options = [option for option in raw_options if option != "N/A"]  # the official preprocess drops padding options
        if not 1 <= len(options) <= len(LETTERS):
            raise TaskDataError(f"{where}: field 'options' has {len(options)} options, expected 1 to {len(LETTERS)}")
        if len(answer) != 1 or answer not in LETTERS[: len(options)]:
            raise TaskDataError(
                f"{where}: field 'answer' is {answer!r}, expected one letter A..{LETTERS[len(options) - 1]} for "
                f"{len(options)} options"
            )
        return Problem(
            id=f"mmlu_pro/{question_id}",
            prompt=format_prompt(category, question, options),
            target=answer,
            category=category,
        )

    def score(self, problem: Problem, completion: str) -> Score:
        """Correct when the extracted letter is the gold letter; no letter found is wrong."""
        extracted = extract_answer(completion)
        return Score(correct=extracted == problem.target, extracted=extracted)

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """{"accuracy": mean correct, "accuracy/<category>": mean correct per category} over all scored samples."""
        if not records:
            return {}
        by_category: dict[str, list[bool]] = defaultdict(list)
        for record in records:
            by_category[record["category"]].append(bool(record["correct"]))
        summary = {"accuracy": sum(bool(record["correct"]) for record in records) / len(records)}
        for category in sorted(by_category):
            summary[f"accuracy/{category}"] = sum(by_category[category]) / len(by_category[category])
        return summary
