"""The statistics of a table: mean ± sample std over seeds; each cell's paired difference to its
reference (per seed) with a Student-t interval and the paired t-test's p-value; Holm's correction
of a table's p-values; two one-sided tests (TOST) for a claim of no difference; the verdict that
reads them. Quantiles and tail probabilities come from scipy.stats."""
import math
import statistics
from typing import Dict, Hashable, Iterable, List, Optional

from scipy import stats as st

ALPHA = 0.05          # every test's level (written out: 1 − 0.95 is 0.050000000000000044 in floating point)
LEVEL = 1 - ALPHA     # two-sided intervals: 95 %
MIN_PAIRS = 3         # fewer pairs give no verdict: one pair has no spread, two a t quantile of 12.7
ZERO_WIDTH = 1e-9     # pp: a spread below this is float noise of identical differences (errors are
                      # multiples of 0.01 pp on 10,000 test images)


def t_critical(df: int, level: float = LEVEL) -> float:
    """The two-sided critical value of Student's t: P(|T| <= t) = level."""
    return float(st.t.ppf(0.5 + level / 2, df))


def mean_std(values: Iterable[float]):
    """(mean, sample std or None for one value, n); (None, None, 0) for none."""
    values = list(values)
    n = len(values)
    if n == 0:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else None), n


def paired_difference(values: Dict[int, float], ref: Dict[int, float], level: float = LEVEL) -> Optional[dict]:
    """The per-seed differences values[s] − ref[s] over the seeds both have: their mean, sample std
    `sd`, the two-sided Student-t interval [lo, hi] of half-width `half` (n >= 2) and the paired
    t-test's two-sided p-value against 0 (`p`; None where the spread is zero: `zero_width`).
    None for no shared seed."""
    seeds = sorted(set(values) & set(ref))
    diffs = [values[s] - ref[s] for s in seeds]
    if not diffs:
        return None
    n, mean = len(diffs), statistics.fmean(diffs)
    out = {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None, "half": None, "p": None,
           "zero_width": False, "seeds": seeds}
    if n < 2:
        return out
    sd = statistics.stdev(diffs)
    if sd < ZERO_WIDTH:  # identical differences: no spread to build an interval or a test from
        return dict(out, sd=0.0, lo=mean, hi=mean, half=0.0, zero_width=True)
    half = t_critical(n - 1, level) * sd / math.sqrt(n)
    p = 2 * st.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    return dict(out, sd=sd, lo=mean - half, hi=mean + half, half=half, p=float(p))


def tost_p(delta: dict, margin: float) -> float:
    """Two one-sided paired t-tests of |mean difference| >= margin (H0) against equivalence within
    ±margin: the larger of P(T >= (d̄ + m)/se) and P(T <= (d̄ − m)/se), df = n − 1. Equivalence at
    level α is shown where it is below α (the same as the (1 − 2α) interval lying inside ±margin)."""
    n, mean, sd = delta["n"], delta["mean"], delta["sd"]
    se = sd / math.sqrt(n)
    return float(max(st.t.sf((mean + margin) / se, n - 1), st.t.cdf((mean - margin) / se, n - 1)))


def holm(p: Dict[Hashable, float]) -> Dict[Hashable, float]:
    """Holm–Bonferroni adjusted p-values of a family of tests: the i-th smallest of m is multiplied
    by m − i + 1 (i from 1), made non-decreasing in that order and capped at 1. Rejecting where the
    adjusted value is below α keeps the chance of any false rejection in the family below α."""
    out, running = {}, 0.0
    order: List[Hashable] = sorted(p, key=p.get)
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p[key]))
        out[key] = running
    return out


def verdict(claim: Optional[str], delta: Optional[dict], p_adjusted: Optional[float] = None,
            paper_delta: Optional[float] = None) -> str:
    """The paper's claim about a cell against our paired difference. claim "<": the cell beats the
    reference (lower error); ">": it is worse; "=": no difference (judged by TOST: pass its
    adjusted p). `p_adjusted`: the cell's p-value after the table's correction."""
    if claim is None:
        return "no claim"
    if delta is None:
        return "missing"
    if delta["n"] < MIN_PAIRS:
        return f"n = {delta['n']} (< {MIN_PAIRS} pairs)"
    if delta["zero_width"]:
        return "zero-width interval"
    significant = p_adjusted is not None and p_adjusted < ALPHA
    if claim == "=":
        return "equivalent" if significant else "not shown equivalent"
    if significant:
        return "holds" if (delta["mean"] < 0) == (claim == "<") else "fails"
    if paper_delta is not None and abs(paper_delta) < delta["half"]:
        return "underpowered"  # the paper's own effect is smaller than what this n and spread can see
    return "within noise"


def curves(runs: List[dict], key: str):
    """Per-epoch mean, min and max of `key` over the runs' histories (cut to the shortest)."""
    length = min(len(r["history"]) for r in runs)
    epochs = [runs[0]["history"][i]["epoch"] for i in range(length)]
    values = [[r["history"][i][key] for r in runs] for i in range(length)]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]
