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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from hdpo_ray.config import Config
from hdpo_ray.data.collate import collate_pairs, real_tokens
from hdpo_ray.logprobs import padding_notice, use_packing
from hdpo_ray.loss import hdpo_loss
from hdpo_ray.train.engine import build_engine, export_model, load_checkpoint, save_checkpoint
from hdpo_ray.train.nonfinite import NonFiniteGuard, finite_everywhere, step_engine
from hdpo_ray.train.tracking import CHECKPOINT_ONLY_KEY, NOTICE_KEY, RESTORED_KEY

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


@dataclass
class LoopState:
    """Where the loop is; saved with every checkpoint (hdpo_state.json) and read back on restore."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # this rank's micro-batches of the current epoch already consumed
    skipped_batches: int = 0  # micro-batches with a non-finite loss (no backward on any rank)
    skipped_steps: int = 0  # optimizer steps not applied (non-finite gradient)

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        return cls(**{f.name: int(saved.get(f.name, 0)) for f in fields(cls)})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Worker:
    """What one rank trains with: the config, its DeepSpeed engine and device, and where the loop is."""

    config: Config
    engine: Any
    device: torch.device
    packed: bool  # micro-batches packed without padding (train.packing, where the model allows it)
    total_steps: int
    num_eval_pairs: int
    state: LoopState
    restored_from: int | None  # the step restored from a checkpoint, until the first report says so
    notice: str | None = None  # a line for the user, until the first report carries it
    clock: float = field(default_factory=time.perf_counter)  # end of the last timed micro-step
    stage0_grad_norm: float = float("nan")  # ZeRO-0's last gradient norm (DeepSpeed keeps none there)

    def restart_clock(self) -> None:
        """Throughput counts training time only: eval, checkpoints and skipped micro-batches are left out."""
        self.clock = time.perf_counter()

    def seconds_since_clock(self) -> float:
        now = time.perf_counter()
        seconds, self.clock = now - self.clock, now
        return seconds

    def report(self, metrics: dict, *, save: bool = False, export: bool = False) -> None:
        """ray.train.report of this step's metrics, with a checkpoint (and the exported model) when save."""
        import ray.train

        if set(metrics) <= {"step", "epoch"}:  # a checkpoint with nothing logged: the tracker writes no row for it
            metrics = {**metrics, CHECKPOINT_ONLY_KEY: True}
        if self.restored_from is not None:  # the driver's tracker replaces the rows of the steps trained again
            metrics, self.restored_from = {**metrics, RESTORED_KEY: self.restored_from}, None
        if self.notice is not None:
            metrics, self.notice = {**metrics, NOTICE_KEY: self.notice}, None
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(self.engine, directory, self.state.to_dict())
            if export:
                export_model(self.engine, self.config, directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def start_worker(loop_config: dict) -> Worker:
    """Seed, threads, device, the DeepSpeed engine, and the loop state of the latest checkpoint (if any)."""
    import ray.train

    config = Config.model_validate(loop_config["config"])
    train = config.train
    torch.manual_seed(train.seed)
    torch.set_num_threads(train.torch_threads or max(1, int(train.cpus_per_worker)))
    context = ray.train.get_context()
    rank0 = context.get_world_rank() == 0
    device = torch.device("cuda", torch.cuda.current_device()) if train.use_gpu else torch.device("cpu")
    engine = build_engine(config, total_steps=loop_config["total_steps"], world_size=context.get_world_size())
    # Said through rank 0's first report: a worker's own output reaches the driver only with --verbose.
    packed = use_packing(train.packing, engine.module.model, device, config.model.name_or_path, announce=False)
    notice = padding_notice(config.model.name_or_path) if train.packing and not packed and rank0 else None
    state, restored_from = restore(engine, announce=rank0)
    return Worker(
        config,
        engine,
        device,
        packed,
        loop_config["total_steps"],
        loop_config["num_eval_pairs"],
        state,
        restored_from,
        notice,
    )


def restore(engine, *, announce: bool) -> tuple[LoopState, int | None]:
    """The engine and loop state of Ray Train's latest checkpoint: (state, its step), or (a new state, None)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return LoopState(), None
    with checkpoint.as_directory() as directory:
        state = LoopState.from_dict(load_checkpoint(engine, directory))
    if announce:
        print(
            f"[hdpo-ray] restoring the checkpoint at step {state.step}: epoch {state.epoch}'s first "
            f"{state.micro_batches_in_epoch} micro-batches per worker are read again and skipped, "
            "the steps after the checkpoint are trained again",
            flush=True,
        )
    return state, state.step


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train entry point. loop_config: {"config": Config dict, "total_steps", "num_eval_pairs"}.
    Returns the final {"step", "epoch"}, with "stopped" (the reason) when non-finite values stopped the run."""
    import ray.train

    _quiet_worker_logs()
    worker = start_worker(loop_config)
    train, state = worker.config.train, worker.state
    guard = NonFiniteGuard(state, train.max_consecutive_nonfinite)
    micro_batches = _resumable_micro_batches(ray.train.get_dataset_shard("train"), train.per_device_batch_size, state)
    window = Window(worker.device)
    while state.step < worker.total_steps:
        if not optimizer_step(worker, micro_batches, window, guard):
            return {"step": state.step, "epoch": state.epoch, "stopped": guard.stop_message()}
        final = state.step >= worker.total_steps
        metrics = {}
        if state.step % train.logging_steps == 0 or final:
            metrics, window = step_metrics(worker, window, guard), Window(worker.device)
        if worker.num_eval_pairs and (final or (train.eval_steps and state.step % train.eval_steps == 0)):
            metrics |= evaluate(worker.engine, worker.config, worker.device, worker.num_eval_pairs, worker.packed)
        save = final or bool(train.save_steps and state.step % train.save_steps == 0)
        if metrics or save:
            worker.report({"step": state.step, "epoch": state.epoch, **metrics}, save=save, export=final)
            worker.restart_clock()
    return {"step": state.step, "epoch": state.epoch}


def optimizer_step(worker: Worker, micro_batches, window: Window, guard: NonFiniteGuard) -> bool:
    """Micro-batches (forward, loss, backward) until DeepSpeed takes an optimizer step; state.step follows it.
    Returns False when non-finite losses or gradients came train.max_consecutive_nonfinite times in a row."""
    engine, train, state = worker.engine, worker.config.train, worker.state
    while True:
        batch = next(micro_batches)
        boundary = engine.is_gradient_accumulation_boundary()
        # Entropy costs one more pass over the logits: measure it on the optimizer steps that get logged.
        next_step = engine.global_steps + 1
        with_entropy = next_step % train.logging_steps == 0 or next_step >= worker.total_steps
        out, stats, tokens, ref = _forward_loss(
            engine, batch, worker.config, worker.device, with_entropy, worker.packed
        )
        if not finite_everywhere(out.loss):  # no backward on any rank: the micro-batch is consumed, not trained on
            guard.skipped_batch()
            if guard.exhausted:
                return False
            worker.restart_clock()
            continue
        engine.backward(out.loss)
        applied, norm = step_engine(engine, boundary=boundary, zero_stage=train.zero_stage)
        worker.stage0_grad_norm = norm if norm is not None else worker.stage0_grad_norm
        n = len(batch["prompt_ids"])
        window.add(out, stats, n, tokens, worker.seconds_since_clock(), with_entropy, ref_logps=ref)
        if not boundary:
            continue
        if not applied:
            guard.skipped_step()
            if guard.exhausted:
                state.step = engine.global_steps
                return False
            if engine.global_steps == state.step:  # ZeRO-0: the step did not happen
                continue
        else:
            guard.applied_step()
        state.step = engine.global_steps
        return True


def step_metrics(worker: Worker, window: Window, guard: NonFiniteGuard) -> dict[str, float]:
    """A logging step's metrics: the window's averages over all ranks, skips, learning rate, gradient norm, memory."""
    engine = worker.engine
    grad_norm = worker.stage0_grad_norm if worker.config.train.zero_stage == 0 else engine.get_global_grad_norm()
    return (
        window.averages()
        | guard.metrics()
        | {
            "lr": engine.get_lr()[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "peak_memory_mb": _peak_memory_mb(worker.device),
        }
    )


def _peak_memory_mb(device: torch.device) -> float:
    """Rank 0's peak: allocated GPU memory on GPU, resident set size of the worker process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _resumable_micro_batches(shard, batch_size: int, state: LoopState):
    """Micro-batches over endless epochs, keeping state.epoch and state.micro_batches_in_epoch.

    After a restore, the epoch's stream is replayed and the batches the checkpoint had already
    consumed are skipped (read, not computed), so no pair is trained on twice within an epoch.
    """
    while True:
        seen = 0
        for index, batch in enumerate(_batches(shard, batch_size)):
            seen += 1
            if index < state.micro_batches_in_epoch:
                continue
            state.micro_batches_in_epoch = index + 1
            yield batch
        if seen == 0:
            raise RuntimeError("this worker's shard of the training data is empty")
        state.epoch += 1
        state.micro_batches_in_epoch = 0
