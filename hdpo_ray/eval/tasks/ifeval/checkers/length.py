"""length_constraints:*: how many words, sentences and paragraphs a response has.

Two different paragraph notions, as in the official code: number_paragraphs splits on the markdown
divider "***", nth_paragraph_first_word on blank lines ("\\n\\n").
"""

from __future__ import annotations

import re

from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, comparison
from hdpo_ray.eval.tasks.ifeval.text import count_sentences, count_words


class NumberOfWords(Checker):
    """Answer with {relation} {num_words} words (runs of word characters)."""

    instruction_id = "length_constraints:number_words"

    def __init__(self, *, num_words: int, relation: str):
        self.num_words = num_words
        self.compare = comparison(relation)

    def follows(self, response: str) -> bool:
        return self.compare(count_words(response), self.num_words)


class NumberOfSentences(Checker):
    """Your response should contain {relation} {num_sentences} sentences (punkt sentences, see ifeval/text.py)."""

    instruction_id = "length_constraints:number_sentences"

    def __init__(self, *, num_sentences: int, relation: str):
        self.num_sentences = num_sentences
        self.compare = comparison(relation)

    def follows(self, response: str) -> bool:
        return self.compare(count_sentences(response), self.num_sentences)


class NumberOfParagraphs(Checker):
    """There should be {num_paragraphs} paragraphs. Paragraphs are separated with the markdown divider: ***"""

    instruction_id = "length_constraints:number_paragraphs"

    def __init__(self, *, num_paragraphs: int):
        self.num_paragraphs = num_paragraphs

    def follows(self, response: str) -> bool:
        paragraphs = re.split(r"\s?\*\*\*\s?", response)
        # A divider at the very start or end leaves an empty piece that is not a paragraph; one between two
        # dividers is an empty paragraph, which fails the instruction outright.
        inner = paragraphs[1:-1]
        if any(not paragraph.strip() for paragraph in inner):
            return False
        count = len(paragraphs) - sum(1 for edge in {0, len(paragraphs) - 1} if not paragraphs[edge].strip())
        return count == self.num_paragraphs


class NthParagraphFirstWord(Checker):
    """There should be {num_paragraphs} paragraphs, separated by blank lines; paragraph
    {nth_paragraph} starts with {first_word}."""

    instruction_id = "length_constraints:nth_paragraph_first_word"

    def __init__(self, *, num_paragraphs: int, nth_paragraph: int, first_word: str):
        self.num_paragraphs = num_paragraphs
        self.nth_paragraph = nth_paragraph
        self.first_word = first_word.lower()

    def follows(self, response: str) -> bool:
        paragraphs = re.split(r"\n\n", response)
        # The official counts the non-blank paragraphs but indexes the nth among all pieces, blank ones included.
        count = sum(1 for paragraph in paragraphs if paragraph.strip())
        if not 1 <= self.nth_paragraph <= count:
            return False
        paragraph = paragraphs[self.nth_paragraph - 1].strip()
        if not paragraph:
            return False
        word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
        # The first word is the word's letters up to its first punctuation mark: "Summer," -> "summer".
        first_word = re.match(r"""[^.,?!'"]*""", word).group(0).lower()
        return count == self.num_paragraphs and first_word == self.first_word


CHECKERS = (NumberOfWords, NumberOfSentences, NumberOfParagraphs, NthParagraphFirstWord)
