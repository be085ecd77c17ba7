"""The embedded SFT model (hdpo-ray/tiny-llama-sft): built once from the recipe, cached, and sharper than random init."""

from __future__ import annotations

import json
import math

import pytest

from hdpo_ray.config import EMBEDDED_SFT_MODEL
from hdpo_ray.models import load_causal_lm, load_tokenizer, model_fingerprint, resolve_model
from hdpo_ray.sft import READY, SFT_RECIPE, chosen_sequences, ensure_tiny_sft
from hdpo_ray.sweep.entropy import teacher_forced_entropy


def test_chosen_sequences_are_the_valid_pairs_templated_like_training():
    sequences = chosen_sequences(SFT_RECIPE)
    assert len(sequences) == 896  # 900 rows, 4 invalid (the same ones the DPO data report skips)
    assert all(len(p) + len(c) <= SFT_RECIPE["max_length"] for p, c in sequences)
    assert sum(c[-1] == 50256 for _, c in sequences) > 100  # untruncated completions end in exactly one EOS


@pytest.mark.slow
def test_sft_model_is_built_once_and_is_sharper_than_random_init():
    path = ensure_tiny_sft()  # builds it on a fresh machine (about 90 s), else reads the cache
    assert resolve_model(EMBEDDED_SFT_MODEL) == str(path) and ensure_tiny_sft() == path
    summary = json.loads((path / READY).read_text())
    assert summary["steps"] == 56 and summary["last_loss"] < summary["first_loss"] - 2.0
    assert summary["first_loss"] == pytest.approx(math.log(50257), abs=0.1)  # random init: uniform over the vocabulary
    assert model_fingerprint(EMBEDDED_SFT_MODEL) == model_fingerprint(str(path))

    model, tokenizer = load_causal_lm(EMBEDDED_SFT_MODEL).eval(), load_tokenizer(EMBEDDED_SFT_MODEL)
    assert tokenizer.chat_template == load_tokenizer(str(path)).chat_template
    prompts, chosen = zip(*chosen_sequences(SFT_RECIPE)[:16])
    assert teacher_forced_entropy(model, list(prompts), list(chosen), tokenizer.pad_token_id) < 9.0  # random init: 10.8
