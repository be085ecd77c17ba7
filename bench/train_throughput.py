"""Training-step throughput: hdpo-ray (Ray Train + DeepSpeed) against a plain PyTorch loop, in one run.

    python bench/train_throughput.py [--steps 40] [--threads 2] [--batch 4] [--max-length 256]

All loops train the embedded tiny Llama on the same prepared UltraFeedback pairs (the reference
cache the project writes), with the same batch size, optimizer and thread count. Throughput is
tokens (prompt + completion, chosen + rejected, padding excluded) per second over the steps after a
warm-up. Printed:
  - plain-naive: a textbook single-process DPO loop (full logits, full log-softmax);
  - plain-same-math: the same loop using hdpo_ray's completion_logprobs (isolates framework cost);
  - hdpo-ray: `hdpo-ray train` with one Ray Train worker running DeepSpeed ZeRO-2;
and the ratios hdpo-ray / plain-*, with peak memory (resident set size) of each training process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers
WARMUP_STEPS = 5


def plain_loop(cache_entry: str, steps: int, threads: int, batch: int, lr: float, naive: bool, queue) -> None:
    """Runs in a fresh process so its peak RSS is its own."""
    import pyarrow.dataset as pads
    import torch

    from hdpo_ray.data.collate import collate_pairs
    from hdpo_ray.logprobs import completion_logprobs
    from hdpo_ray.loss import hdpo_loss
    from hdpo_ray.models import build_tiny_llama
    from tests.helpers import naive_completion_logprobs  # the textbook version, kept with the tests

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    table = pads.dataset(sorted(str(p) for p in Path(cache_entry).glob("*.parquet"))).to_table()
    rows = table.to_pydict()
    model = build_tiny_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    tokens, seconds = 0, 0.0
    for step in range(steps):
        sl = slice((step * batch) % (table.num_rows - batch), (step * batch) % (table.num_rows - batch) + batch)
        started = time.perf_counter()
        tensors = collate_pairs(rows["prompt_ids"][sl], rows["chosen_ids"][sl], rows["rejected_ids"][sl], 50256)
        if naive:
            logps = naive_completion_logprobs(model, **tensors)
        else:  # entropy at the project's cadence: only on the steps it logs (every WARMUP_STEPS-th)
            logps = completion_logprobs(model, **tensors, with_entropy=(step + 1) % WARMUP_STEPS == 0).logps
        out = hdpo_loss(
            logps[:batch],
            logps[batch:],
            torch.tensor(rows["ref_chosen_logps"][sl]),
            torch.tensor(rows["ref_rejected_logps"][sl]),
            alpha=1.0,
            beta=0.1,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= WARMUP_STEPS:
            seconds += time.perf_counter() - started
            tokens += int(tensors["attention_mask"].sum())
    queue.put(
        {"tokens_per_s": tokens / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    )


def run_plain(cache_entry: str, args, naive: bool) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=plain_loop, args=(cache_entry, args.steps, args.threads, args.batch, args.lr, naive, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    return result


def run_project(workdir: Path, args, workers: int) -> dict:
    """`hdpo-ray train` in-process on a local Ray; throughput from metrics.jsonl after the warm-up window."""
    from hdpo_ray.config import load_config
    from hdpo_ray.pipeline import run_training

    out = workdir / f"project-{workers}w"
    config = load_config(
        None,  # the built-in defaults: the embedded demo's
        [
            f"output_dir={out}",
            f"reference.cache_dir={workdir}/cache",
            "data.eval_files=[]",
            f"data.max_length={args.max_length}",
            f"data.max_prompt_length={args.max_length // 2}",
            f"train.num_workers={workers}",
            f"train.cpus_per_worker={max(0.5, (args.threads - 1) / workers)}",
            f"train.torch_threads={max(1, args.threads // workers)}",
            f"train.max_steps={args.steps}",
            f"train.per_device_batch_size={args.batch // workers}",
            f"train.logging_steps={WARMUP_STEPS}",
            f"train.lr={args.lr}",
            "train.zero_stage=2",
            "train.save_steps=0",
        ],
    )
    result = run_training(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "tokens_per_s" in r and r["step"] > WARMUP_STEPS]
    tokens_per_s = sum(r["tokens_per_s"] for r in measured) / len(measured)
    peak = max(r.get("peak_memory_mb", 0.0) for r in rows)
    return {"tokens_per_s": tokens_per_s, "peak_rss_mb": peak, "wall_s": result.wall_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (all workers together)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        project = run_project(workdir, args, workers=1)
        cache_entry = next(p for p in (workdir / "cache").iterdir() if p.name.startswith("reference-"))
        import ray

        ray.shutdown()  # free the cores for the plain loops
        naive = run_plain(str(cache_entry), args, naive=True)
        same = run_plain(str(cache_entry), args, naive=False)

    print(f"\n{'loop':<34}{'tokens/s':>12}{'peak RSS MB':>14}")
    for name, r in (
        ("plain PyTorch, naive log-softmax", naive),
        ("plain PyTorch, hdpo_ray log-probs", same),
        ("hdpo-ray (Ray Train + DeepSpeed, 1 worker)", project),
    ):
        print(f"{name:<34}{r['tokens_per_s']:>12,.0f}{r['peak_rss_mb']:>14,.0f}")
    print(f"\nratio hdpo-ray / plain naive     = {project['tokens_per_s'] / naive['tokens_per_s']:.2f}")
    print(f"ratio hdpo-ray / plain same math = {project['tokens_per_s'] / same['tokens_per_s']:.2f}")
    print(
        f"(steps={args.steps}, warm-up={WARMUP_STEPS}, pairs/step={args.batch}, threads={args.threads}, "
        f"max_length={args.max_length})"
    )


if __name__ == "__main__":
    main()
