"""The real `hdpo-ray` console script: bad input is one line and exit 2; tiny end-to-end runs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

FAST = ["data.max_length=64", "data.max_prompt_length=32", "train.per_device_batch_size=2", "reference.batch_size=8"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.alpha=0", "loss.alpha: Input should be greater than 0"),
        ("loss.alpha=-0.5", "loss.alpha: Input should be greater than 0"),
        ("loss.beta=0", "loss.beta: Input should be greater than 0"),
        ("train.nope=1", "unknown key 'train.nope'"),
        ("data.train_files=[/nonexistent/pairs.jsonl]", "data.train_files: /nonexistent/pairs.jsonl does not exist"),
        ("train.zero_stage=5", "train.zero_stage"),
    ],
)
def test_bad_values_exit_2_with_one_line(override, expected, tmp_path):
    result = run_cli(["train", f"output_dir={tmp_path}", override], ray_address=None, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("hdpo-ray: error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli(["train", "--config", str(tmp_path / "none.yaml")], ray_address=None, timeout=120)
    assert result.returncode == 2 and "none.yaml does not exist" in result.stderr


def test_help_config_lists_keys():
    result = run_cli(["train", "--help-config"], ray_address=None, timeout=120)
    assert result.returncode == 0 and "loss.alpha = 1.0: H-DPO entropy coefficient" in result.stdout


def test_python_dash_m_is_the_same_cli(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "hdpo_ray", "train", f"output_dir={tmp_path}", "loss.beta=-1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("hdpo-ray: error: loss.beta")


def test_invalid_row_stops_the_run_with_one_line(ray_address, tmp_path, small_pairs):
    lines = small_pairs.read_text().splitlines()
    lines.insert(5, json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}))
    small_pairs.write_text("\n".join(lines) + "\n")
    result = run_cli(["train", f"output_dir={tmp_path}/out", f"reference.cache_dir={tmp_path}/cache", f"data.train_files=[{small_pairs}]", "data.eval_files=[]", "data.on_invalid=error", *FAST], ray_address)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"hdpo-ray: error: {small_pairs}, line 6: identical_completions" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(Path(tmp_path, "out", "data_report.json").read_text())
    assert report["stopped"] and report["train"]["skipped_by_reason"] == {"identical_completions": 1} and report["train"]["valid"] == 24
    assert not Path(tmp_path, "out", "checkpoints").exists()  # stopped before training


def test_chat_template_failure_stops_the_run_with_one_line(ray_address, tmp_path, small_pairs):
    bad_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    result = run_cli(["train", f"output_dir={tmp_path}/out", f"reference.cache_dir={tmp_path}/cache", f"data.train_files=[{small_pairs}]", "data.eval_files=[]",
                      "data.on_invalid=error", f"data.chat_template={json.dumps(bad_template)}", *FAST], ray_address)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hdpo-ray: error:")]
    assert len(errors) == 1 and f"{small_pairs}, line 1: template_error" in errors[0] and "prefix" in errors[0]
    assert "Traceback" not in result.stderr


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files (TFRecord: length, crc, event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _trained_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The policy weights in the final DeepSpeed checkpoint, consolidated independently of our export."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="engine")
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_end_to_end(ray_address, tmp_path, small_pairs, zero_stage):
    out = tmp_path / "out"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(small_pairs.read_text().splitlines()[-6:]) + "\n")
    args = ["train", f"output_dir={out}", f"reference.cache_dir={tmp_path}/cache", f"data.train_files=[{small_pairs}]", f"data.eval_files=[{eval_file}]",
            "train.num_workers=2", f"train.zero_stage={zero_stage}", "train.epochs=3", "train.lr=2e-3", "train.logging_steps=1", "train.save_steps=5",
            "train.eval_steps=6", "train.keep_checkpoints=2", "train.warmup_ratio=0", f"model.gradient_checkpointing={zero_stage == 3}",
            # ZeRO-3: several LM-head chunks per micro-batch, recomputed in backward, ranks padding to the same count
            f"model.logprob_chunk_tokens={16 if zero_stage == 3 else 1024}", *FAST]  # fmt: skip
    result = run_cli(args, ray_address)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[hdpo-ray] step 2/18 | loss " in result.stdout + result.stderr  # the progress display

    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["read"] == 24 and report["train"]["valid"] == 24 and report["eval"]["valid"] == 6

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "entropy", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r and math.isfinite(r[key]) for r in train_rows), key
    assert any("eval/rewards/accuracies" in r for r in rows) and "eval/loss" in rows[-1]
    steps = [r["step"] for r in train_rows]
    assert steps == list(range(1, 19)), steps  # 24 pairs / 2 workers / 2 per batch = 6 steps per epoch, 3 epochs
    # Step 1's loss is taken before any update, with policy == reference and alpha = 1: exactly ln 2.
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # (float rounding of differently padded batches)
    losses = [r["loss"] for r in train_rows]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses  # the last epoch's loss is well below the first's
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["loss"]] == steps and [v for _, v in scalars["loss"]] == pytest.approx(losses, rel=1e-6)
    assert "eval/loss" in scalars and "rewards/accuracies" in scalars

    run_dirs = list((out / "checkpoints").iterdir())
    checkpoints = sorted(p for p in run_dirs[0].iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert len(run_dirs) == 1 and len(checkpoints) == 2  # keep_checkpoints=2 of the saves at 5, 10, 15, 18

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert AutoTokenizer.from_pretrained(out / "final").chat_template
    exported = load_file(out / "final" / "model.safetensors")
    trained = _trained_state(checkpoints[-1])
    for name, tensor in model.state_dict().items():
        if name in exported:
            assert torch.equal(exported[name], trained[name]), name
    from hdpo_ray.models import build_tiny_llama

    assert not torch.equal(exported["model.norm.weight"], build_tiny_llama().state_dict()["model.norm.weight"])  # it did train


def test_toy_command(tmp_path):
    result = run_cli(["toy", "--output-dir", str(tmp_path), "--alphas", "0.9,1.0"], ray_address=None, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "toy.json").read_text())["results"]
    assert [r["regime"] for r in rows] == ["single mode", "covers both"]
    bad = run_cli(["toy", "--alphas", "0,1"], ray_address=None, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("hdpo-ray: error: --alphas")
