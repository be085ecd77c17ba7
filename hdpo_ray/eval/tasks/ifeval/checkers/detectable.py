"""detectable_format:* and detectable_content:*: markdown structure, JSON, titles, placeholders, postscripts.

The regexes are the official ones, quirks included, because the published scores depend on them: a
"---" rule line counts as a bullet, "Section 2" in mid-sentence starts a section, a postscript marker
may stand anywhere (see each checker).
"""

from __future__ import annotations

import json
import re

from hdpo_ray.eval.tasks.ifeval.checkers.base import Checker, pattern

CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class ConstrainedResponse(Checker):
    """Answer with one of the following options: My answer is yes./no./maybe. (contained anywhere)"""

    instruction_id = "detectable_format:constrained_response"

    def follows(self, response: str) -> bool:
        response = response.strip()
        return any(option in response for option in CONSTRAINED_RESPONSE_OPTIONS)


class JsonFormat(Checker):
    """Entire output should be wrapped in JSON format. You can use markdown ticks such as ```."""

    instruction_id = "detectable_format:json_format"

    def follows(self, response: str) -> bool:
        # One fence may wrap it; removeprefix chained as in the official, so "```json" is tried before "```".
        value = response.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
        value = value.removeprefix("```").removesuffix("```").strip()
        try:
            json.loads(value)
        except ValueError:
            return False
        return True


class MultipleSections(Checker):
    """Your response must have {num_sections} sections, each starting with "{section_spliter} X"."""

    instruction_id = "detectable_format:multiple_sections"

    def __init__(self, *, section_spliter: str, num_sections: int):
        # Not anchored to a line start, and case-sensitive: "Section 2" anywhere in the text starts a section.
        self.splitter = pattern(r"\s?" + section_spliter.strip() + r"\s?\d+\s?")
        self.num_sections = num_sections

    def follows(self, response: str) -> bool:
        return len(self.splitter.split(response)) - 1 >= self.num_sections


class BulletLists(Checker):
    """Your answer must contain exactly {num_bullets} bullet points ("* " or "- " lines)."""

    instruction_id = "detectable_format:number_bullet_lists"

    def __init__(self, *, num_bullets: int):
        self.num_bullets = num_bullets

    def follows(self, response: str) -> bool:
        stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)  # "**Bold**" lines are not bullets
        dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)  # any line starting with "-", "---" too
        return len(stars) + len(dashes) == self.num_bullets


class HighlightedSections(Checker):
    """Highlight at least {num_highlights} sections in your answer with markdown, i.e. *highlighted section*."""

    instruction_id = "detectable_format:number_highlighted_sections"

    def __init__(self, *, num_highlights: int):
        self.num_highlights = num_highlights

    def follows(self, response: str) -> bool:
        singles = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
        doubles = [
            h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h.removeprefix("**").removesuffix("**").strip()
        ]
        # The official counts both lists, and "*x*" never matches inside "**x**" (its "*" pairs are empty), so a
        # bold "**x**" counts once, through `doubles`.
        return len(singles) + len(doubles) >= self.num_highlights


class Title(Checker):
    """Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."""

    instruction_id = "detectable_format:title"

    def follows(self, response: str) -> bool:
        return any(title.lstrip("<").rstrip(">").strip() for title in re.findall(r"<<[^\n]+>>", response))


class Placeholders(Checker):
    """The response must contain at least {num_placeholders} placeholders represented by
    square brackets, such as [address]."""

    instruction_id = "detectable_content:number_placeholders"

    def __init__(self, *, num_placeholders: int):
        self.num_placeholders = num_placeholders

    def follows(self, response: str) -> bool:
        return len(re.findall(r"\[.*?\]", response)) >= self.num_placeholders


class Postscript(Checker):
    """At the end of your response, please explicitly add a postscript starting with {postscript_marker}."""

    instruction_id = "detectable_content:postscript"

    def __init__(self, *, postscript_marker: str):
        marker = postscript_marker.strip()
        # The two markers of the data get patterns that allow a space after each dot ("P. S."); others are
        # used as they are. Anywhere in the text, at any line, case-insensitive (the response is lowered).
        known = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
        self.marker = pattern(known.get(marker, r"\s*" + marker.lower() + r".*$"), re.MULTILINE)

    def follows(self, response: str) -> bool:
        return bool(self.marker.findall(response.lower()))


CHECKERS = (
    ConstrainedResponse,
    JsonFormat,
    MultipleSections,
    BulletLists,
    HighlightedSections,
    Title,
    Placeholders,
    Postscript,
)
