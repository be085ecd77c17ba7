"""Sampler backends by name: Ray Data actor classes that turn (task, problem, prompt, temperature) rows into
completions with their entropy. Each backend's module is imported only when chosen (vLLM only on GPU machines).
"""

from __future__ import annotations

import importlib.util
from importlib import import_module

from hdpo_ray.config import ConfigError
from hdpo_ray.eval.samplers.common import SamplingPlan

BACKENDS = {"hf": "hf:HFSampler", "vllm": "vllm:VLLMSampler"}


def get_sampler(backend: str) -> type:
    """The actor class of a backend (one of BACKENDS)."""
    module, _, cls = BACKENDS[backend].partition(":")
    return getattr(import_module(f"hdpo_ray.eval.samplers.{module}"), cls)


def choose_backend(requested: str, num_gpus_per_actor: float) -> str:
    """'hf' or 'vllm'. auto takes vLLM only when it is installed (on the driver: the same
    image everywhere) and each actor gets a GPU."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if requested == "vllm" and not has_vllm:
        raise ConfigError(
            "eval.backend=vllm but vllm is not installed: pip install vllm on a GPU machine, or use eval.backend=hf"
        )
    if requested == "vllm" and num_gpus_per_actor < 1:
        raise ConfigError(
            "eval.backend=vllm needs a whole GPU per actor (a vLLM engine takes most of its memory): set "
            "eval.num_gpus_per_actor=1"
        )
    if requested == "auto":
        return "vllm" if has_vllm and num_gpus_per_actor >= 1 else "hf"
    return requested


__all__ = ["BACKENDS", "SamplingPlan", "choose_backend", "get_sampler"]
