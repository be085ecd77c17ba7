"""The real chat template, exactly: SmolLM2-135M-Instruct's own tokenizer and ChatML template (with the default
system prompt the template inserts), on real UltraFeedback pairs shipped in the package."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from hdpo_ray.config import SMOLLM2_MODEL
from hdpo_ray.data.template import encode_pair, encode_prompt
from hdpo_ray.data.validate import normalize_pair
from hdpo_ray.models import ASSETS, load_tokenizer

SYSTEM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(SMOLLM2_MODEL)


@pytest.fixture(scope="module")
def pairs():
    rows = [
        r
        for r in pq.read_table(ASSETS / "ultrafeedback" / "test_prefs-100.parquet").to_pylist()[:14]
        if r["chosen"] != r["rejected"]
    ][:12]
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime."}]
    with_system = normalize_pair(
        {
            "chosen": [*turns, {"role": "assistant", "content": "2"}],
            "rejected": [*turns, {"role": "assistant", "content": "Nine."}],
        }
    )
    assert len(rows) == 12
    return [normalize_pair(r) for r in rows] + [with_system]


def test_smollm2_template_is_chatml_with_a_default_system_prompt(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and SYSTEM_DEFAULT in tokenizer.chat_template
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id  # the tokenizer adds no BOS of its own


def test_completion_mask_covers_exactly_the_answer_and_its_im_end(tokenizer, pairs):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pair in pairs:
        encoded = encode_pair(pair, tokenizer, max_length=10**6, max_prompt_length=10**6 - 1)
        for completion, ids in ((pair.chosen, encoded.chosen_ids), (pair.rejected, encoded.rejected_ids)):
            assert ids[-1] == im_end and ids.count(im_end) == 1
            # the content and its end: no role header, no newline
            assert tokenizer.decode(ids) == completion + "<|im_end|>"
            assert "<|im_start|>" not in tokenizer.decode(ids) and SYSTEM_DEFAULT not in tokenizer.decode(ids)


def test_prompt_ids_are_the_prefix_of_the_whole_conversation(tokenizer, pairs):
    for pair in pairs:
        encoded = encode_pair(pair, tokenizer, max_length=10**6, max_prompt_length=10**6 - 1)
        messages = pair.prompt_messages()
        for completion, ids in ((pair.chosen, encoded.chosen_ids), (pair.rejected, encoded.rejected_ids)):
            whole = tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": completion}], tokenize=True, return_dict=True
            )["input_ids"]
            # no merge across the boundary
            assert whole[: len(encoded.prompt_ids) + len(ids)] == encoded.prompt_ids + ids
            # only the template's newline is left out
            assert tokenizer.decode(whole[len(encoded.prompt_ids) + len(ids) :]) == "\n"
        prompt_text = tokenizer.decode(encoded.prompt_ids)
        system_given = messages[0]["role"] == "system"
        assert (SYSTEM_DEFAULT in prompt_text) != system_given and prompt_text.endswith("<|im_start|>assistant\n")
        # one per turn: no doubled BOS
        assert prompt_text.count("<|im_start|>") == len(messages) + (not system_given) + 1
        assert encoded.prompt_ids[:2] != [tokenizer.bos_token_id] * 2


def test_eval_prompt_is_what_apply_chat_template_gives(tokenizer, pairs):
    for pair in pairs:
        messages = pair.prompt_messages()
        _, prompt = encode_prompt(tokenizer, messages)
        assert (
            prompt
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
