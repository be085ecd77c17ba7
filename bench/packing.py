"""Packed against padded micro-batches, fp32 against bf16: real-token throughput of the policy's forward + backward.

    python bench/packing.py [--models tiny,smollm2] [--dtypes fp32,bf16] [--max-length 1024]
                            [--batch 4] [--steps 6] [--threads 2]

Both layouts see the same micro-batches of the shipped UltraFeedback pairs (tokenized with the model's
chat template at --max-length, as `hdpo-ray train` does) and run hdpo_ray's completion_logprobs, the H-DPO
loss and backward on the same model; only the collation differs (train.packing). Throughput counts real
tokens (prompt + completion, chosen + rejected; padding excluded) per second over the steps after one
warm-up step. Printed per model and weight dtype (--dtypes; bf16 runs the model in bf16, as DeepSpeed's bf16 mode
does): tokens/s of each layout, the packed/padded ratio, the padding each layout computes on, the largest
difference between the two layouts' log-probs (they must agree), and bf16 tokens/s over fp32 for each layout.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
import torch

from hdpo_ray.data.collate import collate_pairs, real_tokens
from hdpo_ray.data.template import encode_pair
from hdpo_ray.data.validate import normalize_pair
from hdpo_ray.logprobs import completion_logprobs
from hdpo_ray.loss import hdpo_loss
from hdpo_ray.models import ASSETS, load_causal_lm, load_tokenizer

MODELS = {"tiny": "hdpo-ray/tiny-llama-sft", "smollm2": "hdpo-ray/smollm2-135m-instruct"}


def encoded_pairs(model_id: str, count: int, max_length: int) -> list:
    tokenizer = load_tokenizer(model_id)
    rows = pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, count).to_pylist()
    return [
        encode_pair(normalize_pair(row), tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
        for row in rows
    ], tokenizer.pad_token_id


def run_layout(model, batches: list, pad_id: int, packed: bool) -> dict:
    """Forward + H-DPO loss + backward per micro-batch; the first is a warm-up."""
    tokens, computed, seconds, logps = 0, 0, 0.0, []
    for step, batch in enumerate(batches):
        prompts, chosen, rejected = (
            [getattr(p, k) for p in batch] for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
        started = time.perf_counter()
        tensors = collate_pairs(prompts, chosen, rejected, pad_id, packed=packed)
        stats = completion_logprobs(model, **tensors, with_entropy=False)
        n = len(batch)
        out = hdpo_loss(
            stats.logps[:n], stats.logps[n:], stats.logps[:n].detach(), stats.logps[n:].detach(), alpha=1.0, beta=0.1
        )
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        logps.append(stats.logps.detach())
        if step:
            seconds += time.perf_counter() - started
            tokens += real_tokens(prompts, chosen, rejected)
            computed += tensors["input_ids"].numel()
    return {"tokens_per_s": tokens / seconds, "padding": 1 - tokens / computed, "logps": torch.cat(logps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4, help="pairs per micro-batch (train.per_device_batch_size)")
    parser.add_argument("--steps", type=int, default=6, help="micro-batches per layout, the first a warm-up")
    parser.add_argument("--dtypes", default="fp32", help="comma-separated: fp32, bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{'model':>8} | dtype | {'padded tok/s':>12} | {'packed tok/s':>12} | packed/padded | padding computed "
        "(padded, packed) | max |dlogp|"
    )
    by_dtype: dict[tuple[str, str], dict] = {}
    for name in args.models.split(","):
        model_id = MODELS[name]
        pairs, pad_id = encoded_pairs(model_id, args.batch * args.steps, args.max_length)
        batches = [pairs[i : i + args.batch] for i in range(0, len(pairs), args.batch)]
        for dtype in args.dtypes.split(","):
            model = load_causal_lm(model_id, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).train()
            model.config.use_cache = False
            padded = run_layout(model, batches, pad_id, packed=False)
            packed = run_layout(model, batches, pad_id, packed=True)
            by_dtype[name, dtype] = {"padded": padded["tokens_per_s"], "packed": packed["tokens_per_s"]}
            ratio = packed["tokens_per_s"] / padded["tokens_per_s"]
            difference = float((packed["logps"] - padded["logps"]).abs().max())
            print(
                f"{name:>8} | {dtype:>5} | {padded['tokens_per_s']:12,.0f} | {packed['tokens_per_s']:12,.0f} | "
                f"{ratio:13.2f}x | {padded['padding']:17.1%}, {packed['padding']:.1%} | {difference:.1e}"
            )
    for name in args.models.split(","):
        if (name, "fp32") in by_dtype and (name, "bf16") in by_dtype:
            fp32, bf16 = by_dtype[name, "fp32"], by_dtype[name, "bf16"]
            print(
                f"{name}: bf16 / fp32 tokens/s: padded {bf16['padded'] / fp32['padded']:.2f}x, packed "
                f"{bf16['packed'] / fp32['packed']:.2f}x"
            )


if __name__ == "__main__":
    main()
