"""The reference pool: a Ray Data actor pool that holds pi_ref and adds its log-probs to every pair.

Training workers never load the reference model: its log-probs arrive as two columns,
ref_chosen_logps and ref_rejected_logps, computed here with the same `completion_logprobs`
function the policy uses.
"""

from __future__ import annotations

import pyarrow as pa
import torch

from hdpo_ray.capacity import placement_options
from hdpo_ray.config import Config
from hdpo_ray.data.collate import collate_pairs
from hdpo_ray.logprobs import completion_logprobs, use_packing

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


class ReferenceScorer:
    """Callable class for `map_batches`: loads pi_ref once per actor, scores batches of pairs; returns the
    columns training reads: PAIR_COLUMNS, ref_chosen_logps and ref_rejected_logps."""

    def __init__(
        self,
        name_or_path: str,
        pad_id: int,
        chunk_tokens: int,
        dtype: str,
        trust_remote_code: bool = False,
        torch_threads: int | None = None,
        packing: bool = True,
        use_gpu: bool = False,
    ):
        from hdpo_ray.models import load_causal_lm

        self.device = torch.device("cuda" if use_gpu else "cpu")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = (
            load_causal_lm(name_or_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)
            .to(self.device)
            .eval()
        )
        self.pad_id = pad_id
        self.chunk_tokens = chunk_tokens
        self.packing = use_packing(packing, self.model, self.device, name_or_path)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        tensors = collate_pairs(*(batch[k].to_pylist() for k in PAIR_COLUMNS), self.pad_id, packed=self.packing)
        stats = completion_logprobs(
            self.model,
            **{k: v.to(self.device) for k, v in tensors.items()},
            chunk_tokens=self.chunk_tokens,
            with_entropy=False,
        )
        logps = stats.logps.float().cpu().numpy()
        # Only what training reads: a separate column-selection stage would ask Ray Data for one more CPU per block.
        pairs = batch.select(PAIR_COLUMNS)
        return pairs.append_column("ref_chosen_logps", pa.array(logps[:n])).append_column(
            "ref_rejected_logps", pa.array(logps[n:])
        )


def reference_dtype(config: Config) -> str:
    """bf16 on GPU actors, fp32 on CPU: part of the cache key, since the log-probs differ."""
    return "bfloat16" if config.reference.num_gpus_per_actor > 0 else "float32"


def reference_threads(config: Config) -> int:
    """reference.torch_threads, or what it derives to: the actor's CPUs, and at least 2 when the pass runs on
    its own before training (a cache_dir) rather than beside the training workers."""
    ref = config.reference
    if ref.torch_threads:
        return ref.torch_threads
    return max(2 if ref.cache_dir else 1, int(ref.num_cpus_per_actor))


def add_reference_logprobs(dataset, config: Config, pad_id: int):
    """Lazy `map_batches` stage on its own actor pool (reference.num_actors x CPUs/GPUs per actor)."""
    from ray.data import ActorPoolStrategy

    ref = config.reference
    threads = reference_threads(config)
    return dataset.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs=dict(
            name_or_path=config.model.reference,
            pad_id=pad_id,
            chunk_tokens=config.model.logprob_chunk_tokens,
            dtype=reference_dtype(config),
            use_gpu=ref.num_gpus_per_actor > 0,
            trust_remote_code=config.model.trust_remote_code,
            torch_threads=threads,
            packing=config.train.packing,
        ),
        compute=ActorPoolStrategy(size=ref.num_actors),
        num_cpus=ref.num_cpus_per_actor,
        num_gpus=ref.num_gpus_per_actor,
        **placement_options(ref.resources, ref.label_selector),
        batch_size=ref.batch_size,
        batch_format="pyarrow",
    )
