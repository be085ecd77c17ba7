"""pass@k: the chance that at least one of k samples drawn from n generated ones is correct.

The evaluation generates n completions per problem and counts the c correct ones. Reporting the
fraction of problems whose first k samples contain a correct one is noisy; Chen et al. 2021
("Evaluating Large Language Models Trained on Code", the HumanEval paper) give the unbiased
estimator over all n samples instead:

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

C(n, k) overflows floats for large n, so we use the paper's numerically stable product form

    1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

which is 1 exactly when n - c < k (every k-subset then holds a correct sample).
"""

from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples of which `c` are correct; 0 <= c <= n, 1 <= k <= n."""
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"pass@k needs n >= 0, c >= 0 and k >= 1 (got n={n}, c={c}, k={k})")
    if c > n:
        raise ValueError(f"pass@k: c={c} correct samples is more than the n={n} generated")
    if k > n:
        raise ValueError(f"pass@k: k={k} is more than the n={n} samples generated per problem (generate at least k)")
    if n - c < k:
        # too few wrong samples to fill a k-subset (the product below holds the factor 1 - k / k = 0 and agrees)
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean of pass_at_k over problems, `counts` = [(n, c), ...] one per problem; raises ValueError when empty."""
    if not counts:
        raise ValueError("pass@k over no problems is undefined")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
