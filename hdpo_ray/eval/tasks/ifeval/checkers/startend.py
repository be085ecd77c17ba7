"""startend:* and combination:*: how a response begins and ends, and responses made of parts.

All compare the stripped response, and all but quotation ignore case, as the official checkers do.
"""

from __future__ import annotations

from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, InstructionError


class EndPhrase(Checker):
    """Finish your response with this exact phrase {end_phrase}. No other words should follow this phrase."""

    instruction_id = "startend:end_checker"

    def __init__(self, *, end_phrase: str):
        self.end_phrase = end_phrase.strip().lower()

    def follows(self, response: str) -> bool:
        # Quotes around the whole response are dropped first: a response also asked to be quoted can still pass.
        return response.strip().strip('"').lower().endswith(self.end_phrase)


class Quotation(Checker):
    """Wrap your entire response with double quotation marks (the ASCII '"')."""

    instruction_id = "startend:quotation"

    def follows(self, response: str) -> bool:
        response = response.strip()
        return len(response) > 1 and response[0] == '"' and response[-1] == '"'


class RepeatPrompt(Checker):
    """First repeat the request word for word without change, then give your answer."""

    instruction_id = "combination:repeat_prompt"

    def __init__(self, *, prompt_to_repeat: str):
        if not prompt_to_repeat:
            raise InstructionError("prompt_to_repeat must be set")
        self.prompt = prompt_to_repeat.strip().lower()

    def follows(self, response: str) -> bool:
        return response.strip().lower().startswith(self.prompt)


class TwoResponses(Checker):
    """Give two different responses. Responses and only responses should be separated by 6 asterisk symbols: ******."""

    instruction_id = "combination:two_responses"

    def follows(self, response: str) -> bool:
        parts = response.split("******")
        # Blank pieces are allowed only before the first and after the last separator.
        if any(not part.strip() for part in parts[1:-1]):
            return False
        answers = [part for part in parts if part.strip()]
        return len(answers) == 2 and answers[0].strip() != answers[1].strip()


CHECKERS = (EndPhrase, Quotation, RepeatPrompt, TwoResponses)
