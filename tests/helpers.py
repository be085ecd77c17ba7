"""Helpers the tests share: repository paths and data, free ports, the CLI and Ray commands, process cleanup,
TensorBoard event files. Fixtures live in the conftest.py files; what they and the tests share lives here."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_PORT = "6390"
DASHBOARD_PORT = "8275"  # the session head's dashboard and job server, on 127.0.0.1


def data_file(relative: str) -> Path:
    """A file of tests/data (see its SOURCES.md)."""
    return TEST_DATA / relative


def flat_pair_lines(n: int) -> list[str]:
    """The first n lines of the real UltraFeedback sample in the flat jsonl layout
    (prompt, chosen, rejected strings)."""
    with gzip.open(data_file("ultrafeedback/train_flat-1000.jsonl.gz"), "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()[:n]


def shipped_eval_bytes(relative: str) -> bytes:
    """An official eval file as the package ships it (hdpo_ray/assets/eval/<relative>.gz), decompressed."""
    from hdpo_ray.models import ASSETS

    return gzip.decompress((ASSETS / "eval" / f"{relative}.gz").read_bytes())


# SHA-256 of the official files the package's eval copies were made from, computed from the originals on 2026-12-02.
OFFICIAL_SHA256 = {
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "humaneval/HumanEval.jsonl": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    "ifeval/input_data.jsonl": "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
    "mmlu_pro/test.jsonl": "de3e252c059914c90d06ceebad992cf4721de926a3d32ce2d4e00c24a972dd79",
}


def ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def kill_processes(*marks: str) -> int:
    """SIGKILL every process (but this one) whose command line holds one of `marks`, and all their descendants
    (Ray renames its agents and workers, so their own command lines no longer say which cluster they serve).
    Returns how many."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(mark in " ".join(process.info["cmdline"] or []) for mark in marks):
            try:
                found |= {p.pid: p for p in [process, *process.children(recursive=True)]}
            except psutil.Error:
                pass
    for process in found.values():
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(found)


def hdpo_ray_exe() -> str:
    return shutil.which("hdpo-ray") or str(Path(sys.executable).with_name("hdpo-ray"))


def run_cli(
    args: list[str], ray_address: str | None, timeout: int = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """The real console script in a subprocess, joined to the session cluster when ray_address is given."""
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([hdpo_ray_exe(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them, read from the event files (TFRecord: length, crc,
    event proto, crc). A session-start event at step s (a writer opened with purge_step=s) drops the
    earlier files' values at step s or later, as TensorBoard does."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    scalars: dict[str, list[tuple[int, float]]] = {}
    # by name (time of creation first), as TensorBoard reads them
    for file in sorted(logdir.glob("events.out.tfevents.*")):
        data = file.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def naive_completion_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The textbook version (full logits, full log-softmax): the reference the tests and benchmark compare to. (N,)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    token_logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def real_pairs(model_id: str, count: int, max_length: int) -> tuple[list, int]:
    """The first `count` shipped UltraFeedback train pairs, tokenized with the model's chat template."""
    import pyarrow.parquet as pq

    from hdpo_ray.data.template import encode_pair
    from hdpo_ray.data.validate import normalize_pair
    from hdpo_ray.models import ASSETS, load_tokenizer

    tokenizer = load_tokenizer(model_id)
    rows = pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, count).to_pylist()
    return [
        encode_pair(normalize_pair(r), tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
        for r in rows
    ], tokenizer.pad_token_id


def assert_packed_equals_padded_on_real_pairs(model, pairs, pad_id) -> None:
    """fp32: every sequence's log-prob and entropy within 1e-5 (relative) of the padded
    layout's; some rows hold several sequences."""
    from hdpo_ray.data.collate import collate_pairs
    from hdpo_ray.logprobs import completion_logprobs

    columns = [[getattr(p, k) for p in pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    padded, packed = (collate_pairs(*columns, pad_id, packed=p) for p in (False, True))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # sequences shared rows
    with torch.no_grad():
        a, b = completion_logprobs(model, **padded), completion_logprobs(model, **packed)
    torch.testing.assert_close(b.logps, a.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.entropy_sum, a.entropy_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.num_tokens, b.num_tokens)
