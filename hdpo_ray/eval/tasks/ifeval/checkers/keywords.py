"""keywords:* and punctuation:no_comma: which words, letters and commas a response may or must contain.

Keywords are matched case-insensitively as the official code does, as unescaped regexes and, except for
forbidden words, without word boundaries: "keyword" "art" is found in "start".
"""

from __future__ import annotations

import re
from collections import Counter

from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, InstructionError, comparison, pattern


class KeywordsExist(Checker):
    """Include keywords {keywords} in the response."""

    instruction_id = "keywords:existence"

    def __init__(self, *, keywords: list[str]):
        self.keywords = [pattern(keyword, re.IGNORECASE) for keyword in sorted(keywords)]

    def follows(self, response: str) -> bool:
        return all(keyword.search(response) for keyword in self.keywords)


class KeywordFrequency(Checker):
    """In your response, the word {keyword} should appear {relation} {frequency} times."""

    instruction_id = "keywords:frequency"

    def __init__(self, *, keyword: str, frequency: int, relation: str):
        self.keyword = pattern(keyword.strip(), re.IGNORECASE)
        self.frequency = frequency
        self.compare = comparison(relation)

    def follows(self, response: str) -> bool:
        return self.compare(len(self.keyword.findall(response)), self.frequency)


class ForbiddenWords(Checker):
    """Do not include keywords {forbidden_words} in the response (whole words, any case)."""

    instruction_id = "keywords:forbidden_words"

    def __init__(self, *, forbidden_words: list[str]):
        self.words = [pattern(rf"\b{word}\b", re.IGNORECASE) for word in sorted(set(forbidden_words))]

    def follows(self, response: str) -> bool:
        return not any(word.search(response) for word in self.words)


class LetterFrequency(Checker):
    """In your response, the letter {letter} should appear {let_relation} {let_frequency} times (any case)."""

    instruction_id = "keywords:letter_frequency"

    def __init__(self, *, letter: str, let_frequency: int, let_relation: str):
        if len(letter) != 1:  # the official code would pick a random letter instead
            raise InstructionError(f"letter must be one character, not {letter!r}")
        self.letter = letter.strip().lower()
        self.frequency = let_frequency
        self.compare = comparison(let_relation)

    def follows(self, response: str) -> bool:
        return self.compare(Counter(response.lower())[self.letter], self.frequency)


class NoComma(Checker):
    """In your entire response, refrain from the use of any commas."""

    instruction_id = "punctuation:no_comma"

    def follows(self, response: str) -> bool:
        return "," not in response  # only the ASCII comma, as the official r"\," search


CHECKERS = (KeywordsExist, KeywordFrequency, ForbiddenWords, LetterFrequency, NoComma)
