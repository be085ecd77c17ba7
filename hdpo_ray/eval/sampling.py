"""Sampling as a Ray Data pipeline: one row per (task, problem, temperature) -> num_samples completions.

Rows go through `map_batches` onto an actor pool; each actor loads the model once. The prompt is the
problem's user turn rendered with the same chat template as training (`encode_prompt`). Every row is
sampled with its own seed derived from (eval.seed, task, problem, temperature): with `generate`, a
completion does not depend on which actor drew it or on what else was in its batch (vLLM batches
requests itself and makes no such promise). Both backends get the same seeds and parameters: only
temperature and top-p (a model's own generation_config, such as a repetition penalty, is not applied).

Backends: Hugging Face `generate` (`HFSampler`, CPU or GPU) and vLLM (`hdpo_ray.eval.vllm_sampler`,
imported only when chosen). Per completion we record the mean per-token entropy of the distribution
each token was drawn from (after temperature and top-p): the quantity H-DPO's alpha moves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

from hdpo_ray.config import Config
from hdpo_ray.data.template import fit_prompt

log = logging.getLogger("hdpo_ray")


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


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


class HFSampler:
    """Ray Data actor: Hugging Face `generate`, num_samples completions of one prompt per call."""

    rows_per_batch = 1  # each row is its own generate call (its own seed), so batching rows buys nothing

    def __init__(self, plan: dict[str, Any]):
        import torch

        from hdpo_ray.models import load_causal_lm, load_tokenizer

        self.plan = SamplingPlan(**plan)
        torch.set_num_threads(self.plan.torch_threads)
        device = torch.device("cuda" if self.plan.use_gpu else "cpu")
        dtype = torch.bfloat16 if self.plan.use_gpu else torch.float32
        self.model = (
            load_causal_lm(self.plan.model, dtype=dtype, trust_remote_code=self.plan.trust_remote_code)
            .to(device)
            .eval()
        )
        self.tokenizer = load_tokenizer(self.plan.model, self.plan.chat_template, self.plan.trust_remote_code)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from hdpo_ray.data.template import encode_prompt
        from hdpo_ray.generate import sample

        plan, tok = self.plan, self.tokenizer
        out: list[dict[str, Any]] = []
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            _, ids = encode_prompt(tok, [{"role": "user", "content": str(row["prompt"])}])
            ids, truncated = fit_prompt(ids, plan.max_prompt_length, tok.bos_token_id)
            temperature = float(row["temperature"])
            samples = sample(
                self.model,
                [ids] * plan.num_samples,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                max_new_tokens=plan.max_new_tokens,
                temperature=temperature,
                top_p=plan.top_p,
                seed=row_seed(plan.seed, row["task"], row["problem_id"], temperature),
                batch_size=plan.num_samples,
            )
            completions = [
                {
                    "completion": tok.decode(s.completion_ids, skip_special_tokens=True),
                    "num_tokens": s.num_tokens,
                    "entropy": s.entropy_sum / max(s.num_tokens, 1),
                    "finished": s.finished,
                }
                for s in samples
            ]
            out.extend(output_rows(row, completions, len(ids), truncated))
        return _columns(out)


def choose_backend(requested: str, num_gpus_per_actor: float) -> str:
    """'hf' or 'vllm'. auto takes vLLM only when it is installed (on the driver: the same
    image everywhere) and each actor gets a GPU."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        from hdpo_ray.config import ConfigError

        raise ConfigError(
            "eval.backend=vllm but vllm is not installed: pip install 'hdpo-ray[vllm]' on a GPU machine, or use "
            "eval.backend=hf"
        )
    if requested == "vllm" and num_gpus_per_actor < 1:
        from hdpo_ray.config import ConfigError

        raise ConfigError(
            "eval.backend=vllm needs a whole GPU per actor (a vLLM engine takes most of its memory): set "
            "eval.num_gpus_per_actor=1"
        )
    if requested == "auto":
        return "vllm" if has_vllm and num_gpus_per_actor >= 1 else "hf"
    return requested


def sample_completions(
    rows: list[dict[str, Any]],
    plan: SamplingPlan,
    backend: str,
    *,
    num_actors: int,
    num_cpus: float,
    num_gpus: float,
    node_id: str | None = None,
    placement: dict[str, dict] | None = None,
) -> list[dict[str, Any]]:
    """rows (task, problem_id, prompt, temperature) -> one dict per completion, through a Ray Data actor pool.

    node_id: prefer that node for the actors (a sweep trial's model directory is on its node).
    placement: more actor options (custom resources, a label selector) that steer the actors to node groups.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    if backend == "vllm":
        from hdpo_ray.eval.vllm_sampler import VLLMSampler as sampler
    else:
        sampler = HFSampler
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * num_actors)))
    sampled = dataset.map_batches(
        sampler,
        fn_constructor_kwargs={"plan": asdict(plan)},
        batch_size=sampler.rows_per_batch,
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **_on_node(node_id),
        **(placement or {}),
    )
    sampled.set_name("eval-sampling")
    return sampled.take_all()


def _on_node(node_id: str | None) -> dict[str, Any]:
    """Actor options that prefer one node (soft: where that node cannot hold the pool, e.g. a CPU head node and
    GPU actors, Ray places them elsewhere, which then needs the model on shared storage)."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}
