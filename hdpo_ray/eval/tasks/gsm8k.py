"""GSM8K: grade-school math word problems, scored by the final number of a free-text solution.

Layout: openai/grade-school-math `test.jsonl`, one {"question", "answer"} per line, where the
answer is a worked solution ending in "#### N" (N may carry thousands commas: "#### 1,600").

The official scorer (grade_school_math/dataset.py) reads only the first "#### N" and compares the
strings. Chat models trained elsewhere often ignore that format, so `extract_answer` reads, in
order: the first "#### N" (as the official scorer does), else the last "the answer is N" /
"Answer: N", else the last number in the text. Numbers are compared exactly as fractions, so
"3.50" equals "3.5", "1,234" equals "1234" and "$18.00" equals "18".
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

from hdpo_ray.eval.tasks.base import Problem, Score, Task, TaskDataError, require

INSTRUCTION = (
    "Solve the problem step by step. At the end, write the final answer as a plain number on its own line, in the "
    'form "#### <number>".'
)

# One number in free text. Written out so that each accepted spelling is visible:
#   -5  −5  $18  -$5  $-5  €3.50  1,234  1,234.5  0.25  .5  7.  50%  5kg  18 dollars  **18**  1/2
# "7." and "5kg" need nothing special: the trailing period and the unit are simply not part of the match.
NUMBER = r"""
    (?<![\w./])                     # start of a token: not "x2", "v1.5", the "5" of "4.5", nor a denominator
    (?P<sign>[-−])?                 # ASCII hyphen-minus or the unicode minus sign, right before the number
    (?:[$€£¥₹]\s?)?                 # a currency sign; "-$5" is negative five dollars
    (?P<sign_after_currency>-)?     # "$-5"
    (?=\.?[0-9])                    # there must be a digit: the parts below are each optional
    (?P<integer>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]*)  # 1,234,567 (thousands commas) or 1234567
    (?:
        (?P<decimals>\.[0-9]+)      # 3.50
        |/(?P<denominator>[1-9][0-9]*)(?![0-9/])  # 1/2; not a date like 1/2/2024 (mixed numbers "2 1/2" are not read)
    )?
"""
NUMBER_RE = re.compile(NUMBER, re.VERBOSE)

# What may stand between a marker ("####", "the answer is") and its number: spaces, a line break,
# ":", markdown bold "**", "$", "(" and LaTeX "\boxed{" ("The final answer is $\boxed{18}$").
GAP = r"(?:\\boxed\{|[^\w.])*?"
HASHES_RE = re.compile(r"\#\#\#\#" + GAP + NUMBER, re.VERBOSE)  # "#" is escaped: it starts a comment in VERBOSE
ANSWER_IS_RE = re.compile(r"\banswer(?:\s+is)?\s*:?" + GAP + NUMBER, re.VERBOSE | re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final number of a free-text solution in canonical form ("1234", "-3.5", "1/3"); None when there is none.

    Order: the first "#### N" (the official GSM8K format), else the last "the answer is N" / "Answer: N"
    (case-insensitive), else the last number anywhere in the text.
    """
    # the first, as the official scorer: a model that runs on into a new "Question:" repeats it
    match = HASHES_RE.search(text)
    if match is None:
        match = _last(ANSWER_IS_RE.finditer(text))  # the last: a model that corrects itself states the answer again
    if match is None:
        match = _last(NUMBER_RE.finditer(text))
    return None if match is None else canonical(_value(match))


def canonical(value: Fraction) -> str:
    """The one string for a number: "18" for 18 and 18.00, "3.5" for 7/2, "-0.25", "1/3" when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    twos, fives, rest = 0, 0, value.denominator
    while rest % 2 == 0:
        twos, rest = twos + 1, rest // 2
    while rest % 5 == 0:
        fives, rest = fives + 1, rest // 5
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    # Only 2s and 5s below the line: a finite decimal with max(twos, fives) places, written out digit by digit
    # (Decimal division would round at its context precision).
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def _last(matches: Iterator[re.Match]) -> re.Match | None:
    found = list(matches)
    return found[-1] if found else None


def _value(match: re.Match) -> Fraction:
    """The exact value of a NUMBER match."""
    integer = match["integer"].replace(",", "") or "0"  # ".5" has no integer part
    if match["denominator"] is not None:
        value = Fraction(int(integer), int(match["denominator"]))
    else:
        value = Fraction(integer + (match["decimals"] or ""))
    negative = match["sign"] is not None or match["sign_after_currency"] is not None
    return -value if negative else value


class GSM8K(Task):
    name = "gsm8k"
    default_source = "embedded:eval/gsm8k/test.jsonl.gz"

    def problem(self, record: dict[str, Any], where: str, index: int) -> Problem:
        """{"question", "answer": "...#### N"} -> Problem(id "gsm8k/<index>",
        prompt=question + instruction, target=canonical N)."""
        question = require(record, "question", where)
        answer = require(record, "answer", where)
        _, hashes, gold = answer.rpartition("####")
        match = NUMBER_RE.fullmatch(gold.strip())
        if not hashes or match is None:
            raise TaskDataError(
                f"{where}: field 'answer' does not end in '#### <number>' (is this the task's official layout?)"
            )
        return Problem(id=f"gsm8k/{index}", prompt=f"{question}\n\n{INSTRUCTION}", target=canonical(_value(match)))

    def score(self, problem: Problem, completion: str) -> Score:
        """Correct when the extracted number equals the target exactly (as fractions, not floats)."""
        extracted = extract_answer(completion)
        correct = extracted is not None and Fraction(extracted) == Fraction(problem.target)
        return Score(correct=correct, extracted=extracted)
