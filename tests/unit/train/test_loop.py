"""The training loop's metric window, by hand: policy_accuracy ranks by mean log-prob per token."""

from __future__ import annotations

import pytest
import torch

from hdpo_ray.logprobs import CompletionStats
from hdpo_ray.loss import hdpo_loss
from hdpo_ray.train.loop import Window


def test_policy_accuracy_uses_mean_logprob_per_token_and_ignores_alpha():
    # pair 1: chosen -10 over 5 tokens (-2.0/token) vs rejected -12 over 4 (-3.0/token): chosen wins
    # pair 2: chosen -30 over 20 tokens (-1.5/token) vs rejected -20 over 10 (-2.0/token): chosen wins
    #         per token, although its summed log-prob is lower
    logps = torch.tensor([-10.0, -30.0, -12.0, -20.0])
    stats = CompletionStats(
        logps, entropy_sum=torch.tensor([5.0, 20.0, 4.0, 10.0]), num_tokens=torch.tensor([5, 20, 4, 10])
    )
    ref = torch.tensor([-11.0, -25.0]), torch.tensor([-11.0, -25.0])
    for alpha in (0.8, 1.0, 1.2):
        window = Window(torch.device("cpu"))
        window.add(hdpo_loss(logps[:2], logps[2:], *ref, alpha=alpha, beta=0.1), stats, n=2, tokens=100, seconds=1.0)
        metrics = window.averages()
        assert metrics["policy_accuracy"] == 1.0
        assert metrics["entropy"] == pytest.approx(39.0 / 39.0)
        assert metrics["logps/chosen"] == -20.0 and metrics["logps/rejected"] == -16.0
    # the implied-reward accuracy does depend on alpha: r = beta * (alpha * logp - ref)
    low = Window(torch.device("cpu"))
    low.add(hdpo_loss(logps[:2], logps[2:], *ref, alpha=1.0, beta=0.1), stats, n=2, tokens=100)
    assert low.averages()["rewards/accuracies"] == 0.5  # pair 2: -30 < -20


def test_reference_accuracy_ranks_the_reference_log_probs_per_token():
    # the same token counts as the policy: chosen 5 and 20 tokens, rejected 4 and 10
    # reference pair 1: -10/5 = -2.0 vs -12/4 = -3.0 -> chosen wins;
    # pair 2: -40/20 = -2.0 vs -15/10 = -1.5 -> rejected wins
    logps = torch.tensor([-10.0, -30.0, -12.0, -20.0])
    stats = CompletionStats(logps, entropy_sum=torch.zeros(4), num_tokens=torch.tensor([5, 20, 4, 10]))
    ref_c, ref_r = torch.tensor([-10.0, -40.0]), torch.tensor([-12.0, -15.0])
    window = Window(torch.device("cpu"))
    window.add(
        hdpo_loss(logps[:2], logps[2:], ref_c, ref_r, alpha=1.0, beta=0.1),
        stats,
        n=2,
        tokens=10,
        ref_logps=torch.cat([ref_c, ref_r]),
    )
    metrics = window.averages()
    assert metrics["reference_accuracy"] == 0.5 and metrics["policy_accuracy"] == 1.0
