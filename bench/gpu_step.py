"""One H-DPO training step on one device: plain PyTorch against hdpo-ray's step, in one run.

    python bench/gpu_step.py                 # GPU: Qwen2-0.5B shape (random init), 4 pairs x 1024 tokens, bf16
    python bench/gpu_step.py --tiny          # CPU check: a 2-layer Qwen2, 2 pairs x 64 tokens

The same random-init model and the same token batches on both sides (sequences of --tokens tokens, the
last --completion of them the completion):
  - plain: the loop of ../shared/gpu/baseline_probe.py: fp32 master weights, bf16 autocast, SDPA, full
    logits and log-softmax, the reference forward (bf16 copy) inside every step, torch AdamW;
  - hdpo-ray: the worker's own code path: `build_engine` (DeepSpeed ZeRO-2, train.precision bf16 on GPU,
    one rank), packed collation, `completion_logprobs` (LM head on completion tokens only, chunked) and
    `hdpo_loss`, with the reference log-probs precomputed, as the reference pool and its cache give them;
    the reference pool's forward is timed separately.
Printed: tokens/s (2 x pairs x tokens per step, after --warmup steps), MFU (6N FLOPs per token for forward
and backward, +2N where the step includes the reference forward; --peak FLOP/s), peak device memory, and
the ratio hdpo-ray / plain. JSON to $OUT/gpu_step.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

QWEN2_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
TINY = {
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_model(shape: dict, directory: str) -> int:
    """A random-init Qwen2 of this shape as a Hugging Face directory (both sides load it); its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def batches(args, vocab: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (2 * args.pairs, args.tokens), generator=g) for _ in range(count)]


def timed(step, inputs: list, warmup: int) -> float:
    """Seconds per step over the steps after the warm-up."""
    for i, x in enumerate(inputs):
        if i == warmup:
            sync()
            started = time.perf_counter()
        step(x)
    sync()
    return (time.perf_counter() - started) / (len(inputs) - warmup)


def peak_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def plain(args, model_dir: str, inputs: list) -> dict:
    from transformers import AutoModelForCausalLM

    dev = device()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).train()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=dev.type == "cuda")
    completion = torch.zeros(args.tokens, dtype=torch.bool)
    completion[-args.completion :] = True

    def logps(model, ids):
        logits = model(input_ids=ids).logits[:, :-1].float()
        token = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        return (token * completion[1:].to(ids.device)).sum(-1)

    def step(ids):
        ids = ids.to(dev)
        with torch.no_grad():
            ref = logps(reference, ids)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pi = logps(policy, ids)
        n = args.pairs
        loss = -F.logsigmoid(0.1 * ((args.alpha * pi[:n] - ref[:n]) - (args.alpha * pi[n:] - ref[n:]))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, inputs, args.warmup)
    return {"s_per_step": seconds, "flops_per_token_factor": 8, "peak_memory_gb": peak_memory_gb()}


def project(args, model_dir: str, inputs: list) -> dict:
    from hdpo_ray.config import Config
    from hdpo_ray.data.collate import collate_pairs
    from hdpo_ray.logprobs import completion_logprobs
    from hdpo_ray.loss import hdpo_loss
    from hdpo_ray.models import load_causal_lm
    from hdpo_ray.train.engine import build_engine

    dev = device()
    on_gpu = dev.type == "cuda"
    config = Config.model_validate(
        {
            "model": {"name_or_path": model_dir},
            "train": {
                "num_workers": 1,
                "use_gpu": on_gpu,
                "per_device_batch_size": args.pairs,
                "zero_stage": 2,
                "warmup_ratio": 0.0,
            },
        }
    )
    engine = build_engine(config, total_steps=len(inputs), world_size=1)
    prompt = args.tokens - args.completion

    def tensors(ids):
        rows = ids.tolist()
        n = args.pairs
        packed = collate_pairs(
            [r[:prompt] for r in rows[:n]],
            [r[prompt:] for r in rows[:n]],
            [r[prompt:] for r in rows[n:]],
            0,
            packed=True,
        )
        return {k: v.to(dev) for k, v in packed.items()}

    # The reference pool's forward pass, as its actors run it (bf16
    # on GPU), timed alone: training reads its cached output.
    reference = load_causal_lm(model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32).to(dev).eval()
    cached = {}

    @torch.no_grad()
    def reference_pass(ids, model=reference):
        cached[id(ids)] = completion_logprobs(model, **tensors(ids), with_entropy=False).logps.float()

    reference_s = timed(reference_pass, inputs, args.warmup)
    del reference, reference_pass  # off the device before the policy's step is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step(ids):
        stats = engine(**tensors(ids), with_entropy=False)
        ref, n = cached[id(ids)], args.pairs
        out = hdpo_loss(stats.logps[:n], stats.logps[n:], ref[:n], ref[n:], alpha=args.alpha, beta=0.1)
        engine.backward(out.loss)
        engine.step()

    seconds = timed(step, inputs, args.warmup)
    return {
        "s_per_step": seconds,
        "flops_per_token_factor": 6,
        "peak_memory_gb": peak_memory_gb(),
        "reference_pass_s_per_batch": reference_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer Qwen2 and short sequences: a CPU check of the script"
    )
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (default 4; --tiny 2)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default 1024; --tiny 64)")
    parser.add_argument("--completion", type=int, default=None, help="completion tokens per sequence (default half)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--peak", type=float, default=989e12, help="the device's dense bf16 FLOP/s (H100/H200: 989e12)")
    args = parser.parse_args()
    tiny = args.tiny
    args.pairs = args.pairs or (2 if tiny else 4)
    args.tokens = args.tokens or (64 if tiny else 1024)
    args.completion = args.completion or args.tokens // 2
    args.steps, args.warmup = (
        args.steps or (2 if tiny else 10),
        args.warmup if args.warmup is not None else (1 if tiny else 3),
    )

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29517",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        os.environ.setdefault(key, value)  # one rank, as Ray Train sets them up for each worker
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    work = tempfile.mkdtemp(prefix="hdpo-gpu-step-")
    shape = TINY if tiny else QWEN2_05B
    params = save_model(shape, work)
    inputs = batches(args, shape["vocab_size"], args.warmup + args.steps)
    tokens = 2 * args.pairs * args.tokens
    results = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "params": params,
        "pairs": args.pairs,
        "tokens": args.tokens,
    }
    for name, run in (("plain", plain), ("hdpo-ray", project)):
        r = run(args, work, inputs)
        r["tokens_per_s"] = tokens / r["s_per_step"]
        r["mfu"] = r["flops_per_token_factor"] * params * r["tokens_per_s"] / args.peak
        results[name] = r
    ratio = results["hdpo-ray"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    results["ratio_tokens_per_s"] = ratio
    print(f"{results['device']}, {params / 1e6:.1f}M parameters, {args.pairs} pairs x {args.tokens} tokens")
    print("| step | tokens/s | MFU | peak memory (GB) |\n|---|---:|---:|---:|")
    for name in ("plain", "hdpo-ray"):
        r = results[name]
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gb']} |")
    print(
        f"hdpo-ray / plain: {ratio:.2f}x tokens/s (plain includes the reference forward, hdpo-ray reads it cached; the "
        f"reference pool's forward alone: {tokens / results['hdpo-ray']['reference_pass_s_per_batch']:,.0f} tokens/s)"
    )
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_step.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
