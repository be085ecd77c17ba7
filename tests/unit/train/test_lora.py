"""LoRA on a real DeepSpeed engine (one CPU rank, gloo): only adapters train, checkpoints hold only them and
restore them, and the merged export equals W + (alpha/r) B A."""

from __future__ import annotations

import torch

from hdpo_ray.config import load_config
from hdpo_ray.models import build_tiny_llama
from hdpo_ray.train.engine import CHECKPOINT_TAG, build_engine, load_checkpoint, save_checkpoint
from hdpo_ray.train.lora import adapter_state, save_merged

LORA = [
    "model.name_or_path=hdpo-ray/tiny-llama",
    "model.lora.rank=4",
    "model.lora.alpha=16",
    "train.num_workers=1",
    "train.per_device_batch_size=2",
    "train.warmup_ratio=0",
    "train.lr=1e-2",
]


def _step(engine) -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    loss = -engine(
        input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    ).logps.mean()
    engine.backward(loss)
    engine.step()


def test_only_adapters_train_and_a_checkpoint_holds_and_restores_only_them(one_rank_group, tmp_path):
    config = load_config(None, [*LORA, "train.zero_stage=2"])
    engine = build_engine(config, total_steps=4, world_size=1)
    model = engine.module.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B on all seven linear layers of each of the 2 layers; not the LM head
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _step(engine)
    # frozen base
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    trained = adapter_state(model)
    assert any(t.abs().max() > 0 for n, t in trained.items() if ".lora_B." in n)  # B starts at zero and moved

    save_checkpoint(engine, str(tmp_path), {"step": 1})
    saved = torch.load(tmp_path / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    # Adapters only, no copy of the base -- except the tied LM head: DeepSpeed's frozen-weight filter goes by
    # named_parameters(), which names a tied matrix once (as the embedding), so its second name stays.
    assert {k.removeprefix("model.") for k in saved} == trainable | {"lm_head.weight"}

    fresh = build_engine(config, total_steps=4, world_size=1)
    assert load_checkpoint(fresh, str(tmp_path)) == {"step": 1}
    restored = adapter_state(fresh.module.model)
    assert all(torch.equal(restored[n], trained[n]) for n in trainable) and fresh.global_steps == 1
    _step(engine)
    _step(fresh)  # the optimizer state came back too: the next step is the same
    assert all(torch.equal(adapter_state(fresh.module.model)[n], adapter_state(model)[n]) for n in trainable)


def test_merged_export_is_base_plus_scaled_low_rank_update(tmp_path):
    config = load_config(None, LORA)
    adapters = {}
    for name, weight in build_tiny_llama().state_dict().items():
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            prefix = name.removesuffix(".weight")
            out_features, in_features = weight.shape
            adapters[f"{prefix}.lora_A.default.weight"] = torch.randn(4, in_features)
            adapters[f"{prefix}.lora_B.default.weight"] = torch.randn(out_features, 4)
    config.model.lora.target_modules = ["q_proj", "down_proj"]
    save_merged(build_tiny_llama(), config.model.lora, adapters, tmp_path / "model", tmp_path / "adapter")
    from safetensors.torch import load_file

    merged, base = load_file(tmp_path / "model" / "model.safetensors"), build_tiny_llama().state_dict()
    for name, weight in base.items():
        prefix = name.removesuffix(".weight")
        if f"{prefix}.lora_A.default.weight" in adapters:
            expected = (
                weight
                + (16 / 4) * adapters[f"{prefix}.lora_B.default.weight"] @ adapters[f"{prefix}.lora_A.default.weight"]
            )
            torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-5)
        elif name in merged:
            assert torch.equal(merged[name], weight), name
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
