"""What every sampler backend shares: the plan an actor samples with, per-row seeds, and the row layout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from hdpo_ray.config import Config


@dataclass(frozen=True)
class SamplingPlan:
    """Everything an actor needs to turn a row into completions (plain values: it travels to the actors)."""

    model: str
    chat_template: str | None
    trust_remote_code: bool
    num_samples: int
    max_new_tokens: int
    max_prompt_length: int
    top_p: float
    seed: int
    use_gpu: bool
    torch_threads: int

    @classmethod
    def from_config(cls, config: Config, model: str) -> SamplingPlan:
        e = config.eval
        threads = e.torch_threads or max(1, int(e.num_cpus_per_actor))
        return cls(
            model,
            config.data.chat_template,
            config.model.trust_remote_code,
            e.num_samples,
            e.max_new_tokens,
            e.max_prompt_length,
            e.top_p,
            e.seed,
            e.num_gpus_per_actor > 0,
            threads,
        )


def completions_per_prompt(num_samples: int, temperature: float) -> int:
    """Greedy decoding (temperature 0) has one completion per prompt: more would be copies of it."""
    return num_samples if temperature else 1


def row_seed(seed: int, task: str, problem_id: str, temperature: float) -> int:
    """A 31-bit seed for one (task, problem, temperature), stable across runs, processes and backends."""
    digest = hashlib.blake2b(f"{seed}|{task}|{problem_id}|{temperature!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


def output_rows(
    row: dict[str, Any], completions: list[dict[str, Any]], prompt_tokens: int, truncated: bool
) -> list[dict[str, Any]]:
    """One output row per completion: the input row's keys plus the sample index and its measures."""
    keys = {k: row[k] for k in ("task", "problem_id", "temperature")}
    return [
        dict(keys, sample=i, prompt_tokens=prompt_tokens, prompt_truncated=truncated, **c)
        for i, c in enumerate(completions)
    ]


def columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}
