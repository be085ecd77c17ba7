"""Chat template, completion mask and truncation exactness with the real GPT-2 tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import processors

from hdpo_ray.data.collate import collate_pairs
from hdpo_ray.data.template import TemplateError, encode_pair
from hdpo_ray.data.validate import normalize_pair
from hdpo_ray.models import DEFAULT_CHAT_TEMPLATE, load_tokenizer

PAIR = normalize_pair({"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5."})


@pytest.fixture(scope="module")
def gpt2():
    load_tokenizer.cache_clear()
    return load_tokenizer("hdpo-ray/tiny-llama")


@pytest.fixture
def bos_tokenizer():
    """GPT-2 turned into a tokenizer that adds a distinct BOS itself (like Llama's), plus
    a template that writes BOS too."""
    from transformers import AutoTokenizer

    from hdpo_ray.models import EMBEDDED_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tok.chat_template = "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    assert tok("a").input_ids[0] == bos
    return tok


def test_default_template_used_when_tokenizer_has_none(gpt2):
    assert gpt2.chat_template == DEFAULT_CHAT_TEMPLATE


def test_completion_mask_covers_exactly_the_completion_and_one_eos(gpt2):
    enc = encode_pair(PAIR, gpt2, max_length=512, max_prompt_length=256)
    eos = gpt2.eos_token_id
    assert not enc.truncated
    for ids, text in ((enc.chosen_ids, "It is 4."), (enc.rejected_ids, "It is 5.")):
        assert ids[-1] == eos and ids.count(eos) == 1
        assert gpt2.decode(ids[:-1]) == text
    assert gpt2.decode(enc.prompt_ids) == "<|user|>\nWhat is 2+2?<|endoftext|>\n<|assistant|>\n"
    batch = collate_pairs([enc.prompt_ids], [enc.chosen_ids], [enc.rejected_ids], gpt2.pad_token_id)
    masked = batch["input_ids"][0][batch["completion_mask"][0]].tolist()
    assert masked == enc.chosen_ids
    # prompt + completion tokenized apart equal the whole conversation tokenized at once
    full = gpt2.apply_chat_template(
        PAIR.prompt_messages() + [{"role": "assistant", "content": "It is 4."}], tokenize=False
    )
    assert (
        enc.prompt_ids + enc.chosen_ids
        == gpt2(full, add_special_tokens=False).input_ids[: len(enc.prompt_ids) + len(enc.chosen_ids)]
    )


def test_no_doubled_bos_when_template_and_tokenizer_both_add_one(bos_tokenizer):
    enc = encode_pair(PAIR, bos_tokenizer, max_length=512, max_prompt_length=256)
    bos = bos_tokenizer.bos_token_id
    assert enc.prompt_ids[0] == bos and enc.prompt_ids[1] != bos
    assert (enc.prompt_ids + enc.chosen_ids).count(bos) == 1


def test_bos_added_once_when_only_the_tokenizer_adds_it(bos_tokenizer):
    bos_tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # template without BOS
    enc = encode_pair(PAIR, bos_tokenizer, max_length=512, max_prompt_length=256)
    assert enc.prompt_ids.count(bos_tokenizer.bos_token_id) == 1 and enc.prompt_ids[0] == bos_tokenizer.bos_token_id


def test_truncation_cuts_prompt_from_left_then_completions_from_right(gpt2):
    long_pair = normalize_pair({"prompt": "word " * 100 + "END", "chosen": "yes " * 50, "rejected": "no"})
    full = encode_pair(long_pair, gpt2, max_length=10_000, max_prompt_length=5_000)
    enc = encode_pair(long_pair, gpt2, max_length=40, max_prompt_length=16)
    assert enc.truncated
    assert enc.prompt_ids == full.prompt_ids[-16:]  # the end of the prompt (with the assistant header) survives
    assert enc.chosen_ids == full.chosen_ids[: 40 - 16]
    assert enc.rejected_ids == full.rejected_ids  # short completion untouched
    assert len(enc.prompt_ids) + max(len(enc.chosen_ids), len(enc.rejected_ids)) == 40


def test_truncation_keeps_bos(bos_tokenizer):
    long_pair = normalize_pair({"prompt": "word " * 100, "chosen": "yes", "rejected": "no"})
    enc = encode_pair(long_pair, bos_tokenizer, max_length=30, max_prompt_length=12)
    assert (
        len(enc.prompt_ids) == 12
        and enc.prompt_ids[0] == bos_tokenizer.bos_token_id
        and enc.prompt_ids.count(bos_tokenizer.bos_token_id) == 1
    )


def test_short_pair_is_not_truncated(gpt2):
    enc = encode_pair(PAIR, gpt2, max_length=64, max_prompt_length=32)
    assert not enc.truncated


def test_template_that_breaks_the_prefix_rule_is_refused(gpt2):
    from transformers import AutoTokenizer

    from hdpo_ray.models import EMBEDDED_TOKENIZER

    tok = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER))
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    with pytest.raises(TemplateError, match="prefix"):
        encode_pair(PAIR, tok, max_length=64, max_prompt_length=32)
