"""Numbers over several seeds: their mean and spread, and whether two
optimizers' numbers differ by more than the seed-to-seed noise.

The rule the docs apply: an ordering of two optimizers is claimed only
where Welch's t-test on their per-seed results gives p < ALPHA; otherwise
they are "within noise".
"""

import math
import statistics

ALPHA = 0.01


def mean_sd(values):
    """`(mean, sample standard deviation)` of `values`; the deviation is
    nan for a single value."""
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), sd


def mean_sd_text(values, digits=3):
    """`values` as "mean ± sd", or the mean alone for one value."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def welch_p_value(a, b):
    """The two-sided p-value of Welch's t-test that `a` and `b` have the
    same mean (unequal variances); nan with fewer than two values in
    either, and 1 or 0 where both have no spread."""
    from scipy import stats

    a, b = list(a), list(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if statistics.stdev(a) == statistics.stdev(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def verdict(a, b, lower_is_better=True):
    """How `a` compares with `b` under the rule: "better" or "worse" where
    p < ALPHA, "within noise" otherwise (and with too few seeds to tell),
    with the p-value."""
    p = welch_p_value(a, b)
    if math.isnan(p) or p >= ALPHA:
        return "within noise" if math.isnan(p) else f"within noise (p={p:.2g})"
    a_lower = statistics.fmean(a) < statistics.fmean(b)
    return f"{'better' if a_lower == lower_is_better else 'worse'} (p={p:.2g})"
