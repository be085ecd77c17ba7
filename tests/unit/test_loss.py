"""Unit tests for hdpo_ray.loss.hdpo_loss, against values derived by hand with `math`."""

from __future__ import annotations

import math

import pytest
import torch

from hdpo_ray.loss import hdpo_loss


def _neg_log_sigmoid(z: float) -> float:
    """-log(1 / (1 + exp(-z))) = log(1 + exp(-z)), written out by hand."""
    return math.log(1.0 + math.exp(-z))


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _expected_pair(
    pc: float, pr: float, rc: float, rr: float, alpha: float, beta: float, eps: float = 0.0
) -> tuple[float, float, float]:
    chosen_reward = beta * (alpha * pc - rc)
    rejected_reward = beta * (alpha * pr - rr)
    z = chosen_reward - rejected_reward
    loss = (1.0 - eps) * _neg_log_sigmoid(z) + eps * _neg_log_sigmoid(-z)
    return loss, chosen_reward, rejected_reward


def test_concrete_two_pair_example():
    alpha, beta = 0.9, 0.1
    pc, pr = _t(-10.0, -20.0), _t(-12.0, -15.0)
    rc, rr = _t(-11.0, -18.0), _t(-11.0, -16.0)
    out = hdpo_loss(pc, pr, rc, rr, alpha=alpha, beta=beta)

    # Pair 0: chosen = 0.9*-10 + 11 = 2.0, rejected = 0.9*-12 + 11 = 0.2, z = 0.1*(2.0 - 0.2) = 0.18.
    # Pair 1: chosen = 0.9*-20 + 18 = 0.0, rejected = 0.9*-15 + 16 = 2.5, z = 0.1*(0.0 - 2.5) = -0.25.
    loss0 = math.log(1.0 + math.exp(-0.18))
    loss1 = math.log(1.0 + math.exp(0.25))
    assert out.losses.tolist() == pytest.approx([loss0, loss1], abs=1e-12)
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, abs=1e-12)
    assert out.losses.tolist() == pytest.approx([0.607192, 0.825939], abs=1e-6)
    assert out.loss.item() == pytest.approx(0.716566, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0], abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([0.02, 0.25], abs=1e-12)
    assert out.loss.shape == ()
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (2,)


def test_alpha_one_is_standard_dpo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    out = hdpo_loss(pc, pr, rc, rr, alpha=1.0, beta=beta)
    expected = [
        _neg_log_sigmoid(beta * ((a - c) - (b - d)))
        for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
    ]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-10)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-10)


def test_step_zero_alpha_one_is_ln2():
    g = torch.Generator().manual_seed(1)
    pc, pr = (
        -30 * torch.rand(8, generator=g, dtype=torch.float64),
        -30 * torch.rand(8, generator=g, dtype=torch.float64),
    )
    out = hdpo_loss(pc, pr, pc.clone(), pr.clone(), alpha=1.0, beta=0.1)
    assert out.losses.tolist() == pytest.approx([math.log(2.0)] * 8, abs=1e-12)
    assert out.loss.item() == pytest.approx(math.log(2.0), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.5])
def test_step_zero_other_alpha(alpha):
    beta = 0.1
    pc, pr = _t(-10.0, -40.0, -7.5), _t(-25.0, -12.0, -7.5)
    out = hdpo_loss(pc, pr, pc.clone(), pr.clone(), alpha=alpha, beta=beta)
    expected = [_neg_log_sigmoid(beta * (alpha - 1.0) * (a - b)) for a, b in zip(pc.tolist(), pr.tolist(), strict=True)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)
    # Not ln 2 unless the two completions have the same log-prob (the last pair).
    assert out.losses[0].item() != pytest.approx(math.log(2.0), abs=1e-6)
    assert out.losses[2].item() == pytest.approx(math.log(2.0), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_gradient_signs(alpha):
    beta = 0.1
    pc, pr = _t(-10.0, -20.0, grad=True), _t(-12.0, -15.0, grad=True)
    rc, rr = _t(-11.0, -18.0), _t(-11.0, -16.0)
    hdpo_loss(pc, pr, rc, rr, alpha=alpha, beta=beta).loss.backward()
    assert (pc.grad < 0).all()
    assert (pr.grad > 0).all()
    # Closed form: d mean-loss / d pc_i = -sigmoid(-z_i) * beta * alpha / B.
    for i in range(2):
        z = beta * ((alpha * pc[i].item() - rc[i].item()) - (alpha * pr[i].item() - rr[i].item()))
        sig_neg = 1.0 / (1.0 + math.exp(z))
        assert pc.grad[i].item() == pytest.approx(-sig_neg * beta * alpha / 2, abs=1e-12)
        assert pr.grad[i].item() == pytest.approx(sig_neg * beta * alpha / 2, abs=1e-12)


def test_gradient_scales_with_alpha_at_same_z():
    beta = 0.1
    pc_val, pr_val, rr_val = -10.0, -12.0, -11.0
    target_z = 0.3

    def grads(alpha: float) -> tuple[float, float, float]:
        # Solve rc so that z = beta*((alpha*pc - rc) - (alpha*pr - rr)) == target_z.
        rc_val = alpha * pc_val - (target_z / beta + alpha * pr_val - rr_val)
        pc, pr = _t(pc_val, grad=True), _t(pr_val, grad=True)
        out = hdpo_loss(pc, pr, _t(rc_val), _t(rr_val), alpha=alpha, beta=beta)
        out.loss.backward()
        z = (out.chosen_rewards - out.rejected_rewards).item()
        return pc.grad.item(), pr.grad.item(), z

    g_half, r_half, z_half = grads(0.5)
    g_one, r_one, z_one = grads(1.0)
    assert z_half == pytest.approx(target_z, abs=1e-12)
    assert z_one == pytest.approx(target_z, abs=1e-12)
    assert g_half == pytest.approx(0.5 * g_one, rel=1e-12)
    assert r_half == pytest.approx(0.5 * r_one, rel=1e-12)
    assert g_one == pytest.approx(-beta / (1.0 + math.exp(target_z)), rel=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing(eps):
    alpha, beta = 0.8, 0.2
    values = dict(pc=(-10.0, -20.0, -5.0), pr=(-12.0, -15.0, -9.0), rc=(-11.0, -18.0, -6.0), rr=(-11.0, -16.0, -8.0))
    out = hdpo_loss(
        _t(*values["pc"]),
        _t(*values["pr"]),
        _t(*values["rc"]),
        _t(*values["rr"]),
        alpha=alpha,
        beta=beta,
        label_smoothing=eps,
    )
    expected = []
    for pc, pr, rc, rr in zip(*values.values(), strict=True):
        z = beta * ((alpha * pc - rc) - (alpha * pr - rr))
        # -(1-e) log sigmoid(z) - e log sigmoid(-z)
        expected.append(-(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z))))
        assert expected[-1] == pytest.approx(_expected_pair(pc, pr, rc, rr, alpha, beta, eps)[0], abs=1e-12)
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-12)


def test_label_smoothing_changes_loss():
    args = (_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0))
    plain = hdpo_loss(*args, alpha=1.0, beta=0.1).loss.item()
    smoothed = hdpo_loss(*args, alpha=1.0, beta=0.1, label_smoothing=0.2).loss.item()
    assert smoothed > plain  # z > 0 here, so the flipped-label term adds loss


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=0.0, beta=0.1),
        dict(alpha=-1.0, beta=0.1),
        dict(alpha=1.0, beta=0.0),
        dict(alpha=1.0, beta=-0.5),
        dict(alpha=1.0, beta=0.1, label_smoothing=0.5),
        dict(alpha=1.0, beta=0.1, label_smoothing=-0.1),
    ],
)
def test_invalid_hyperparameters(kwargs):
    x = _t(-1.0, -2.0)
    with pytest.raises(ValueError):
        hdpo_loss(x, x, x, x, **kwargs)


def test_shape_mismatch():
    a, b = _t(-1.0, -2.0), _t(-1.0, -2.0, -3.0)
    with pytest.raises(ValueError):
        hdpo_loss(a, b, a, a, alpha=1.0, beta=0.1)
    with pytest.raises(ValueError):
        hdpo_loss(a, a, a, b, alpha=1.0, beta=0.1)
    m = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError):  # same shapes, but not (B,)
        hdpo_loss(m, m, m, m, alpha=1.0, beta=0.1)


def test_rewards_are_detached():
    pc, pr = _t(-10.0, -20.0, grad=True), _t(-12.0, -15.0, grad=True)
    out = hdpo_loss(pc, pr, _t(-11.0, -18.0), _t(-11.0, -16.0), alpha=0.9, beta=0.1)
    assert out.loss.requires_grad
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad
    assert not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.grad_fn is None and out.rejected_rewards.grad_fn is None


def test_ref_logps_get_no_gradient_needed():
    # The reference log-probs come from another process without grad; the loss must still backprop.
    pc, pr = _t(-3.0, grad=True), _t(-4.0, grad=True)
    out = hdpo_loss(
        pc,
        pr,
        torch.tensor([-3.5], dtype=torch.float32),
        torch.tensor([-3.5], dtype=torch.float32),
        alpha=1.0,
        beta=0.1,
    )
    out.loss.backward()
    assert pc.grad is not None and pr.grad is not None
