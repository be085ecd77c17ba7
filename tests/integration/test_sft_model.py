"""The embedded SFT model (hdpo-ray/tiny-llama-sft): shipped, built by hdpo_ray.sft from
SFT_RECIPE, and sharper than random init."""

from __future__ import annotations

import json
import math

import pytest

from hdpo_ray.config import EMBEDDED_MODEL, EMBEDDED_SFT_MODEL
from hdpo_ray.models import (
    EMBEDDED_SFT_DIR,
    build_tiny_llama,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
)
from hdpo_ray.sft import SFT_RECIPE, SUMMARY, build_tiny_sft, chosen_sequences, train_sft
from hdpo_ray.sweep.entropy import teacher_forced_entropy


@pytest.fixture(scope="module")
def sequences():
    return chosen_sequences(SFT_RECIPE)


def test_chosen_sequences_are_the_valid_pairs_templated_like_training(sequences):
    assert len(sequences) == 896  # 900 rows, 4 invalid (the same ones the DPO data report skips)
    assert all(len(p) + len(c) <= SFT_RECIPE["max_length"] for p, c in sequences)
    assert sum(c[-1] == 50256 for _, c in sequences) > 100  # untruncated completions end in EOS


def test_shipped_model_is_the_recipe_and_sharper_than_random_init(sequences):
    summary = json.loads((EMBEDDED_SFT_DIR / SUMMARY).read_text())
    assert summary["recipe"] == SFT_RECIPE and summary["steps"] == 3 * math.ceil(896 / 16)
    assert summary["first_loss"] == pytest.approx(math.log(50257), abs=0.1) and summary["last_loss"] < 7.0
    assert resolve_model(EMBEDDED_SFT_MODEL) == str(EMBEDDED_SFT_DIR)
    assert (
        model_fingerprint(EMBEDDED_SFT_MODEL)
        == model_fingerprint(str(EMBEDDED_SFT_DIR))
        != model_fingerprint(EMBEDDED_MODEL)
    )

    pad = load_tokenizer(EMBEDDED_SFT_MODEL).pad_token_id
    prompts, chosen = map(list, zip(*sequences[:16], strict=True))
    sft = teacher_forced_entropy(load_causal_lm(EMBEDDED_SFT_MODEL).eval(), prompts, chosen, pad)
    random_init = teacher_forced_entropy(build_tiny_llama().eval(), prompts, chosen, pad)
    assert random_init > 10.7 and sft < 8.0


def test_build_tiny_sft_trains_and_writes_a_loadable_model(tmp_path, sequences):
    recipe = {**SFT_RECIPE, "epochs": 2, "batch_size": 8}
    model = build_tiny_llama()
    losses = train_sft(model, sequences[:32], recipe, pad_id=50256)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3

    short = {**SFT_RECIPE, "data": "ultrafeedback/test_prefs-100.parquet", "epochs": 1, "batch_size": 32}
    summary = build_tiny_sft(tmp_path / "sft", short)
    assert summary["steps"] == math.ceil(98 / 32) and json.loads((tmp_path / "sft" / SUMMARY).read_text()) == summary
    assert not (tmp_path / "sft.partial").exists()
    reloaded = load_causal_lm(str(tmp_path / "sft"))
    assert load_tokenizer(str(tmp_path / "sft")).chat_template  # a complete Hugging Face directory
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in build_tiny_llama().parameters())
