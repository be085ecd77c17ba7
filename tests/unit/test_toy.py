"""Unit tests for hdpo_ray.toy: the single-Gaussian fit to a two-mode mixture under the H-DPO objective."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hdpo_ray.toy import DEFAULT_ALPHAS, DEFAULT_D, _main, fit_gaussian, fit_grid, mixture_logpdf, objective, run_toy

D = DEFAULT_D


@pytest.fixture(scope="module")
def grid() -> dict[float, dict[str, float]]:
    return {r["alpha"]: r for r in fit_grid(DEFAULT_ALPHAS, D)}


def test_mixture_logpdf_matches_hand_formula_numpy_and_torch():
    for x in (-3.0, 0.0, 0.5, 2.75, 9.0):
        expected = math.log(
            0.5 * math.exp(-0.5 * (x + D) ** 2) / math.sqrt(2 * math.pi)
            + 0.5 * math.exp(-0.5 * (x - D) ** 2) / math.sqrt(2 * math.pi)
        )
        assert float(mixture_logpdf(np.array(x), D)) == pytest.approx(expected, rel=1e-12)
        assert float(mixture_logpdf(torch.tensor(x, dtype=torch.float64), D)) == pytest.approx(expected, rel=1e-12)


def test_alpha_one_covers_both_modes(grid):
    r = grid[1.0]
    assert abs(r["mean"]) < 0.1
    # The reverse-KL covering optimum is wide but not quite d wide (sigma ~= 2.57 at d = 2.75), so
    # "spans both" is asserted as: far wider than one mode (std 1) and within 10% of d.
    assert r["std"] > 2.0
    assert r["std"] > 0.9 * D


@pytest.mark.parametrize("alpha", [0.8, 0.9])
def test_alpha_below_one_captures_single_mode(grid, alpha):
    r = grid[alpha]
    assert abs(abs(r["mean"]) - D) < 0.1
    assert r["std"] == pytest.approx(math.sqrt(alpha), rel=0.05)  # mode std is 1, so sqrt(alpha) * 1


def test_std_grows_strictly_with_alpha(grid):
    stds = [grid[a]["std"] for a in sorted(grid)]
    assert all(b > a for a, b in zip(stds, stds[1:], strict=False)), stds


@pytest.mark.parametrize("alpha", [0.8, 0.9, 1.0])
def test_global_choice_beats_other_regime(grid, alpha):
    r = grid[alpha]
    covering = abs(r["mean"]) < D / 2
    # Start in the other basin; the local fit must really land in the other regime for the check to mean anything.
    other = (
        fit_gaussian(alpha, D, init_mean=D, init_std=1.0)
        if covering
        else fit_gaussian(alpha, D, init_mean=0.0, init_std=D + 1.0)
    )
    assert (abs(other[0]) < D / 2) != covering
    assert r["objective"] <= objective(alpha, D, *other)
    assert r["objective"] == pytest.approx(objective(alpha, D, r["mean"], r["std"]), abs=1e-12)


def test_fit_is_deterministic():
    a = fit_gaussian(0.9, D, init_mean=0.0, init_std=1.0)
    b = fit_gaussian(0.9, D, init_mean=0.0, init_std=1.0)
    assert a == b


def test_run_toy_writes_png_md_json(tmp_path, capsys):
    alphas = (0.8, 1.0, 1.2)
    results = run_toy(str(tmp_path), alphas=alphas, d=D)
    assert [r["alpha"] for r in results] == list(alphas)
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [
        line
        for line in (tmp_path / "toy.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| α")
    ]
    assert len(rows) == len(alphas)
    assert "single mode" in rows[0] and "covers both" in rows[1]
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["d"] == D and [r["alpha"] for r in data["results"]] == list(alphas)
    assert "| 0.8 |" in capsys.readouterr().out


def test_module_entry_point_parses_args(tmp_path):
    _main(["--output-dir", str(tmp_path / "cli"), "--d", str(D), "--alphas", "0.9,1.0"])
    data = json.loads((tmp_path / "cli" / "toy.json").read_text())
    assert [r["regime"] for r in data["results"]] == ["single mode", "covers both"]
