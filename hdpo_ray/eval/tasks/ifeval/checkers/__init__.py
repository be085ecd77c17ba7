"""The IFEval instruction checkers by instruction id, and how one is built from a row's kwargs.

These are the 25 instructions of the official registry (instruction_following_eval/instructions_registry.py)
that occur in IFEval's input_data.jsonl; the registry's commented-out ones (keywords:key_sentences,
detectable_format:rephrase, ...) are never used by the data and are not ported.
"""

from __future__ import annotations

from typing import Any

from hdpo_ray.eval.tasks.ifeval.checkers import detectable, keywords, language, length, startend
from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, InstructionError

CHECKERS: dict[str, type[Checker]] = {
    cls.instruction_id: cls for module in (keywords, language, length, detectable, startend) for cls in module.CHECKERS
}


def build_checker(instruction_id: str, kwargs: dict[str, Any]) -> Checker:
    """The checker for one instruction of a row; raises InstructionError for an unknown id or unfitting kwargs.

    None-valued kwargs are dropped first, as lm-evaluation-harness does for the Hugging Face copy of the data,
    where every row carries every kwarg name, mostly None.
    """
    cls = CHECKERS.get(instruction_id)
    if cls is None:
        raise InstructionError(f"unknown instruction id {instruction_id!r}")
    given = {name: value for name, value in kwargs.items() if value is not None}
    # The constructors' annotations say what each kwarg must be (strings, as this package uses postponed annotations).
    annotations = getattr(cls.__init__, "__annotations__", {})
    for name, value in given.items():
        expected = _KINDS.get(annotations.get(name, ""))
        if expected is not None and not isinstance(value, expected):
            raise InstructionError(
                f"{instruction_id}: kwarg {name!r} is a {type(value).__name__}, expected {annotations[name]}"
            )
    try:
        return cls(**given)
    except TypeError as err:  # a missing or unexpected kwarg
        raise InstructionError(f"{instruction_id}: kwargs {given} do not fit ({err})") from None
    except InstructionError as err:  # a value the instruction cannot take
        raise InstructionError(f"{instruction_id}: {err}") from None


_KINDS = {"int": int, "str": str, "list[str]": list}


__all__ = ["CHECKERS", "Checker", "InstructionError", "build_checker"]
