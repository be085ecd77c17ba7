"""The real `hdpo-ray` console script: bad input is one line and exit 2; non-finite losses; the toy.

The end-to-end training runs (ZeRO-2 and ZeRO-3, with failures and resume) are in test_jobs.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import flat_pair_lines, free_port, kill_processes, ray_cli, run_cli
from tests.integration.checks import FAST, metric_rows


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


def test_a_dead_cluster_address_exits_2_with_one_line(tmp_path):
    """RAY_ADDRESS of a head that is gone: named at once (Ray itself would retry it for minutes)."""
    dead = f"127.0.0.1:{free_port()}"
    result = run_cli(["train", f"output_dir={tmp_path}", "train.max_steps=1"], ray_address=dead, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"hdpo-ray: error: RAY_ADDRESS={dead}: no Ray cluster answers there; start it (`ray start "
        "--head`), point RAY_ADDRESS at a running one, or unset it to run on a local Ray"
    ], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_killed_head_that_ray_start_recorded_gives_a_local_ray_said_in_one_line(tmp_path, monkeypatch):
    """`ray start --head`, its processes killed, then `hdpo-ray train` without RAY_ADDRESS: Ray's record (under
    RAY_TMPDIR, a folder of this test, so the session's own head is left alone) still names the dead head. The
    driver says so in one line and runs on a local Ray (here up to its data's bad row) instead of retrying it."""
    import shutil
    import subprocess
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="hk", dir="/tmp"))  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port, head = free_port(), None
    start = [ray_cli(), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1"]
    try:
        subprocess.run(
            [*start, "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats"],
            check=True,
            capture_output=True,
            timeout=180,
            env=os.environ | {"RAY_AUTH_MODE": "disabled"},
        )
        head = (root / "ray" / "ray_current_cluster").read_text().strip()  # the GCS address, host as Ray writes it
        assert head.endswith(f":{port}")
        assert kill_processes(str(root), f"--address={head}") > 0  # the latter: Ray's client server
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text(flat_pair_lines(1)[0] + "\n" + '{"prompt": "p", "chosen": "c"}\n')
        args = ["train", f"output_dir={tmp_path / 'run'}", f"data.train_files=[{pairs}]"]
        result = run_cli([*args, f"reference.cache_dir={tmp_path / 'cache'}"], ray_address=None, timeout=300)
        assert result.returncode == 2 and f"{pairs}, line 2: missing_field" in result.stderr, result.stderr[-2000:]
        said = [line for line in result.stderr.splitlines() if head in line]
        assert len(said) == 1 and "does not answer: starting a local Ray instead" in said[0], result.stderr
        assert "Failed to connect to GCS" not in result.stderr + result.stdout
    finally:
        kill_processes(str(root), *([f"--address={head}"] if head else []))
        shutil.rmtree(root, ignore_errors=True)


def test_a_finished_run_is_kept_and_another_config_refused_unless_overwrite(ray_address, tmp_path):
    """A second `train` into a run's folder: refused before Ray starts, the run's files untouched, unless it is
    the same config into an unfinished run (taken up); with --overwrite the old run's files go first (here the
    new run then stops at its invalid data row)."""
    from hdpo_ray.config import load_config

    out, pairs = tmp_path / "run", tmp_path / "pairs.jsonl"
    pairs.write_text(flat_pair_lines(1)[0] + "\n" + '{"prompt": "p", "chosen": "c"}\n')
    args = ["train", f"output_dir={out}", f"data.train_files=[{pairs}]", f"reference.cache_dir={tmp_path / 'cache'}"]
    out.mkdir()
    saved = load_config(None, args[1:])  # what this command runs with: the built-in defaults and the overrides
    (out / "config.json").write_text(json.dumps(saved.to_dict()))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    for status, extra, expected in [
        ("finished", [], f"{out} holds run hdpo-x, finished; set another output_dir, or add --overwrite to replace it"),
        ("running", ["train.lr=0.5"], f"another config (train.lr: {saved.train.lr!r} there, 0.5 now); continue it as"),
    ]:
        (out / "run.json").write_text(json.dumps({"name": "hdpo-x", "status": status}))
        result = run_cli([*args, *extra], ray_address=None, timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
        assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.69}\n'
    # The same config into the unfinished run: taken up (it gets as far as the data, whose second row is bad)
    result = run_cli(args, ray_address, timeout=300)
    assert result.returncode == 2 and f"{pairs}, line 2: missing_field" in result.stderr, result.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.69}\n'
    result = run_cli([*args, "--overwrite"], ray_address, timeout=300)
    assert result.returncode == 2 and f"{pairs}, line 2: missing_field" in result.stderr, result.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists() and not (out / "run.json").exists()


def test_missing_config_file_exits_2(tmp_path):
    result = run_cli(["train", "--config", str(tmp_path / "none.yaml")], ray_address=None, timeout=120)
    assert result.returncode == 2 and "none.yaml does not exist" in result.stderr


def test_resume_needs_an_unfinished_run(tmp_path):
    result = run_cli(["train", "--resume", str(tmp_path / "nothing")], ray_address=None, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(
        f"hdpo-ray: error: --resume {tmp_path / 'nothing'}: no run there"
    ), result.stderr
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "run.json").write_text(json.dumps({"name": "hdpo-x", "status": "finished"}))
    result = run_cli(["train", "--resume", str(tmp_path)], ray_address=None, timeout=120)
    assert (
        result.returncode == 2
        and "run hdpo-x is finished, nothing to continue" in result.stderr
        and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize("command", ["train", "sweep", "eval"])
def test_help_config_shows_the_defaults_that_run(command):
    from hdpo_ray.config import flatten, load_config
    from hdpo_ray.config_reference import yaml_value

    result = run_cli([command, "--help-config"], ray_address=None, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("Built-in defaults (the embedded demo")
    assert "loss.alpha = 1.0    # float, > 0\n    H-DPO entropy coefficient" in result.stdout
    shown = dict(line.split("    # ")[0].split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
    ran = flatten(load_config().to_dict())  # what `hdpo-ray train` with nothing runs (null defaults resolved)
    differing = {key: (shown[key], yaml_value(value)) for key, value in ran.items() if shown[key] != yaml_value(value)}
    # only the keys whose null default is resolved from the rest of the config
    assert differing == {
        "data.eval_files": ("null", "['embedded:ultrafeedback/test_prefs-100.parquet']"),
        "data.on_invalid": ("null", "skip"),
        "eval.k": ("null", "[1, 2, 4]"),
        "eval.num_gpus_per_actor": ("null", "0.0"),
        "reference.num_gpus_per_actor": ("null", "0.0"),
    }, differing


def test_version_and_suggestions():
    from hdpo_ray import __version__

    assert run_cli(["--version"], ray_address=None, timeout=120).stdout.strip() == f"hdpo-ray {__version__}"
    typo = run_cli(["train", "loss.alhpa=0.9"], ray_address=None, timeout=120)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        (
            "hdpo-ray: error: unknown key 'loss.alhpa' (did you mean 'loss.alpha'? see `hdpo-ray train --help-config` "
            "for the keys)"
        )
    ]


def test_python_dash_m_is_the_same_cli(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "hdpo_ray", "train", f"output_dir={tmp_path}", "loss.beta=-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.startswith("hdpo-ray: error: loss.beta")


def test_invalid_row_stops_the_run_with_one_line(ray_address, tmp_path, small_pairs):
    lines = small_pairs.read_text().splitlines()
    lines.insert(5, json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}))
    small_pairs.write_text("\n".join(lines) + "\n")
    result = run_cli(
        [
            "train",
            f"output_dir={tmp_path}/out",
            f"reference.cache_dir={tmp_path}/cache",
            f"data.train_files=[{small_pairs}]",  # no --config, no data.on_invalid: your data's default is error
            *FAST,
        ],
        ray_address,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"hdpo-ray: error: {small_pairs}, line 6: identical_completions" in result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(Path(tmp_path, "out", "data_report.json").read_text())
    assert (
        report["stopped"]
        and report["train"]["skipped_by_reason"] == {"identical_completions": 1}
        and report["train"]["valid"] == 24
    )
    assert not Path(tmp_path, "out", "checkpoints").exists()  # stopped before training


def test_chat_template_failure_stops_the_run_with_one_line(ray_address, tmp_path, small_pairs):
    bad_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    result = run_cli(
        [
            "train",
            f"output_dir={tmp_path}/out",
            f"reference.cache_dir={tmp_path}/cache",
            f"data.train_files=[{small_pairs}]",
            "data.eval_files=[]",
            "data.on_invalid=error",
            f"data.chat_template={json.dumps(bad_template)}",
            *FAST,
        ],
        ray_address,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hdpo-ray: error:")]
    assert len(errors) == 1 and f"{small_pairs}, line 1: template_error" in errors[0] and "prefix" in errors[0]
    assert "Traceback" not in result.stderr


def test_toy_command(tmp_path):
    result = run_cli(["toy", "--output-dir", str(tmp_path), "--alphas", "0.9,1.0"], ray_address=None, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((tmp_path / "toy.json").read_text())["results"]
    assert [r["regime"] for r in rows] == ["single mode", "covers both"]
    bad = run_cli(["toy", "--alphas", "0,1"], ray_address=None, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("hdpo-ray: error: --alphas")


def test_a_failing_worker_still_shows_its_traceback_on_a_quiet_terminal(ray_address, tmp_path):
    """A policy whose weights file is corrupt: the reference (a sound model) scores the pairs, then the training
    worker fails loading the policy. Ray's output is not shown, but the worker's traceback is, and the status is 1."""
    import shutil

    from hdpo_ray.config import EMBEDDED_SFT_MODEL
    from hdpo_ray.models import ASSETS, load_tokenizer

    policy = tmp_path / "policy"
    load_tokenizer(EMBEDDED_SFT_MODEL, None, False).save_pretrained(policy)
    shutil.copy(ASSETS / "tiny-llama-sft" / "config.json", policy / "config.json")
    (policy / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    (tmp_path / "pairs.jsonl").write_text("".join(line + "\n" for line in flat_pair_lines(8)))
    result = run_cli(
        [
            "train",
            f"output_dir={tmp_path / 'out'}",
            f"reference.cache_dir={tmp_path / 'cache'}",
            f"data.train_files=[{tmp_path / 'pairs.jsonl'}]",
            f"model.name_or_path={policy}",
            f"model.ref_name_or_path={EMBEDDED_SFT_MODEL}",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            *FAST,
        ],
        ray_address,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "worker failure on rank 0 after step 0 (rank 0: SafetensorError" in result.stdout
    assert "Training failed due to worker errors" in result.stderr and "[Rank 0 Error Snippet]" in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "train/loop.py" in result.stderr and last.startswith("safetensors._safetensors_rust.SafetensorError"), last
    assert all(line.startswith("[hdpo-ray]") for line in result.stdout.splitlines() if line.strip()), result.stdout
    assert "pid=" not in result.stderr and "Loading weights" not in result.stderr


@pytest.mark.slow
def test_non_finite_losses_are_skipped_then_stop_the_run(ray_address, tmp_path):
    """A policy with one NaN embedding row (untied from its finite LM head): pairs that contain that token
    get a NaN loss. One such micro-batch is skipped and counted; three in a row stop the run with one line."""
    from hdpo_ray.config import EMBEDDED_SFT_MODEL
    from hdpo_ray.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_SFT_MODEL, None, False)
    marker = tokenizer.encode(" quokka", add_special_tokens=False)[-1]
    model = load_causal_lm(EMBEDDED_SFT_MODEL, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    with torch.no_grad():
        model.get_input_embeddings().weight[marker] = float("nan")
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")

    # One worker, 2 pairs per micro-batch: micro-batches 0, 1 clean; 2 poisoned; 3 clean; 4, 5, 6 poisoned.
    rows = [json.loads(line) for line in flat_pair_lines(14)]
    poisoned = {4, 5, 8, 9, 10, 11, 12, 13}
    for i, row in enumerate(rows):
        assert marker not in tokenizer.encode(row["prompt"] + row["chosen"] + row["rejected"])
        if i in poisoned:
            row["chosen"] = "A quokka. " + row["chosen"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    result = run_cli(
        [
            "train",
            f"output_dir={out}",
            f"reference.cache_dir={tmp_path}/cache",
            f"data.train_files=[{tmp_path}/pairs.jsonl]",
            "data.eval_files=[]",
            f"model.name_or_path={tmp_path}/policy",
            f"model.ref_name_or_path={EMBEDDED_SFT_MODEL}",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.logging_steps=1",
            "train.max_consecutive_nonfinite=3",
            *FAST,
        ],
        ray_address,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hdpo-ray: error:")]
    assert errors == [
        "hdpo-ray: error: training stopped after step 3: 3 non-finite losses or gradients in a row (4 micro-batches "
        "and 0 optimizer steps skipped in all); the latest checkpoint is kept: lower train.lr, check the data and the "
        "model, or raise train.max_consecutive_nonfinite, then continue with `hdpo-ray train --resume OUTPUT_DIR "
        "key=value ...`"
    ], errors
    assert "Traceback" not in result.stderr
    rows = metric_rows(out)
    assert [(r["step"], r["nonfinite/skipped_batches"]) for r in rows] == [(1, 0), (2, 0), (3, 1)]
    assert all(math.isfinite(r["loss"]) for r in rows)  # the skipped micro-batch is not in the averages
    assert json.loads((out / "run.json").read_text())["status"] == "stopped" and not (out / "final").exists()


LOCAL_MODE = """
import json, psutil, ray
from hdpo_ray.config import load_config
from hdpo_ray.runtime import init_ray
init_ray(load_config())
url = ray._private.worker.get_dashboard_url()  # host:port
port = int(url.rsplit(":", 1)[1])
listening = sorted({c.laddr.ip for c in psutil.net_connections("inet") \
if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
print(json.dumps({"dashboard": url, "listening": listening}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_mode_binds_the_dashboard_to_loopback_only(ray_address):
    """No RAY_ADDRESS and no `ray start` cluster to join (a fresh RAY_TMPDIR hides the session's): the driver
    starts its own Ray, whose dashboard listens on 127.0.0.1 and nowhere else."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as temp:  # short: Ray's socket paths live under it
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "RAY_TMPDIR": temp,
            "RAY_AUTH_MODE": "disabled",
        }
        result = subprocess.run(
            [sys.executable, "-c", LOCAL_MODE], capture_output=True, text=True, env=env, timeout=240
        )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["dashboard"].startswith("127.0.0.1:") and seen["listening"] == ["127.0.0.1"], seen
