"""The train command's output-dir rule: one run per folder, never mixed with another config, never lost."""

from __future__ import annotations

import json

import pytest

from hdpo_ray.config import load_config
from hdpo_ray.pipeline import OutputDirError, claim_output_dir


def _run_dir(tmp_path, status: str, *overrides: str):
    out = tmp_path / "run"
    out.mkdir()
    config = load_config(overrides=[f"output_dir={out}", *overrides])
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    (out / "run.json").write_text(json.dumps({"name": "hdpo-x", "status": status}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "final").mkdir()
    (out / "prepared").mkdir()
    return out


def test_an_unfinished_run_continues_with_the_same_config_and_only_with_it(tmp_path):
    out = _run_dir(tmp_path, "running", "train.lr=0.001")
    same = load_config(overrides=[f"output_dir={out}", "train.lr=0.001", "logging.tensorboard=false"])
    claim_output_dir(same, str(out), resume=False, overwrite=False)  # where metrics also go is not the run
    other = load_config(overrides=[f"output_dir={out}", "train.lr=0.002"])
    expected = (
        r"unfinished run hdpo-x with another config \(train.lr: 0.001 there, 0.002 now\); continue it as it was "
        r"with `hdpo-ray train --resume "
    )
    with pytest.raises(OutputDirError, match=expected):
        claim_output_dir(other, str(out), resume=False, overwrite=False)
    claim_output_dir(other, str(out), resume=True, overwrite=False)  # --resume: its own config, overrides on top
    assert (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("status", "hint"), [("finished", ""), ("stopped", "continue it with `hdpo-ray train --resume ")]
)
def test_a_finished_or_stopped_run_is_kept_unless_overwrite(tmp_path, status, hint):
    out = _run_dir(tmp_path, status)
    config = load_config(overrides=[f"output_dir={out}"])
    with pytest.raises(OutputDirError, match=rf"holds run hdpo-x, {status}; {hint}") as err:
        claim_output_dir(config, str(out), resume=False, overwrite=False)
    assert str(err.value).endswith("set another output_dir, or add --overwrite to replace it")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
    claim_output_dir(config, str(out), resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["prepared"]  # the run's files gone, the content-keyed cache kept


def test_a_new_or_foreign_folder_is_free(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    claim_output_dir(load_config(overrides=[f"output_dir={tmp_path}"]), str(tmp_path), resume=False, overwrite=True)
    assert (tmp_path / "notes.txt").exists()


def test_a_cpu_reference_pool_beside_gpu_training_is_said_once():
    from hdpo_ray.pipeline import reference_device_warning

    assert reference_device_warning(load_config()) is None  # CPU training, CPU reference
    assert reference_device_warning(load_config(overrides=["train.use_gpu=true"])) is None  # a GPU each by default
    warning = reference_device_warning(load_config(overrides=["train.use_gpu=true", "reference.num_gpus_per_actor=0"]))
    assert "reference pool runs on CPU" in warning and "\n" not in warning
