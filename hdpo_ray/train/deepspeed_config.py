"""DeepSpeed configuration and learning-rate schedule as pure functions (testable without DeepSpeed)."""

from __future__ import annotations

import json
import math
from typing import Any

from hdpo_ray.config import Config, ConfigError, TrainConfig


def build_deepspeed_config(train: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `train`: ZeRO stage, batch sizes, clipping, precision (uses_bf16).

    The optimizer and scheduler are torch objects handed to `deepspeed.initialize`, so they are not
    named here; `zero_allow_untested_optimizer` lets ZeRO wrap torch's AdamW (no CPUAdam build).
    A user JSON (train.deepspeed_config) replaces this, with its "auto" values filled from `train`.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 2:
        zero |= {"overlap_comm": train.use_gpu, "contiguous_gradients": True, "reduce_bucket_size": 5e8}
    if train.zero_stage == 3:
        # Gather full weights on save so the exported model is consolidated, not sharded.
        zero |= {"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 1e4}
    built = {
        "train_micro_batch_size_per_gpu": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.per_device_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": uses_bf16(train)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config is None:
        return built
    with open(train.deepspeed_config) as f:
        try:
            user = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{train.deepspeed_config} is not JSON ({err.msg} at line {err.lineno})") from None
    return fill_auto(user, built)


def uses_bf16(train: TrainConfig) -> bool:
    """train.precision, with auto resolved: bf16 on GPU, fp32 on CPU."""
    return train.precision == "bf16" or (train.precision == "auto" and train.use_gpu)


def fill_auto(user: dict[str, Any], built: dict[str, Any]) -> dict[str, Any]:
    """Replace "auto" values in a user's DeepSpeed JSON by the built ones (as Hugging Face Trainer does)."""
    filled = {}
    for key, value in user.items():
        if isinstance(value, dict):
            filled[key] = fill_auto(value, built.get(key, {}) if isinstance(built.get(key), dict) else {})
        elif value == "auto":
            if key not in built:
                raise ValueError(f"no value to fill in for '{key}: auto'")
            filled[key] = built[key]
        else:
            filled[key] = value
    return filled


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warmup, then decay."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress


def check_user_json(config: Config) -> None:
    """A train.deepspeed_config file that cannot make a DeepSpeed config fails the command before Ray starts,
    not every worker after the data pass (ConfigError)."""
    if config.train.deepspeed_config:
        try:
            build_deepspeed_config(config.train, world_size=config.train.num_workers)
        except (ValueError, OSError) as err:
            raise ConfigError(f"train.deepspeed_config: {str(err).splitlines()[0]}") from None
