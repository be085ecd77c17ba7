"""Chat template + tokenization + truncation: a Pair becomes prompt ids and two completion ids.

Exactness rules, each a bug seen in other DPO tools:
- The prompt is rendered with the generation prompt, the completion is the rest of the rendered
  conversation, and both are tokenized without special tokens, so a template that already writes BOS
  does not get a second one; a single BOS is added only where the tokenizer itself would add one.
- Each completion ends in exactly one EOS (text after the last EOS, such as a template's newline, is
  dropped; a missing EOS is appended), so the completion mask covers the content and one EOS.
- Truncation follows TRL / the alignment-handbook: if prompt + longest completion exceeds
  max_length, the prompt keeps its last max_prompt_length tokens (and its BOS), then completions
  are cut from the right to fit.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jinja2
import pyarrow as pa

from hdpo_ray.data.validate import InvalidRow, Pair, normalize_pair
from hdpo_ray.errors import UserError


class TemplateError(UserError, ValueError):
    """The chat template does not render a prompt as a prefix of its conversation."""


class EncodedPair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and bos != tokenizer.eos_token_id and tokenizer("a").input_ids[:1] == [bos]


def _completion_ids(tokenizer, prompt_text: str, messages: list[dict[str, str]], completion: str) -> list[int]:
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt_text):
        raise TemplateError(
            "the chat template does not render the prompt (with add_generation_prompt) as a prefix of the full "
            "conversation; set data.chat_template"
        )
    ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]
    else:
        ids.append(eos)
    return ids


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """The prompt rendered with the generation prompt, and its ids with exactly one BOS where the tokenizer adds one.

    Training and evaluation both encode prompts here, so a model is evaluated on the template it learnt.
    """
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(prompt_text, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and prompt[:1] != [bos]:
        prompt = [bos] + prompt
    while bos is not None and prompt[:2] == [bos, bos]:
        prompt = prompt[1:]
    return prompt_text, prompt


def fit_prompt(prompt_ids: list[int], max_length: int, bos_id: int | None) -> tuple[list[int], bool]:
    """Keep the last max_length tokens of a long prompt (and its BOS); returns (ids, truncated).
    Training's pair truncation and evaluation's long prompts both cut here."""
    if len(prompt_ids) <= max_length:
        return prompt_ids, False
    keep_bos = bos_id is not None and prompt_ids[:1] == [bos_id]
    return ([bos_id] if keep_bos else []) + prompt_ids[len(prompt_ids) - max_length + keep_bos :], True


def encode_pair(pair: Pair, tokenizer, *, max_length: int, max_prompt_length: int) -> EncodedPair:
    """Tokenize one pair with the tokenizer's chat template and truncate it to max_length."""
    messages = pair.prompt_messages()
    prompt_text, prompt = encode_prompt(tokenizer, messages)
    bos = tokenizer.bos_token_id
    chosen = _completion_ids(tokenizer, prompt_text, messages, pair.chosen)
    rejected = _completion_ids(tokenizer, prompt_text, messages, pair.rejected)

    truncated = len(prompt) + max(len(chosen), len(rejected)) > max_length
    if truncated:
        prompt, _ = fit_prompt(prompt, max_prompt_length, bos)
        room = max_length - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
    return EncodedPair(prompt, chosen, rejected, truncated)


ENCODED_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("skip_reason", pa.string()),
        ("skip_detail", pa.string()),
        ("truncated", pa.bool_()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
    ]
)


class EncodeRows:
    """Ray Data UDF: raw rows -> encoded rows; invalid rows are kept, marked with skip_reason.

    Marking instead of dropping is what lets data_report.json count every row exactly. The tokenizer
    is loaded once per worker process.
    """

    def __init__(
        self,
        tokenizer_name: str,
        chat_template: str | None,
        max_length: int,
        max_prompt_length: int,
        trust_remote_code: bool = False,
    ):
        from hdpo_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_name, chat_template, trust_remote_code)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length

    def _encode(self, raw: str | None, read_error: str | None) -> tuple[Any, ...]:
        try:
            if raw is None:
                reason = (
                    "unreadable_file" if read_error and read_error.startswith("file could not be read") else "not_json"
                )
                raise InvalidRow(reason, read_error or "unreadable record")
            encoded = encode_pair(
                normalize_pair(json.loads(raw)),
                self.tokenizer,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
            )
        except InvalidRow as err:
            return err.reason, err.detail, False, None, None, None
        except (TemplateError, jinja2.TemplateError) as err:  # e.g. a template that refuses system turns
            return "template_error", f"the chat template failed on this row: {err}", False, None, None, None
        return None, None, encoded.truncated, encoded.prompt_ids, encoded.chosen_ids, encoded.rejected_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [
            self._encode(raw, err)
            for raw, err in zip(batch["raw"].to_pylist(), batch["read_error"].to_pylist(), strict=True)
        ]
        if not results:
            return ENCODED_SCHEMA.empty_table()
        return pa.table(
            [batch["source_file"], batch["source_row"], *map(list, zip(*results, strict=True))], schema=ENCODED_SCHEMA
        )


def encode_rows_fn(
    tokenizer_name: str,
    chat_template: str | None,
    max_length: int,
    max_prompt_length: int,
    trust_remote_code: bool = False,
):
    """A plain function wrapping EncodeRows, cached per process, so Ray Data can run it as tasks."""
    key = (tokenizer_name, chat_template, max_length, max_prompt_length, trust_remote_code)

    def encode(batch: pa.Table) -> pa.Table:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _ENCODERS[key] = EncodeRows(*key)
        return encoder(batch)

    return encode


_ENCODERS: dict[tuple, EncodeRows] = {}
