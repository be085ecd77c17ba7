"""Skipping non-finite work: the counting guard, and a real DeepSpeed engine (one CPU rank, gloo) that is
handed a NaN gradient and must not apply it."""

from __future__ import annotations

import pytest
import torch

from hdpo_ray.config import load_config
from hdpo_ray.train.loop import LoopState
from hdpo_ray.train.nonfinite import NonFiniteGuard, finite_everywhere, step_engine


def test_guard_counts_skips_and_stops_after_the_limit_in_a_row():
    state = LoopState(step=7)
    guard = NonFiniteGuard(state, limit=3)
    guard.skipped_batch()
    guard.skipped_step()
    assert not guard.exhausted and guard.metrics() == {"nonfinite/skipped_batches": 1.0, "nonfinite/skipped_steps": 1.0}
    guard.applied_step()  # an applied update breaks the streak, not the totals
    guard.skipped_batch()
    guard.skipped_batch()
    assert not guard.exhausted
    guard.skipped_step()
    assert guard.exhausted and state.skipped_batches == 3 and state.skipped_steps == 2
    message = guard.stop_message()
    assert (
        message.startswith("training stopped after step 7: 3 non-finite")
        and "3 micro-batches and 2 optimizer steps" in message
    )


def test_guard_keeps_totals_restored_from_a_checkpoint():
    saved = {"step": 4, "epoch": 0, "micro_batches_in_epoch": 3, "skipped_batches": 2, "skipped_steps": 1}
    state = LoopState.from_dict(saved)  # as hdpo_state.json holds it
    assert state.to_dict() == saved
    guard = NonFiniteGuard(state, limit=2)
    guard.skipped_batch()
    assert guard.metrics() == {"nonfinite/skipped_batches": 3.0, "nonfinite/skipped_steps": 1.0} and not guard.exhausted


def _batch():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    completion = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_nan_gradient_is_not_applied(one_rank_group, zero_stage):
    from hdpo_ray.train.engine import build_engine

    config = load_config(
        None,
        [
            f"train.zero_stage={zero_stage}",
            "train.per_device_batch_size=2",
            "train.num_workers=1",
            "train.warmup_ratio=0",
            "train.lr=1e-2",
        ],
    )
    engine = build_engine(config, total_steps=10, world_size=1)
    weight = engine.module.model.model.norm.weight
    before, lr_before = weight.detach().clone(), engine.get_lr()[0]

    hook = weight.register_hook(lambda grad: grad * float("nan"))  # a finite loss whose gradient is not
    loss = -engine(**_batch()).logps.mean()
    assert finite_everywhere(loss)
    engine.backward(loss)
    applied, _ = step_engine(engine, boundary=True, zero_stage=zero_stage)
    hook.remove()
    assert not applied and engine.skipped_steps == 1
    assert torch.equal(weight.detach(), before) and all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert engine.get_lr()[0] == lr_before  # the schedule stays
    assert engine.global_steps == (1 if zero_stage > 0 else 0)  # ZeRO counts its skipped step; ZeRO-0 takes it again

    loss = -engine(**_batch()).logps.mean()
    engine.backward(loss)
    applied, _ = step_engine(engine, boundary=True, zero_stage=zero_stage)
    assert applied and engine.skipped_steps == 1 and not torch.equal(weight.detach(), before)


def test_finite_everywhere_sees_nan_and_inf():
    assert finite_everywhere(torch.tensor(0.5))
    assert not finite_everywhere(torch.tensor(float("nan")))
    assert not finite_everywhere(torch.tensor(float("-inf")))
