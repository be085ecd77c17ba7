"""The embedded SFT model: the tiny Llama fine-tuned on the embedded data's chosen responses.

Zephyr's DPO starts from an SFT model, and so does the embedded default (`hdpo-ray/tiny-llama-sft`,
shipped in hdpo_ray/assets/tiny-llama-sft). A random-init reference predicts every token almost
uniformly (ln 50257 = 10.8 nats per token), so there is nothing for alpha to sharpen or flatten. How
well the reference is trained matters too: after one SFT epoch (held-out chosen responses at ~7.6
nats per token) alpha = 0.8 made the tiny policy flatter; after three (~7.3 nats per token, loss
6.9) it made it sharper, as the paper reports for Zephyr-7B. The shipped model is three epochs of
SFT_RECIPE, built with `python -m hdpo_ray.sft --output DIR` (a few minutes on 2 CPU cores); shipping
it keeps every machine, and every node of a cluster, on the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger("hdpo_ray")

SFT_RECIPE = {
    "version": 1,
    "data": "ultrafeedback/train_prefs-900.parquet",
    "max_length": 192,
    "max_prompt_length": 64,
    "epochs": 3,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_ratio": 0.1,
    "max_grad_norm": 1.0,
    "seed": 0,
    "torch_threads": 2,
}
SUMMARY = "sft.json"


def chosen_sequences(recipe: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, chosen ids) of every valid pair in the recipe's embedded file,
    templated and truncated as for training."""
    from hdpo_ray.config import EMBEDDED_MODEL
    from hdpo_ray.data.read import expand_sources, file_records
    from hdpo_ray.data.template import encode_pair
    from hdpo_ray.data.validate import InvalidRow, normalize_pair
    from hdpo_ray.models import load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    (path,) = expand_sources([f"embedded:{recipe['data']}"])
    sequences = []
    for _, raw, _ in file_records(path):
        try:
            pair = normalize_pair(json.loads(raw))
        except InvalidRow:
            continue  # the same rows the DPO data report skips
        encoded = encode_pair(
            pair, tokenizer, max_length=recipe["max_length"], max_prompt_length=recipe["max_prompt_length"]
        )
        sequences.append((encoded.prompt_ids, encoded.chosen_ids))
    return sequences


def train_sft(
    model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]], recipe: dict, pad_id: int
) -> list[float]:
    """Mean token NLL on the completions, AdamW with warmup + cosine; returns the per-step losses."""
    from hdpo_ray.data.collate import collate_completions
    from hdpo_ray.logprobs import completion_logprobs
    from hdpo_ray.train.deepspeed_config import lr_factor

    generator = torch.Generator().manual_seed(recipe["seed"])
    batch_size = recipe["batch_size"]
    steps = recipe["epochs"] * math.ceil(len(sequences) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    warmup = round(recipe["warmup_ratio"] * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=steps, warmup_steps=warmup, kind="cosine")
    )
    model.train()
    losses = []
    for _ in range(recipe["epochs"]):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            prompts, completions = zip(*(sequences[i] for i in order[start : start + batch_size]), strict=True)
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


def build_tiny_sft(target: Path, recipe: dict = SFT_RECIPE) -> dict:
    """Train the tiny Llama on the recipe and save it (weights, config, tokenizer, sft.json) to target."""
    from hdpo_ray.config import EMBEDDED_MODEL
    from hdpo_ray.models import build_tiny_llama, load_tokenizer

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe["torch_threads"])  # fixed: the summation order, hence the weights, depend on it
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
    # No timing in here: the file is part of the model's fingerprint, which keys the reference cache.
    summary = {"recipe": recipe, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}
    (partial / SUMMARY).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    log.info(
        "SFT model: %d steps, loss %.3f -> %.3f, %.0f s -> %s",
        len(losses),
        losses[0],
        losses[-1],
        time.perf_counter() - started,
        target,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hdpo_ray.sft", description="Rebuild the embedded SFT model from SFT_RECIPE."
    )
    parser.add_argument("--output", required=True, help="directory to write (replaced if it exists)")
    logging.basicConfig(level=logging.INFO, format="[hdpo-ray] %(message)s")
    build_tiny_sft(Path(parser.parse_args().output))


if __name__ == "__main__":
    main()
