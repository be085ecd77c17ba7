"""One DeepSpeed rank: the policy wrapped for log-probs, its optimizer, schedule, checkpoints and export.

Runs inside a Ray Train worker; torch.distributed is already initialised by Ray (gloo on CPU, NCCL on
GPU) and DeepSpeed reuses that process group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hdpo_ray.config import Config
from hdpo_ray.logprobs import CompletionStats, completion_logprobs
from hdpo_ray.train.deepspeed_config import build_deepspeed_config, lr_factor
from hdpo_ray.train.lora import adapter_state, add_adapters, save_merged

CHECKPOINT_TAG = "engine"
STATE_FILE = "hdpo_state.json"
EXPORT_DIR = "final_model"
ADAPTER_DIR = "final_adapter"  # with LoRA: the trained adapters (peft layout), beside the merged model


class PolicyLogprobs(torch.nn.Module):
    """The policy as DeepSpeed sees it: forward returns completion log-probs and entropy, not logits."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int, zero3: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.zero3 = zero3

    def forward(
        self, input_ids: torch.Tensor, completion_mask: torch.Tensor, with_entropy: bool = True, **layout: torch.Tensor
    ) -> CompletionStats:
        """layout: attention_mask (padded) or position_ids + sequence_index (packed), as collate_pairs returns them."""
        num_chunks = None
        if self.zero3 and dist.is_initialized():
            # Under ZeRO-3 each LM-head call gathers its weights collectively: every rank must make the
            # same number of calls, so all take the largest chunk count of any rank.
            needed = torch.tensor([-(-int(completion_mask[:, 1:].sum()) // self.chunk_tokens)], device=input_ids.device)
            dist.all_reduce(needed, op=dist.ReduceOp.MAX)
            num_chunks = int(needed)
        return completion_logprobs(
            self.model,
            input_ids,
            completion_mask=completion_mask,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
            num_chunks=num_chunks,
            **layout,
        )


def build_engine(config: Config, *, total_steps: int, world_size: int):
    """deepspeed.initialize over the policy with torch AdamW and a warmup+decay LambdaLR."""
    on_gpu = config.train.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    from hdpo_ray.models import load_causal_lm

    train = config.train
    ds_config = build_deepspeed_config(train, world_size=world_size)
    # Under ZeRO-3, transformers reads this object while loading and partitions the weights as they
    # arrive (zero.Init), so no rank ever holds the whole model; it must stay alive until initialize.
    zero3_loading = None
    if train.zero_stage == 3:
        # zero.Init inside from_pretrained asks DeepSpeed's comm layer for the world size: hand it the
        # process group Ray Train set up, or it sees one rank and rejects the batch sizes.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        zero3_loading = _hf_deepspeed_config(ds_config)
    model = load_causal_lm(
        config.model.name_or_path, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code
    )
    if config.model.lora.rank:
        model = add_adapters(model, config.model.lora)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = PolicyLogprobs(model, config.model.logprob_chunk_tokens, zero3=train.zero_stage == 3)
    # Weight decay on matrices only. Parameters that zero.Init partitioned while loading have an
    # empty local shape: their real one is ds_shape. Frozen (LoRA base) weights get no optimizer state.
    trainable = [p for p in policy.parameters() if p.requires_grad]
    decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An empty group (LoRA adapters are all matrices) would be dropped by ZeRO behind the scheduler's back.
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=train.lr, betas=train.adam_betas, fused=on_gpu or None
    )
    warmup = round(train.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup, kind=train.lr_scheduler)
    )
    engine, *_ = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False
    )
    del zero3_loading
    return engine


def _hf_deepspeed_config(ds_config: dict):
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _frozen_base(engine) -> bool:
    """LoRA: frozen base weights, which checkpoints leave out (they come from the model source)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def save_checkpoint(engine, directory: str, state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 adds our loop state. Called by all ranks."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=_frozen_base(engine))
    if engine.global_rank == 0:
        Path(directory, STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(engine, directory: str) -> dict[str, Any]:
    """Restore engine (weights, optimizer, schedule, step) and return the loop state saved with it."""
    load_path, _ = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=not _frozen_base(engine))
    if load_path is None:
        raise RuntimeError(f"checkpoint {directory} has no DeepSpeed state under tag '{CHECKPOINT_TAG}'")
    return json.loads(Path(directory, STATE_FILE).read_text())


def export_model(engine, config: Config, directory: str) -> None:
    """Consolidated Hugging Face model + tokenizer (with its chat template) into directory/final_model;
    with LoRA the merged model there and the adapters in directory/final_adapter.

    Called by all ranks: under ZeRO-3 the shards are gathered layer by layer onto rank 0 (a
    collective), so no rank needs room for the whole model at once.
    """
    from hdpo_ray.models import load_causal_lm, load_tokenizer

    model, lora = engine.module.model, config.model.lora
    if config.train.zero_stage == 3:
        # as HF Trainer uses
        gathered = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=bool(lora.rank))
        state = {k.removeprefix("model."): v for k, v in gathered.items()} if gathered is not None else None
    elif engine.global_rank == 0:
        state = (
            adapter_state(model)
            if lora.rank
            else {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        )
    if engine.global_rank != 0:
        return
    target = Path(directory, EXPORT_DIR)
    if lora.rank:
        base = load_causal_lm(
            config.model.name_or_path, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code
        )
        base.config.use_cache = True
        save_merged(base, lora, state, target, Path(directory, ADAPTER_DIR))
    else:
        model.config.use_cache = True  # training turned the KV cache off; generation wants it
        model.save_pretrained(target, state_dict=state, safe_serialization=True)
    load_tokenizer(
        config.model.name_or_path, config.data.chat_template, config.model.trust_remote_code, for_export=True
    ).save_pretrained(target)
