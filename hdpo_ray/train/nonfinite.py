"""Non-finite losses and gradients: skip the work, count it, stop when it keeps happening.

A micro-batch whose loss is NaN or infinite on any rank gets no backward pass on any rank (the ranks
agree through one all-reduce, so collectives stay in step). An optimizer step whose gradient norm is
not finite is not applied: ZeRO 1-3 skip it themselves (DeepSpeed's overflow check, fp32 and bf16)
and count it in `engine.skipped_steps`, leaving the learning-rate schedule where it was; such a step
still counts towards train.max_steps. ZeRO-0 has no such check: there the gradients are dropped
before engine.step(), and the step is taken again on the next micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: one all-reduce of a flag."""
    flag = torch.tensor([1.0 if torch.isfinite(loss.detach()).all() else 0.0], device=loss.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


@dataclass
class NonFiniteGuard:
    """Counts skips into `state` (the loop's LoopState, saved with every checkpoint) and says when `limit` came
    in a row: skipped micro-batches and skipped steps with no applied optimizer step between them (with gradient
    accumulation, non-finite micro-batches of one window count together). The streak itself starts again after
    a restore."""

    state: Any  # has step, skipped_batches and skipped_steps
    limit: int
    in_a_row: int = 0

    def skipped_batch(self) -> None:
        self.state.skipped_batches += 1
        self.in_a_row += 1

    def skipped_step(self) -> None:
        self.state.skipped_steps += 1
        self.in_a_row += 1

    def applied_step(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit

    def metrics(self) -> dict[str, float]:
        return {
            "nonfinite/skipped_batches": float(self.state.skipped_batches),
            "nonfinite/skipped_steps": float(self.state.skipped_steps),
        }

    def stop_message(self) -> str:
        return (
            f"training stopped after step {self.state.step}: {self.in_a_row} non-finite losses or gradients in a "
            f"row ({self.state.skipped_batches} micro-batches and {self.state.skipped_steps} optimizer steps "
            "skipped in all); the latest checkpoint is kept: lower train.lr, check the data and the model, or raise "
            "train.max_consecutive_nonfinite, then continue with `hdpo-ray train --resume OUTPUT_DIR key=value ...`"
        )


def step_engine(engine, *, boundary: bool, zero_stage: int) -> tuple[bool, float | None]:
    """engine.step() after a backward, unless ZeRO-0's gradient is not finite. Returns (update applied,
    ZeRO-0's gradient norm at a boundary or None). Between boundaries engine.step() only accumulates.

    ZeRO 1-3 check the gradient inside engine.step(): a skipped step still counts as a step there.
    ZeRO-0 has no such check, so its skip drops the gradients and leaves engine.step() out: the step
    does not happen (engine.global_steps stays) and the next micro-batch closes the window again.
    """
    skipped_before, norm = engine.skipped_steps, None
    if boundary and zero_stage == 0:  # DeepSpeed's plain fp32 path clips without keeping the norm, nor checks it
        norm = zero0_gradient_norm(engine.module.parameters())
        if not math.isfinite(norm):
            drop_gradients(engine.module.parameters())
            engine.skipped_steps += 1
            return False, norm
    engine.step()
    return engine.skipped_steps == skipped_before, norm


def zero0_gradient_norm(parameters) -> float:
    """ZeRO-0 keeps plain .grad tensors: their global L2 norm (NaN or inf when any gradient is)."""
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def drop_gradients(parameters) -> None:
    """ZeRO-0's skip: the window's gradients are discarded, nothing is applied."""
    for p in parameters:
        p.grad = None
