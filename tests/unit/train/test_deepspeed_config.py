"""Unit tests for hdpo_ray.train.deepspeed_config (pure functions; DeepSpeed itself is not needed)."""

from __future__ import annotations

import json
import math

import pytest

from hdpo_ray.config import ConfigError, TrainConfig, load_config
from hdpo_ray.train.deepspeed_config import build_deepspeed_config, check_user_json, fill_auto, lr_factor


@pytest.mark.parametrize("micro, ga, world", [(4, 1, 2), (2, 8, 4), (1, 1, 1), (3, 5, 7)])
def test_batch_arithmetic(micro, ga, world):
    train = TrainConfig(per_device_batch_size=micro, gradient_accumulation_steps=ga)
    ds = build_deepspeed_config(train, world_size=world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == ga
    assert ds["train_batch_size"] == micro * ga * world


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_keys(stage):
    ds = build_deepspeed_config(TrainConfig(zero_stage=stage, use_gpu=True), world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    if stage >= 2:
        assert zero["contiguous_gradients"] is True
        assert zero["overlap_comm"] is True  # on GPU
    else:
        assert "contiguous_gradients" not in zero and "overlap_comm" not in zero
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        assert not any(key.startswith("stage3_") for key in zero)


def test_overlap_comm_off_on_cpu():
    ds = build_deepspeed_config(TrainConfig(zero_stage=2), world_size=2)
    assert ds["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize(
    ("use_gpu", "precision", "bf16"),
    [
        (True, "auto", True),
        (False, "auto", False),
        (False, "bf16", True),
        (True, "fp32", False),
        (False, "fp32", False),
    ],
)
def test_precision_auto_is_bf16_on_gpu_and_fp32_on_cpu(use_gpu, precision, bf16):
    ds = build_deepspeed_config(TrainConfig(use_gpu=use_gpu, precision=precision), world_size=1)
    assert ds["bf16"] == {"enabled": bf16}
    assert "fp16" not in ds or not ds["fp16"].get("enabled")


@pytest.mark.parametrize("clip", [0.0, 0.5, 1.0])
def test_gradient_clipping(clip):
    ds = build_deepspeed_config(TrainConfig(max_grad_norm=clip), world_size=1)
    assert ds["gradient_clipping"] == clip


def test_built_config_is_json_serializable():
    ds = build_deepspeed_config(TrainConfig(zero_stage=3, use_gpu=True), world_size=2)
    assert json.loads(json.dumps(ds)) == ds
    assert ds["zero_allow_untested_optimizer"] is True


def test_user_json_auto_filled_explicit_kept(tmp_path):
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": 0.25,  # explicit: kept
        "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 1000},
        "bf16": {"enabled": "auto"},
        "custom_key": [1, 2, 3],
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    train = TrainConfig(
        per_device_batch_size=3,
        gradient_accumulation_steps=2,
        zero_stage=3,
        max_grad_norm=1.0,
        deepspeed_config=str(path),
        use_gpu=True,
    )
    ds = build_deepspeed_config(train, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.25
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["bf16"] == {"enabled": True}
    assert ds["custom_key"] == [1, 2, 3]
    # The user's JSON replaces the built one: keys the user did not give are not added.
    assert "zero_allow_untested_optimizer" not in ds
    assert "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]
    assert "auto" not in json.dumps(ds)


def test_user_json_auto_without_value_raises(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "optimizer": {"params": {"lr": "auto"}}}))
    with pytest.raises(ValueError, match="lr"):
        build_deepspeed_config(TrainConfig(deepspeed_config=str(path)), world_size=1)
    # The CLI's check before Ray starts says the same in one line naming the key.
    config = load_config(overrides=[f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=r"^train\.deepspeed_config: .*lr"):
        check_user_json(config)


def test_fill_auto_direct():
    built = {"a": 1, "sec": {"b": 2, "c": 3}, "d": 4}
    user = {"a": "auto", "sec": {"b": "auto", "c": 30}, "e": "x"}
    assert fill_auto(user, built) == {"a": 1, "sec": {"b": 2, "c": 30}, "e": "x"}
    with pytest.raises(ValueError):
        fill_auto({"missing": "auto"}, built)
    with pytest.raises(ValueError):  # a section the built config lacks has nothing to fill
        fill_auto({"other": {"b": "auto"}}, built)


# ---- learning-rate schedule -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear(kind):
    total, warmup = 100, 10
    for s in range(warmup):
        assert lr_factor(s, total_steps=total, warmup_steps=warmup, kind=kind) == pytest.approx((s + 1) / (warmup + 1))
    # Strictly increasing and never zero, so the first step already learns.
    factors = [lr_factor(s, total_steps=total, warmup_steps=warmup, kind=kind) for s in range(warmup)]
    assert all(b > a for a, b in zip(factors, factors[1:], strict=False))
    assert factors[0] > 0


def test_cosine():
    total, warmup = 110, 10
    f = lambda s: lr_factor(s, total_steps=total, warmup_steps=warmup, kind="cosine")  # noqa: E731
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + 50) == pytest.approx(0.5)
    assert f(total) == pytest.approx(0.0, abs=1e-12)
    assert f(total + 20) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    assert f(warmup + 25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    decay = [f(s) for s in range(warmup, total + 1)]
    assert all(b <= a for a, b in zip(decay, decay[1:], strict=False))


def test_linear():
    total, warmup = 110, 10
    f = lambda s: lr_factor(s, total_steps=total, warmup_steps=warmup, kind="linear")  # noqa: E731
    assert f(warmup) == pytest.approx(1.0)
    assert f(warmup + 50) == pytest.approx(0.5)
    assert f(warmup + 25) == pytest.approx(0.75)
    assert f(total) == pytest.approx(0.0, abs=1e-12)
    assert f(total + 5) == pytest.approx(0.0, abs=1e-12)


def test_constant():
    total, warmup = 50, 5
    for s in range(warmup, total + 3):
        assert lr_factor(s, total_steps=total, warmup_steps=warmup, kind="constant") == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_peak(kind):
    assert lr_factor(0, total_steps=20, warmup_steps=0, kind=kind) == pytest.approx(1.0)


def test_degenerate_total_equals_warmup():
    # No decay steps at all: no division by zero, and the factor stays in [0, 1].
    for kind in ("cosine", "linear", "constant"):
        value = lr_factor(5, total_steps=5, warmup_steps=5, kind=kind)
        assert 0.0 <= value <= 1.0
