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


def agree(values: Sequence[float]) -> bool:
    """The seeds agree: every value is the same up to float rounding (no spread to test)."""
    return len(values) > 0 and max(values) - min(values) <= 1e-9 * max(1.0, abs(max(values)))


def welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of equal means (None when either side has < 2 values).

    Computed here rather than by ``scipy.stats.ttest_ind``: when one side's seeds agree (all equal up to
    rounding) scipy warns of catastrophic cancellation; such a side is taken as exact (variance 0)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import t

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = 0.0 if agree(a) else sum((v - ma) ** 2 for v in a) / (len(a) - 1)
    vb = 0.0 if agree(b) else sum((v - mb) ** 2 for v in b) / (len(b) - 1)
    se2 = va / len(a) + vb / len(b)
    if se2 == 0.0:  # both sides agree: the means are equal or they are not
        return 1.0 if abs(ma - mb) <= 1e-9 * max(1.0, abs(ma)) else 0.0
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    return float(2 * t.sf(abs(ma - mb) / math.sqrt(se2), df))
