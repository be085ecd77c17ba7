"""The sampling actor, in-process on the embedded SFT model: per-row seeds make a completion independent
of batching, prompts are encoded with the training template, the entropy is the sampling distribution's,
and the config refuses impossible plans."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from hdpo_ray.config import EMBEDDED_SFT_MODEL, ConfigError, load_config
from hdpo_ray.data.template import encode_prompt, fit_prompt
from hdpo_ray.eval.samplers import SamplingPlan, choose_backend
from hdpo_ray.eval.samplers.common import row_seed
from hdpo_ray.eval.samplers.hf import HFSampler
from hdpo_ray.generate import completion_entropy, sample
from hdpo_ray.models import build_tiny_llama, load_tokenizer


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, "gsm8k", "gsm8k/1", 0.5) == row_seed(0, "gsm8k", "gsm8k/1", 0.5)
    seeds = {
        row_seed(s, t, p, temp) for s in (0, 1) for t in ("gsm8k", "ifeval") for p in ("a", "b") for temp in (0.5, 1.0)
    }
    assert len(seeds) == 16 and all(0 <= s < 2**31 for s in seeds)


def test_fit_prompt_keeps_the_end_and_bos():
    assert fit_prompt([1, 2, 3], 5, 9) == ([1, 2, 3], False)
    assert fit_prompt([9, 1, 2, 3, 4, 5], 4, 9) == ([9, 3, 4, 5], True)
    assert fit_prompt([1, 2, 3, 4, 5], 2, 9) == ([4, 5], True)


def _plan(**changes) -> dict:
    config = load_config(
        None, ["eval.num_samples=3", "eval.max_new_tokens=12", "eval.top_p=0.9", "eval.torch_threads=1"]
    )
    return asdict(SamplingPlan.from_config(config, EMBEDDED_SFT_MODEL)) | changes


def _rows(*problems: str, temperature: float = 0.8) -> dict:
    return {
        "task": ["gsm8k"] * len(problems),
        "problem_id": list(problems),
        "prompt": [f"What is {p}?" for p in problems],
        "temperature": [temperature] * len(problems),
    }


@pytest.fixture(scope="module")
def sampler():
    return HFSampler(_plan())


def test_a_row_samples_the_same_completions_alone_or_in_a_batch(sampler):
    both = sampler(_rows("1+1", "2+2"))
    alone = sampler(_rows("2+2"))
    assert len(both["completion"]) == 6 and both["sample"] == [0, 1, 2, 0, 1, 2]
    assert both["completion"][3:] == alone["completion"] and both["entropy"][3:] == pytest.approx(alone["entropy"])
    assert len(set(both["completion"][:3])) > 1  # three different samples of one prompt


def test_sampler_encodes_the_chat_template_and_reports_the_sampling_entropy(sampler):
    out = sampler(_rows("3+3", temperature=0.7))
    tokenizer = load_tokenizer(EMBEDDED_SFT_MODEL)
    _, prompt = encode_prompt(tokenizer, [{"role": "user", "content": "What is 3+3?"}])
    assert out["prompt_tokens"] == [len(prompt)] * 3 and out["prompt_truncated"] == [False] * 3
    # Redraw the first sample with generate directly: same seed scheme, same tokens, same entropy.
    drawn = sample(
        sampler.model,
        [prompt] * 3,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        seed=row_seed(0, "gsm8k", "3+3", 0.7),
        batch_size=3,
    )
    assert out["completion"][0] == tokenizer.decode(drawn[0].completion_ids, skip_special_tokens=True)
    assert out["entropy"][0] == pytest.approx(drawn[0].entropy_sum / drawn[0].num_tokens)
    assert all(1 <= n <= 12 for n in out["num_tokens"])


def test_completion_entropy_equals_what_generate_recorded():
    """The vLLM backend's entropy path (one forward pass through generate's warpers) on HF-sampled tokens."""
    model = build_tiny_llama().eval()
    prompt = [40, 588, 257, 3290, 13]
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.0, 0.9)):  # 0: greedy, top_p set aside
        drawn = sample(
            model,
            [prompt] * 2,
            eos_id=50256,
            pad_id=50256,
            max_new_tokens=6,
            temperature=temperature,
            top_p=top_p,
            seed=1,
            batch_size=2,
        )
        sums = completion_entropy(
            model, prompt, [d.completion_ids for d in drawn], temperature=temperature, top_p=top_p
        )
        assert sums == pytest.approx([d.entropy_sum for d in drawn], rel=1e-4)
    assert completion_entropy(model, prompt, [[]], temperature=1.0, top_p=1.0) == [0.0]


def test_temperature_0_is_one_greedy_completion_equal_to_generate_without_sampling(sampler):
    out = sampler(_rows("5+5", "6+6", temperature=0.0))  # the plan asks for 3 samples per problem
    assert out["sample"] == [0, 0] and out["problem_id"] == ["5+5", "6+6"]
    tokenizer = load_tokenizer(EMBEDDED_SFT_MODEL)
    for completion, entropy, question in zip(out["completion"], out["entropy"], ("5+5", "6+6"), strict=True):
        _, prompt = encode_prompt(tokenizer, [{"role": "user", "content": f"What is {question}?"}])
        ids = torch.tensor([prompt])
        greedy = sampler.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()  # fmt: skip
        greedy = greedy[: greedy.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in greedy else greedy
        assert completion == tokenizer.decode(greedy, skip_special_tokens=True)
        (total,) = completion_entropy(sampler.model, prompt, [greedy], temperature=0.0, top_p=0.9)
        assert entropy == pytest.approx(total / len(greedy), rel=1e-4)


def test_lower_temperature_samples_from_sharper_distributions(sampler):
    cold, hot = sampler(_rows("4+4", temperature=0.3)), sampler(_rows("4+4", temperature=1.2))
    assert sum(cold["entropy"]) < sum(hot["entropy"])


def test_backend_choice():
    assert choose_backend("auto", 0.0) == "hf" and choose_backend("hf", 1.0) == "hf"
    with pytest.raises(ConfigError, match="vllm"):
        choose_backend("vllm", 1.0)  # not installed here


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.k=[1,8]", "between 1 and eval.num_samples"),
        ("eval.temperatures=[-0.5]", "numbers >= 0"),
        ("eval.data.bogus=x", "eval.data.bogus: not a task"),
        ("eval.top_p=0", "eval.top_p"),
        ("eval.tasks=[squad]", "eval.tasks.0"),
        ("eval.temperatures=[0.5,0.50]", "must not repeat"),
    ],
)
def test_eval_config_refuses_impossible_plans(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_torch_threads_follow_the_actor_cpus():
    config = load_config(None, ["eval.num_cpus_per_actor=2"])
    assert SamplingPlan.from_config(config, "m").torch_threads == 2
    assert torch.get_num_threads() >= 1


def test_the_models_own_generation_config_does_not_shape_sampling():
    """A repetition penalty in a model's generation_config would change what is drawn and its entropy on the
    HF path only; sample() sets it aside and puts it back."""
    model = build_tiny_llama().eval()
    prompt = [[40, 588, 257, 3290, 13]] * 2
    plain = sample(model, prompt, eos_id=50256, pad_id=50256, max_new_tokens=6, temperature=0.9, seed=3)
    model.generation_config.repetition_penalty = 5.0
    penalised = sample(model, prompt, eos_id=50256, pad_id=50256, max_new_tokens=6, temperature=0.9, seed=3)
    assert [s.completion_ids for s in penalised] == [s.completion_ids for s in plain]
    assert [s.entropy_sum for s in penalised] == pytest.approx([s.entropy_sum for s in plain])
    assert model.generation_config.repetition_penalty == 5.0
