"""One DeepSpeed rank: the policy wrapped for log-probs, its optimizer, schedule, checkpoints and export.

Runs inside a Ray Train worker; torch.distributed is already initialised by Ray (gloo on CPU, NCCL on
GPU) and DeepSpeed reuses that process group.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hdpo_ray.config import Config
from hdpo_ray.logprobs import CompletionStats, completion_logprobs
from hdpo_ray.train.deepspeed_config import build_deepspeed_config, lr_factor

CHECKPOINT_TAG = "engine"
STATE_FILE = "hdpo_state.json"
EXPORT_DIR = "final_model"


class PolicyLogprobs(torch.nn.Module):
    """The policy as DeepSpeed sees it: forward returns completion log-probs and entropy, not logits."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor, with_entropy: bool = True) -> CompletionStats:
        return completion_logprobs(self.model, input_ids, attention_mask, completion_mask, chunk_tokens=self.chunk_tokens, with_entropy=with_entropy)


def build_engine(config: Config, *, total_steps: int, world_size: int):
    """deepspeed.initialize over the policy with torch AdamW and a warmup+decay LambdaLR."""
    on_gpu = config.train.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    import deepspeed

    from hdpo_ray.models import load_causal_lm

    train = config.train
    model = load_causal_lm(config.model.name_or_path, dtype=torch.float32, trust_remote_code=config.model.trust_remote_code)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    policy = PolicyLogprobs(model, config.model.logprob_chunk_tokens)
    decay = [p for n, p in policy.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in policy.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=train.adam_betas, fused=on_gpu or None,
    )  # fmt: skip
    warmup = round(train.warmup_ratio * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup, kind=train.lr_scheduler))
    ds_config = build_deepspeed_config(train, world_size=world_size, on_gpu=on_gpu)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=schedule, config=ds_config, dist_init_required=False)
    return engine


def save_checkpoint(engine, directory: str, state: dict[str, Any]) -> None:
    """Every rank writes its DeepSpeed shards; rank 0 adds our loop state. Called by all ranks."""
    engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
    if engine.global_rank == 0:
        Path(directory, STATE_FILE).write_text(json.dumps(state))


def load_checkpoint(engine, directory: str) -> dict[str, Any]:
    """Restore engine (weights, optimizer, schedule, step) and return the loop state saved with it."""
    load_path, _ = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
    if load_path is None:
        raise RuntimeError(f"checkpoint {directory} has no DeepSpeed state under tag '{CHECKPOINT_TAG}'")
    return json.loads(Path(directory, STATE_FILE).read_text())


def export_model(engine, config: Config, directory: str) -> None:
    """Consolidated Hugging Face model + tokenizer (with its chat template) into directory/final_model.

    Called by all ranks: under ZeRO-3 the shards are gathered first, which is a collective.
    """
    import deepspeed

    from hdpo_ray.models import load_tokenizer

    model = engine.module.model
    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if config.train.zero_stage == 3 else nullcontext()
    with gather:
        if engine.global_rank == 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if engine.global_rank == 0:
        target = Path(directory, EXPORT_DIR)
        model.save_pretrained(target, state_dict=state, safe_serialization=True)
        load_tokenizer(config.model.name_or_path, config.data.chat_template, config.model.trust_remote_code).save_pretrained(target)
