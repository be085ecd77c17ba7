"""Sampling with entropy: hand-computed entropies, left padding, seeding, and agreement with the log-prob path."""

from __future__ import annotations

import math

import pytest
import torch

from hdpo_ray.data.collate import collate_completions
from hdpo_ray.generate import entropy_of_scores, left_pad, sample
from hdpo_ray.logprobs import completion_logprobs
from hdpo_ray.models import build_tiny_llama

EOS = PAD = 50256


def test_entropy_of_scores_by_hand():
    scores = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf], [math.log(3.0), 0.0, -math.inf, -math.inf]]
    )
    expected = [math.log(4), math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert entropy_of_scores(scores).tolist() == pytest.approx(expected, abs=1e-6)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama().eval()


PROMPTS = [[40, 588, 257, 3290, 13], [464, 3290], [1212, 318, 257, 1332, 286, 262, 6334, 13]]


def test_same_seed_same_samples_other_seed_other_samples(model):
    a = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, seed=7, batch_size=2)
    b = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, seed=7, batch_size=2)
    c = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, seed=8, batch_size=2)
    assert [s.completion_ids for s in a] == [s.completion_ids for s in b]
    assert [s.completion_ids for s in a] != [s.completion_ids for s in c]
    assert all(1 <= s.num_tokens <= 6 and (s.finished == (s.completion_ids[-1] == EOS)) for s in a)


def test_sampled_entropy_matches_the_teacher_forced_entropy_of_the_same_tokens(model):
    """At temperature 1 and top_p 1 the sampling distribution is the model's: generate (left-padded, KV
    cache) and completion_logprobs (right-padded, one pass) must agree on every sampled token."""
    samples = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=8, seed=0, batch_size=3)
    batch = collate_completions(PROMPTS, [s.completion_ids for s in samples], PAD)
    with torch.no_grad():
        stats = completion_logprobs(model, **batch, with_entropy=True)
    assert stats.num_tokens.tolist() == [s.num_tokens for s in samples]
    assert stats.entropy_sum.tolist() == pytest.approx([s.entropy_sum for s in samples], rel=1e-4)
    # a random-init model is close to uniform over 50257 tokens
    assert 10.0 < samples[0].entropy_sum / samples[0].num_tokens < math.log(50257) + 1e-3


def test_temperature_and_top_p_lower_the_sampling_entropy(model):
    hot = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=4, seed=0)
    cold = sample(model, PROMPTS, eos_id=EOS, pad_id=PAD, max_new_tokens=4, seed=0, temperature=0.05, top_p=0.5)
    per_token = lambda ss: sum(s.entropy_sum for s in ss) / sum(s.num_tokens for s in ss)  # noqa: E731
    assert per_token(cold) < per_token(hot) - 1.0
