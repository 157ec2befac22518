"""Mean and 95 % confidence interval of a few per-seed scores (Student-t, n - 1 degrees of freedom)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile: ``df`` = 2 gives 4.303 (three seeds)."""
    from scipy.stats import t  # scipy comes with scikit-learn, a dependency

    return float(t.ppf(0.5 + level / 2, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """``mean``, sample ``sd``, ``ci`` half-width ``t * sd / sqrt(n)`` and ``n``; no interval for n < 2."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None, "t": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None, "t": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = t_quantile(n - 1, level)
    return {"n": n, "mean": mean, "sd": sd, "ci": t * sd / math.sqrt(n), "t": t}


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of equal means (None when either side has < 2 values or no spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind

    if len(set(a)) == 1 and len(set(b)) == 1:
        return 1.0 if a[0] == b[0] else 0.0
    return float(ttest_ind(a, b, equal_var=False).pvalue)
