"""pass@k: the stable product form equals 1 - C(n-c, k) / C(n, k), checked by hand and against math.comb."""

from __future__ import annotations

import math

import pytest

from hdpo_ray.eval.passk import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (2, 1, 1, 1 / 2),  # one draw from {right, wrong}
        (3, 1, 2, 2 / 3),  # 3 pairs from 3 samples, 2 of them hold the right one: 1 - C(2,2)/C(3,2) = 1 - 1/3
        (4, 2, 2, 5 / 6),  # 6 pairs, only {wrong, wrong} fails: 1 - 1/6
        (5, 0, 1, 0.0),  # nothing correct: the product over an empty range is 1
        (5, 0, 5, 0.0),
        (5, 5, 1, 1.0),  # c = n
        (5, 5, 5, 1.0),
        (5, 3, 3, 1.0),  # n - c = 2 < k = 3: every triple holds a correct sample
        (10, 3, 1, 3 / 10),  # k = 1 is the plain fraction correct
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (
            200,
            1,
            100,
            1 / 2,
        ),  # 1 - C(199,100)/C(200,100) = 1 - 100/200; C(200,100) ~ 9e58, the product form stays exact
    ],
)
def test_hand_derived_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_equals_the_combinatorial_form_on_a_grid():
    for n in range(1, 21):
        for c in range(n + 1):
            for k in range(1, n + 1):
                combinatorial = 1 - math.comb(n - c, k) / math.comb(n, k)  # math.comb is 0 when k > n - c
                assert pass_at_k(n, c, k) == pytest.approx(combinatorial, abs=1e-12), (n, c, k)


def test_returns_a_python_float():
    assert type(pass_at_k(4, 2, 2)) is float and type(pass_at_k(4, 4, 2)) is float


@pytest.mark.parametrize(
    "n, c, k, message",
    [
        (5, 2, 6, "k=6 is more than the n=5"),
        (5, 6, 1, "c=6 correct samples is more than the n=5"),
        (-1, 0, 1, "n >= 0"),
        (5, -1, 1, "c >= 0"),
        (5, 1, 0, "k >= 1"),
        (5, 1, -2, "k >= 1"),
    ],
)
def test_bad_input_raises_one_line(n, c, k, message):
    with pytest.raises(ValueError, match=message) as err:
        pass_at_k(n, c, k)
    assert "\n" not in str(err.value)


def test_mean_over_problems():
    # (1/2 + 1/3 + 0) / 3 = (3/6 + 2/6) / 3 = 5/18
    assert mean_pass_at_k([(2, 1), (3, 1), (5, 0)], k=1) == pytest.approx(5 / 18)
    # k = 2: (1 [n - c = 1 < 2] + 2/3 + 0) / 3 = 5/9
    assert mean_pass_at_k([(2, 1), (3, 1), (5, 0)], k=2) == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], k=1)
    with pytest.raises(ValueError, match="k=3 is more than the n=2"):
        mean_pass_at_k([(2, 1), (3, 1)], k=3)
