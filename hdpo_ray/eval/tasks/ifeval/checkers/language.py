"""language:response_language and change_case:*: the response's language, letter case and capitalised words.

The language is langdetect's verdict on the whole response (seeded, see ifeval/text.py). When langdetect
finds nothing to judge by (digits, punctuation, emoji only) the official code counts the instruction as
followed, and so does this port.
"""

from __future__ import annotations

from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, comparison
from hdpo_ray.eval.tasks.ifeval.text import detect_language, word_tokenize


def _language_is(text: str, language: str) -> bool:
    detected = detect_language(text)
    return detected is None or detected == language


class ResponseLanguage(Checker):
    """Your ENTIRE response should be in {language} language, no other language is allowed."""

    instruction_id = "language:response_language"

    def __init__(self, *, language: str):
        self.language = language  # an ISO 639-1 code, as langdetect reports it ("zh-cn" for Chinese)

    def follows(self, response: str) -> bool:
        return _language_is(response, self.language)


class AllCapitalEnglish(Checker):
    """Your entire response should be in English, and in all capital letters."""

    instruction_id = "change_case:english_capital"

    def follows(self, response: str) -> bool:
        return response.isupper() and _language_is(response, "en")


class AllLowercaseEnglish(Checker):
    """Your entire response should be in English, and in all lowercase letters."""

    instruction_id = "change_case:english_lowercase"

    def follows(self, response: str) -> bool:
        return response.islower() and _language_is(response, "en")


class CapitalWordFrequency(Checker):
    """In your response, words with all capital letters should appear {capital_relation} {capital_frequency} times."""

    instruction_id = "change_case:capital_word_frequency"

    def __init__(self, *, capital_frequency: int, capital_relation: str):
        self.frequency = capital_frequency
        self.compare = comparison(capital_relation)

    def follows(self, response: str) -> bool:
        # nltk.word_tokenize's tokens, as the official: "STATE-OF-THE-ART" is one word, "DON'T" two, "I" one.
        capital_words = sum(1 for word in word_tokenize(response) if word.isupper())
        return self.compare(capital_words, self.frequency)


CHECKERS = (ResponseLanguage, AllCapitalEnglish, AllLowercaseEnglish, CapitalWordFrequency)
