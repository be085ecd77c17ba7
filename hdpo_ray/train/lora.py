"""LoRA on the policy (peft): adapters in, adapters out, and a merged model for export.

With `model.lora.rank > 0` only the adapter weights train; the base weights stay frozen, and the
reference pool keeps scoring the base model, so at step 1 the policy equals the reference exactly
(peft initialises B to zero). DeepSpeed checkpoints then hold only the adapters and their optimizer
state; the base comes from the model source again on restore.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hdpo_ray.config import LoraConfig


def peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_adapters(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """The same model class with LoRA layers injected and every other weight frozen.

    Returns peft's inner model rather than the PeftModel wrapper, so the log-prob function sees an ordinary
    causal LM (`base_model`, `get_output_embeddings()`); parameter names keep peft's layout.
    """
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora)).get_base_model()


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) weights by parameter name, copied to CPU."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def save_merged(
    base: torch.nn.Module, lora: LoraConfig, adapters: dict[str, torch.Tensor], model_dir: Path, adapter_dir: Path
) -> None:
    """Load trained adapters onto a fresh copy of the base; save them (peft layout) and the merged model.

    `adapters`: parameter name -> tensor, as `adapter_state` (or DeepSpeed's consolidated ZeRO-3 dict
    with frozen weights left out) names them.
    """
    from peft import get_peft_model

    wrapped = get_peft_model(base, peft_config(lora))
    missing, unexpected = wrapped.get_base_model().load_state_dict(adapters, strict=False)
    trainable = {name for name, p in wrapped.get_base_model().named_parameters() if p.requires_grad}
    if unexpected or trainable - set(adapters) or set(missing) & trainable:
        raise RuntimeError(
            f"trained adapters do not match the LoRA layout (unexpected {sorted(unexpected)[:3]}, missing "
            f"{sorted(trainable - set(adapters))[:3]})"
        )
    wrapped.save_pretrained(adapter_dir, safe_serialization=True)
    merged = wrapped.merge_and_unload()
    merged.save_pretrained(model_dir, safe_serialization=True)
