"""Validate and normalize one raw preference row into a `Pair`.

Pure standard-library module: the tokenizing pass (hdpo_ray.data.template.encode_rows_fn) calls
`normalize_pair` per row; the reasons of `InvalidRow` are counted into data_report.json.

Accepted layouts (detected per row):

1. Conversational (HuggingFaceH4/ultrafeedback_binarized, TRL): `chosen` and
   `rejected` are lists of `{"role", "content"}` messages ending on the assistant.
2. Flat: `prompt`, `chosen`, `rejected` are all strings.
3. ShareGPT / LLaMA-Factory: `conversations` of `{"from", "value"}` turns plus
   `chosen` / `rejected` single `{"from": "gpt", "value"}` turns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})

REASONS: tuple[str, ...] = (
    "unreadable_file",  # set by the reader: the whole file could not be opened or decoded
    "not_json",
    "not_object",
    "missing_field",
    "null_field",
    "bad_type",
    "empty_content",
    "unknown_role",
    "no_assistant_turn",
    "not_ending_on_assistant",
    "prompt_mismatch",
    "identical_completions",
    "template_error",  # set by the tokenizer stage: the chat template raised on this row
)

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class InvalidRow(ValueError):
    """A row that cannot be used.

    `reason` is a short stable code from `REASONS` (a key in data_report.json);
    `detail` is a human sentence saying what is wrong and, where useful, what to do.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    """One chat turn with a role from `ROLES` and non-blank content."""

    role: str
    content: str


@dataclass(frozen=True)
class Pair:
    """A normalized preference pair.

    `prompt` is the conversation before the final assistant turn; it is never
    empty and ends on a user message. `chosen` / `rejected` are the final
    assistant texts, kept byte-for-byte (only emptiness is judged on `strip()`).
    """

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str

    def prompt_messages(self) -> list[dict[str, str]]:
        """Return the prompt as chat-template style `[{"role", "content"}, ...]`."""
        return [{"role": m.role, "content": m.content} for m in self.prompt]


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    """Fetch `obj[key]`, distinguishing absent (missing_field) from None (null_field)."""
    if key not in obj:
        raise InvalidRow("missing_field", f"field '{where}' is missing")
    value = obj[key]
    if value is None:
        raise InvalidRow("null_field", f"field '{where}' is null")
    return value


def _text(obj: Mapping[str, Any], key: str, where: str) -> str:
    """Fetch a required string that must not be blank; the string is returned unstripped."""
    value = _field(obj, key, where)
    if not isinstance(value, str):
        raise InvalidRow("bad_type", f"field '{where}' is {type(value).__name__}; expected a string")
    if not value.strip():
        raise InvalidRow("empty_content", f"field '{where}' is empty or whitespace only")
    return value


def _list(value: Any, where: str) -> list[Any]:
    # pyarrow yields lists, but tuples are an equally reasonable in-memory shape.
    if not isinstance(value, (list, tuple)):
        raise InvalidRow("bad_type", f"field '{where}' is {type(value).__name__}; expected a list of messages")
    return list(value)


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    """Validate a list of `{"role", "content"}` dicts; extra keys are tolerated."""
    out = []
    for i, raw in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        if not isinstance(raw, Mapping):
            raise InvalidRow("bad_type", f"{at} is {type(raw).__name__}; expected an object with role and content")
        role = _field(raw, "role", f"{at}.role")
        if not isinstance(role, str):
            raise InvalidRow("bad_type", f"{at}.role is {type(role).__name__}; expected a string")
        if role not in ROLES:
            raise InvalidRow("unknown_role", f"{at}.role is {role!r}; expected one of {', '.join(sorted(ROLES))}")
        out.append(Message(role, _text(raw, "content", f"{at}.content")))
    return tuple(out)


def _check_prompt(prompt: tuple[Message, ...], where: str) -> tuple[Message, ...]:
    # The model is trained to answer the prompt, so it must end on what the user asked.
    if not prompt:
        raise InvalidRow("bad_type", f"{where} is empty; it must end on a user message")
    if prompt[-1].role != "user":
        raise InvalidRow("bad_type", f"{where} ends on a {prompt[-1].role!r} message; it must end on a user message")
    return prompt


def _completion(value: Any, where: str) -> tuple[tuple[Message, ...], str]:
    """Split a completion conversation into (context, final assistant text)."""
    msgs = _messages(value, where)
    if not any(m.role == "assistant" for m in msgs):
        raise InvalidRow("no_assistant_turn", f"field '{where}' has no assistant message")
    if msgs[-1].role != "assistant":
        raise InvalidRow(
            "not_ending_on_assistant",
            f"field '{where}' ends on a {msgs[-1].role!r} message; the last message must be the assistant's answer",
        )
    return msgs[:-1], msgs[-1].content


def _conversational(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    ctx_c, chosen = _completion(row["chosen"], "chosen")
    ctx_r, rejected = _completion(_field(row, "rejected", "rejected"), "rejected")
    if ctx_c != ctx_r:
        raise InvalidRow(
            "prompt_mismatch", "fields 'chosen' and 'rejected' carry different conversations before the final answer"
        )
    if ctx_c:
        # The context inside the completions is authoritative; `prompt` is then redundant.
        return _check_prompt(ctx_c, "prompt (chosen[:-1])"), chosen, rejected
    prompt = _field(row, "prompt", "prompt")
    if isinstance(prompt, str):
        return (Message("user", _text(row, "prompt", "prompt")),), chosen, rejected
    return _check_prompt(_messages(prompt, "prompt"), "field 'prompt'"), chosen, rejected


def _flat(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    prompt = _text(row, "prompt", "prompt")
    return (Message("user", prompt),), _text(row, "chosen", "chosen"), _text(row, "rejected", "rejected")


def _sharegpt_turn(raw: Any, where: str) -> Message:
    if not isinstance(raw, Mapping):
        raise InvalidRow("bad_type", f"{where} is {type(raw).__name__}; expected an object with from and value")
    who = _field(raw, "from", f"{where}.from")
    if not isinstance(who, str):
        raise InvalidRow("bad_type", f"{where}.from is {type(who).__name__}; expected a string")
    if who not in _SHAREGPT_ROLES:
        raise InvalidRow(
            "unknown_role", f"{where}.from is {who!r}; expected one of {', '.join(sorted(_SHAREGPT_ROLES))}"
        )
    return Message(_SHAREGPT_ROLES[who], _text(raw, "value", f"{where}.value"))


def _sharegpt(row: Mapping[str, Any]) -> tuple[tuple[Message, ...], str, str]:
    raw = _list(_field(row, "conversations", "conversations"), "conversations")
    turns = tuple(_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(raw))
    if not turns or turns[-1].role != "user":
        raise InvalidRow("bad_type", "conversations must end on a human turn")
    texts = []
    for key in ("chosen", "rejected"):
        turn = _sharegpt_turn(_field(row, key, key), key)
        if turn.role != "assistant":
            raise InvalidRow("unknown_role", f"{key}.from must be 'gpt' for a completion")
        texts.append(turn.content)
    return turns, texts[0], texts[1]


def normalize_pair(row: object) -> Pair:
    """Normalize one raw preference row, or raise `InvalidRow` saying why not."""
    if not isinstance(row, Mapping):
        raise InvalidRow("not_object", f"row is {type(row).__name__}; expected a JSON object")
    if "conversations" in row:
        prompt, chosen, rejected = _sharegpt(row)
    else:
        first = _field(row, "chosen", "chosen")
        if isinstance(first, (list, tuple)):
            prompt, chosen, rejected = _conversational(row)
        elif isinstance(first, str):
            prompt, chosen, rejected = _flat(row)
        else:
            raise InvalidRow(
                "bad_type", f"field 'chosen' is {type(first).__name__}; expected a string or a list of messages"
            )
    if chosen == rejected:
        raise InvalidRow("identical_completions", "fields 'chosen' and 'rejected' have the same text; drop the row")
    return Pair(prompt, chosen, rejected)
