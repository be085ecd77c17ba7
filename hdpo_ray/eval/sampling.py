"""Sampling as a Ray Data pipeline: one row per (task, problem, temperature) -> num_samples completions.

Rows go through `map_batches` onto an actor pool; each actor loads the model once. The prompt is the
problem's user turn rendered with the same chat template as training (`encode_prompt`). Every row is
sampled with its own seed derived from (eval.seed, task, problem, temperature): with `generate`, a
completion does not depend on which actor drew it or on what else was in its batch (vLLM batches
requests itself and makes no such promise). Both backends get the same seeds and parameters: only
temperature and top-p (a model's own generation_config, such as a repetition penalty, is not applied).

Backends (hdpo_ray.eval.samplers): Hugging Face `generate` (`hf`, CPU or GPU) and vLLM (`vllm`,
imported only when chosen). Per completion we record the mean per-token entropy of the distribution
each token was drawn from (after temperature and top-p): the quantity H-DPO's alpha moves.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from hdpo_ray.eval.samplers import SamplingPlan, get_sampler


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

    sampler = get_sampler(backend)
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
