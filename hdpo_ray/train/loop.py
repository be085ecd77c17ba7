"""The per-worker training loop that Ray Train runs on every rank.

Each rank reads its shard of the prepared pairs (Ray Train's streaming split), computes policy
log-probs with the same function the reference pool used, takes the H-DPO loss and steps DeepSpeed.
Metrics are summed over a logging window and all-reduced, so what rank 0 reports covers all ranks.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hdpo_ray.config import Config
from hdpo_ray.data.collate import collate_pairs, real_tokens
from hdpo_ray.logprobs import use_packing
from hdpo_ray.loss import hdpo_loss
from hdpo_ray.train.engine import build_engine, export_model, load_checkpoint, save_checkpoint
from hdpo_ray.train.nonfinite import NonFiniteGuard, finite_everywhere, step_engine
from hdpo_ray.train.tracking import RESTORED_KEY

SUMS = (
    "seconds",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "policy_accuracy",
    "reference_accuracy",
    "logps/chosen",
    "logps/rejected",
    "pairs",
    "entropy",
    "entropy_tokens",
    "tokens",
)


@dataclass
class Window:
    """Sums over a logging window, kept on the device (len(SUMS),) float64 so that a micro-step never waits
    for the device; `averages` all-reduces them across ranks and reads them once."""

    device: torch.device
    sums: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=self.device)

    def add(
        self,
        out,
        stats,
        n: int,
        tokens: int,
        seconds: float = 0.0,
        with_entropy: bool = True,
        ref_logps: torch.Tensor | None = None,
    ) -> None:
        """out: HDPOLoss over n pairs; stats: CompletionStats over 2n sequences (chosen first); ref_logps: (2n,)."""
        # The policy's own ranking, by mean log-prob per token: unlike the implied rewards it does not
        # depend on alpha or the reference, so it compares trials of an alpha sweep.
        tokens_per_seq = stats.num_tokens.clamp(min=1)
        logps = stats.logps.detach()
        per_token = logps / tokens_per_seq
        zero = torch.zeros((), device=logps.device)
        values = {
            "seconds": seconds,
            "loss": out.loss.detach() * n,
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).sum(),
            "policy_accuracy": (per_token[:n] > per_token[n:]).sum(),
            # The same ranking by the reference: what policy_accuracy was before training.
            "reference_accuracy": (ref_logps[:n] / tokens_per_seq[:n] > ref_logps[n:] / tokens_per_seq[n:]).sum()
            if ref_logps is not None
            else zero,
            "logps/chosen": logps[:n].sum(),
            "logps/rejected": logps[n:].sum(),
            "pairs": n,
            "entropy": stats.entropy_sum.sum() if with_entropy else zero,
            "entropy_tokens": stats.num_tokens.sum() if with_entropy else zero,
            "tokens": tokens,
        }
        self.sums += torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device) for k in SUMS])

    def averages(self, prefix: str = "") -> dict[str, float]:
        totals = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(totals)
        t = dict(zip(SUMS, totals.tolist(), strict=True))
        pairs = max(t["pairs"], 1.0)
        metrics = {
            k: t[k] / pairs
            for k in (
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "policy_accuracy",
                "reference_accuracy",
                "logps/chosen",
                "logps/rejected",
            )
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["entropy"] = t["entropy"] / max(t["entropy_tokens"], 1.0)
        # Ranks run concurrently: tokens of all ranks over the mean rank's busy time.
        metrics["tokens_per_s"] = t["tokens"] / max(
            t["seconds"] / dist.get_world_size() if dist.is_initialized() else t["seconds"], 1e-9
        )
        metrics["pairs"] = t["pairs"]
        return {f"{prefix}{k}": v for k, v in metrics.items()}


def _forward_loss(
    engine, batch: dict, config: Config, device: torch.device, with_entropy: bool = True, packed: bool = False
):
    """One micro-batch of B pairs -> (HDPOLoss, CompletionStats over 2B sequences, real
    tokens, reference log-probs (2B,))."""
    prompts, chosen, rejected = batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]
    tensors = collate_pairs(prompts, chosen, rejected, _pad_id(config), packed=packed)
    stats = engine(**{k: v.to(device) for k, v in tensors.items()}, with_entropy=with_entropy)
    n = len(prompts)
    ref_c = torch.as_tensor(batch["ref_chosen_logps"], dtype=torch.float32, device=device)
    ref_r = torch.as_tensor(batch["ref_rejected_logps"], dtype=torch.float32, device=device)
    out = hdpo_loss(
        stats.logps[:n],
        stats.logps[n:],
        ref_c,
        ref_r,
        alpha=config.loss.alpha,
        beta=config.loss.beta,
        label_smoothing=config.loss.label_smoothing,
    )
    return out, stats, real_tokens(prompts, chosen, rejected), torch.cat([ref_c, ref_r])


def _pad_id(config: Config) -> int:
    from hdpo_ray.models import load_tokenizer  # cached per process: a dict lookup per micro-batch

    return load_tokenizer(
        config.model.name_or_path, config.data.chat_template, config.model.trust_remote_code
    ).pad_token_id


def _batches(iterator, batch_size: int):
    """Lists of Python ints per pair; pyarrow keeps ragged token lists as lists."""
    for table in iterator.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2):
        yield {name: table[name].to_pylist() for name in table.column_names}


@torch.no_grad()
def evaluate(engine, config: Config, device: torch.device, num_pairs: int, packed: bool) -> dict[str, float]:
    """Every rank scores every world_size-th eval batch; ranks with fewer batches repeat a forward
    (not counted) so that ZeRO-3's collective forwards stay in step."""
    import ray.train

    rank, world = dist.get_rank(), dist.get_world_size()
    batch_size = config.train.per_device_batch_size
    per_rank = math.ceil(math.ceil(num_pairs / batch_size) / world)
    window, done, spare = Window(device), 0, None
    engine.eval()
    for i, batch in enumerate(_batches(ray.train.get_dataset_shard("eval"), batch_size)):
        spare = spare or batch
        if i % world == rank:
            out, stats, tokens, ref = _forward_loss(engine, batch, config, device, packed=packed)
            window.add(out, stats, len(batch["prompt_ids"]), tokens, ref_logps=ref)
            done += 1
    for _ in range(per_rank - done):
        _forward_loss(engine, spare, config, device, packed=packed)
    engine.train()
    metrics = window.averages(prefix="eval/")
    metrics.pop("eval/tokens_per_s")
    return metrics


def _quiet_worker_logs() -> None:
    """Our progress line replaces Ray Train's per-report log lines; torch's collective-API renames are noise."""
    import warnings

    from ray.train.v2._internal.execution import context as train_context
    from ray.train.v2._internal.execution import storage as train_storage

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # Ray names this logger by its file path
    logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train entry point. loop_config: {"config": Config dict, "total_steps", "num_eval_pairs"}."""
    import ray.train

    _quiet_worker_logs()
    config = Config.model_validate(loop_config["config"])
    total_steps, num_eval_pairs = loop_config["total_steps"], loop_config["num_eval_pairs"]
    train = config.train
    torch.manual_seed(train.seed)
    torch.set_num_threads(train.torch_threads or max(1, int(train.cpus_per_worker)))
    context = ray.train.get_context()
    device = torch.device("cuda", torch.cuda.current_device()) if train.use_gpu else torch.device("cpu")
    engine = build_engine(config, total_steps=total_steps, world_size=context.get_world_size())
    packed = use_packing(
        config.train.packing,
        engine.module.model,
        device,
        config.model.name_or_path,
        announce=context.get_world_rank() == 0,
    )

    state = {"step": 0, "epoch": 0, "micro_batches_in_epoch": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state |= load_checkpoint(engine, directory)
        if context.get_world_rank() == 0:
            print(
                f"[hdpo-ray] restoring the checkpoint at step {state['step']}: epoch {state['epoch']}'s first "
                f"{state['micro_batches_in_epoch']} micro-batches per worker are read again and skipped, the steps "
                "after the checkpoint are trained again",
                flush=True,
            )
    restored_from = state["step"] if checkpoint else None
    guard = NonFiniteGuard(state, train.max_consecutive_nonfinite)

    def report(metrics: dict, *, save: bool = False, export: bool = False) -> None:
        nonlocal restored_from
        if restored_from is not None:  # the driver's tracker replaces the rows of the steps trained again
            metrics, restored_from = {**metrics, RESTORED_KEY: restored_from}, None
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(engine, directory, state)
            if export:
                export_model(engine, config, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    window, last, stage0_grad_norm = Window(device), time.perf_counter(), float("nan")
    micro_batches = _resumable_micro_batches(ray.train.get_dataset_shard("train"), train.per_device_batch_size, state)
    while state["step"] < total_steps:
        batch = next(micro_batches)
        boundary = engine.is_gradient_accumulation_boundary()
        # Entropy costs one more pass over the logits: measure it on the optimizer steps that get logged.
        next_step = engine.global_steps + 1
        with_entropy = next_step % train.logging_steps == 0 or next_step >= total_steps
        out, stats, tokens, ref = _forward_loss(engine, batch, config, device, with_entropy, packed)
        if not finite_everywhere(out.loss):  # no backward on any rank: the micro-batch is consumed, not trained on
            guard.skipped_batch()
            if guard.exhausted:
                return {"step": state["step"], "epoch": state["epoch"], "stopped": guard.stop_message()}
            last = time.perf_counter()
            continue
        engine.backward(out.loss)
        applied, norm = step_engine(engine, boundary=boundary, zero_stage=train.zero_stage)
        stage0_grad_norm = norm if norm is not None else stage0_grad_norm
        now = time.perf_counter()
        window.add(out, stats, len(batch["prompt_ids"]), tokens, now - last, with_entropy, ref_logps=ref)
        last = now
        if not boundary:
            continue
        if not applied:
            guard.skipped_step()
            if guard.exhausted:
                state["step"] = engine.global_steps
                return {"step": state["step"], "epoch": state["epoch"], "stopped": guard.stop_message()}
            if engine.global_steps == state["step"]:  # ZeRO-0: the step did not happen
                continue
        else:
            guard.applied_step()
        state["step"] = step = engine.global_steps
        final = step >= total_steps
        metrics = {}
        if step % train.logging_steps == 0 or final:
            grad_norm = stage0_grad_norm if train.zero_stage == 0 else engine.get_global_grad_norm()
            metrics = (
                window.averages()
                | guard.metrics()
                | {
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "peak_memory_mb": _peak_memory_mb(device),
                }
            )
            window = Window(device)
        if num_eval_pairs and (final or (train.eval_steps and step % train.eval_steps == 0)):
            metrics |= evaluate(engine, config, device, num_eval_pairs, packed)
        save = final or bool(train.save_steps and step % train.save_steps == 0)
        if metrics or save:
            report({"step": step, "epoch": state["epoch"], **metrics}, save=save, export=final)
            last = time.perf_counter()  # throughput counts training time, not eval or checkpointing
    return {"step": state["step"], "epoch": state["epoch"]}


def _peak_memory_mb(device: torch.device) -> float:
    """Rank 0's peak: allocated GPU memory on GPU, resident set size of the worker process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resumable_micro_batches(shard, batch_size: int, state: dict):
    """Micro-batches over endless epochs, keeping state["epoch"] and state["micro_batches_in_epoch"].

    After a restore, the epoch's stream is replayed and the batches the checkpoint had already
    consumed are skipped (read, not computed), so no pair is trained on twice within an epoch.
    """
    while True:
        seen = 0
        for index, batch in enumerate(_batches(shard, batch_size)):
            seen += 1
            if index < state["micro_batches_in_epoch"]:
                continue
            state["micro_batches_in_epoch"] = index + 1
            yield batch
        if seen == 0:
            raise RuntimeError("this worker's shard of the training data is empty")
        state["epoch"] += 1
        state["micro_batches_in_epoch"] = 0
