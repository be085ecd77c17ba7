"""What every IFEval instruction checker is: built from one row's kwargs, asked about one response.

The official classes (instruction_following_eval/instructions.py) are built with `build_description(**kwargs)`
and fill any missing argument with a random value, which makes sense when generating prompts but not when
scoring them. Here the kwargs are the constructor's keyword-only arguments, so a row that lacks one, or
has one the instruction does not take, is rejected (`InstructionError`) instead of scored against a
random threshold. The normalisation of the values (strip, lower, sort) is the official one.
"""

from __future__ import annotations

import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar


class InstructionError(ValueError):
    """An instruction id that has no checker, or kwargs that do not fit it; the task adds the row."""


class Checker(ABC):
    instruction_id: ClassVar[str]  # "keywords:existence": the id in the data's instruction_id_list

    @abstractmethod
    def follows(self, response: str) -> bool:
        """Whether `response` follows the instruction (the official `check_following`)."""


# The official `_COMPARISON_RELATION`: "less than" is actual < threshold, "at least" is actual >= threshold.
RELATIONS: dict[str, Callable[[int, int], bool]] = {"less than": operator.lt, "at least": operator.ge}


def comparison(relation: str) -> Callable[[int, int], bool]:
    """The comparison named by a row's relation kwarg; anything else is an error, as in the official code."""
    if relation not in RELATIONS:
        raise InstructionError(f"relation must be one of {sorted(RELATIONS)}, not {relation!r}")
    return RELATIONS[relation]


def pattern(text: str, flags: int = 0) -> re.Pattern[str]:
    """The official code puts keywords into regexes unescaped; keep that, but reject one that is not a regex."""
    try:
        return re.compile(text, flags)
    except re.error as err:
        raise InstructionError(f"{text!r} is not a valid regular expression ({err})") from None
