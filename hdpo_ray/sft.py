"""The embedded SFT model: the tiny Llama fine-tuned briefly on the embedded data's chosen responses.

Zephyr's DPO starts from an SFT model, and so does the embedded default (`hdpo-ray/tiny-llama-sft`).
A random-init reference predicts every token with near-uniform probability (entropy ln 50257 = 10.8
nats per token), so there is no distribution for alpha to sharpen or flatten; one SFT epoch brings
the held-out chosen responses to ~8 nats per token.

The model is built on first use (about 90 s on 2 CPU cores), deterministically from SFT_RECIPE, and
cached under HDPO_RAY_MODEL_CACHE (default ~/.cache/hdpo_ray/models) as a plain Hugging Face model
directory; a file lock keeps concurrent processes from building it twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("hdpo_ray")

SFT_RECIPE = {
    "version": 1, "data": "ultrafeedback/train_prefs-900.parquet", "max_length": 192, "max_prompt_length": 64,
    "epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "seed": 0, "torch_threads": 2,
}  # fmt: skip
READY = "sft.json"  # written last: a directory without it is an interrupted build


def model_cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("HDPO_RAY_MODEL_CACHE", "~/.cache/hdpo_ray/models")))


def sft_model_dir(recipe: dict = SFT_RECIPE) -> Path:
    from hdpo_ray.models import TINY_LLAMA, TINY_LLAMA_SEED

    key = hashlib.blake2b(json.dumps([recipe, TINY_LLAMA, TINY_LLAMA_SEED], sort_keys=True).encode(), digest_size=8).hexdigest()
    return model_cache_root() / f"tiny-llama-sft-{key}"


def ensure_tiny_sft(recipe: dict = SFT_RECIPE) -> Path:
    """The SFT model's directory, built first if no complete copy is cached."""
    target = sft_model_dir(recipe)
    if (target / READY).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use its copy
        if not (target / READY).exists():
            _build(recipe, target)
    return target


def chosen_sequences(recipe: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, chosen ids) of every valid pair in the recipe's embedded file, templated and truncated as for training."""
    from hdpo_ray.config import EMBEDDED_MODEL
    from hdpo_ray.data.read import _records, expand_sources
    from hdpo_ray.data.template import encode_pair
    from hdpo_ray.data.validate import InvalidRow, normalize_pair
    from hdpo_ray.models import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    (path,) = expand_sources([f"embedded:{recipe['data']}"])
    sequences = []
    for _, raw, _ in _records(path):
        try:
            pair = normalize_pair(json.loads(raw))
        except InvalidRow:
            continue  # the same rows the DPO data report skips
        encoded = encode_pair(pair, tokenizer, max_length=recipe["max_length"], max_prompt_length=recipe["max_prompt_length"])
        sequences.append((encoded.prompt_ids, encoded.chosen_ids))
    return sequences


def train_sft(model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]], recipe: dict, pad_id: int) -> list[float]:
    """Mean token NLL on the completions, AdamW with warmup + cosine; returns the per-step losses."""
    from hdpo_ray.data.collate import collate_completions
    from hdpo_ray.logprobs import completion_logprobs
    from hdpo_ray.train.deepspeed_config import lr_factor

    generator = torch.Generator().manual_seed(recipe["seed"])
    batch_size = recipe["batch_size"]
    steps = recipe["epochs"] * math.ceil(len(sequences) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    warmup = round(recipe["warmup_ratio"] * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps=steps, warmup_steps=warmup, kind="cosine"))
    model.train()
    losses = []
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            prompts, completions = zip(*(sequences[i] for i in order[start : start + batch_size]))
            batch = collate_completions(prompts, completions, pad_id)
            stats = completion_logprobs(model, **batch, with_entropy=False)
            loss = -stats.logps.sum() / stats.num_tokens.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    return losses


def _build(recipe: dict, target: Path) -> None:
    from hdpo_ray.config import EMBEDDED_MODEL
    from hdpo_ray.models import build_tiny_llama, load_tokenizer

    started = time.perf_counter()
    log.info("building the embedded SFT model (one epoch on the embedded chosen responses, ~90 s on 2 cores) -> %s", target)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["torch_threads"])  # fixed, so the summation order and hence the weights match across machines
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            model = build_tiny_llama()
            tokenizer = load_tokenizer(EMBEDDED_MODEL, for_export=True)
            losses = train_sft(model, chosen_sequences(recipe), recipe, tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    summary = {"recipe": recipe, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "seconds": round(time.perf_counter() - started, 1)}
    (partial / READY).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info("embedded SFT model: %d steps, loss %.3f -> %.3f, %.0f s", len(losses), losses[0], losses[-1], summary["seconds"])
