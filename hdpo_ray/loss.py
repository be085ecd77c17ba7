"""The H-DPO loss: a pure function of per-sequence log-probs.

H-DPO (Omura et al., arXiv 2411.07595) puts a coefficient alpha on the policy's entropy in DPO's
objective, J = E[r] + alpha*beta*H(pi) - beta*H(pi, pi_ref). Its optimum makes the implied reward
r(x, y) = beta * (alpha * log pi(y|x) - log pi_ref(y|x)) (+ a constant per prompt), so the
Bradley-Terry loss per pair is

    z    = beta * [(alpha*log pi(y_w) - log pi_ref(y_w)) - (alpha*log pi(y_l) - log pi_ref(y_l))]
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)        (eps: label smoothing, cDPO)

alpha = 1 is DPO exactly. At step 0 (pi = pi_ref) z = beta*(alpha-1)*(log pi(y_w) - log pi(y_l)),
so the loss is ln 2 only when alpha = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class HDPOLoss(NamedTuple):
    loss: torch.Tensor  # () mean over pairs
    chosen_rewards: torch.Tensor  # (B,) beta*(alpha*log pi(y_w) - log pi_ref(y_w)), detached
    rejected_rewards: torch.Tensor  # (B,) likewise for y_l, detached
    losses: torch.Tensor  # (B,) per-pair loss


def hdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    label_smoothing: float = 0.0,
) -> HDPOLoss:
    """H-DPO loss over a batch of B preference pairs.

    Args:
        policy_chosen_logps: (B,) sum of log pi(y_w|x) over completion tokens.
        policy_rejected_logps: (B,) sum of log pi(y_l|x) over completion tokens.
        ref_chosen_logps: (B,) the same under the reference model (no gradient needed).
        ref_rejected_logps: (B,) likewise.
        alpha: entropy coefficient (> 0); 1 is DPO.
        beta: KL strength (> 0).
        label_smoothing: eps in [0, 0.5): conservative DPO's assumed label-flip probability.

    Returns:
        HDPOLoss(loss (), chosen_rewards (B,), rejected_rewards (B,), losses (B,)).
    """
    if not (alpha > 0 and beta > 0 and 0 <= label_smoothing < 0.5):
        raise ValueError(
            f"need alpha > 0, beta > 0 and 0 <= label_smoothing < 0.5; got {alpha}, {beta}, {label_smoothing}"
        )
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"all four log-prob tensors must have the same shape (B,); got {sorted(map(tuple, shapes))}")

    chosen = alpha * policy_chosen_logps - ref_chosen_logps.to(policy_chosen_logps.dtype)
    rejected = alpha * policy_rejected_logps - ref_rejected_logps.to(policy_rejected_logps.dtype)
    z = beta * (chosen - rejected)
    # logsigmoid is the numerically stable -softplus(-z); both terms of cDPO use it.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return HDPOLoss(losses.mean(), beta * chosen.detach(), beta * rejected.detach(), losses)
