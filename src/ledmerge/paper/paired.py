"""Paired statistics of LED against each baseline merge: the paper's paired table (`build.paired_table`).

Every model of a run answers the same prompts, so two merges are compared prompt by prompt rather than by two
separate Wilson intervals:

- **Per prompt, one run.** For a rate (harmful rate, over-refusal, empty replies, utility refusals, each utility
  column) the evaluation records each prompt's 0/1 outcome (metrics.json's `rates.<metric>.outcomes`, with the hash
  of the prompts they are over: `ledmerge.evaluation.runner._rate`). Of the n prompts, b count for LED and not for
  the baseline, c for the baseline and not for LED (the discordant pairs); the difference of the rates is
  (b − c) / n. `mcnemar_exact`: the two-sided exact McNemar test, under H0 each discordant pair is LED's with
  probability 1/2, p = min(1, 2 · P(Binomial(b + c, 1/2) ≤ min(b, c))). `bootstrap_difference`: the paired
  bootstrap percentile interval of the difference: the n prompts resampled with replacement, pairs kept together,
  `resamples` times from a generator seeded with the config's seed.
- **Across zoo seeds.** Where the sweeps repeat LED and a baseline over zoo seeds (a `zoo_seed` sweep of each), the
  per-seed differences d_s = LED_s − baseline_s, paired by seed: their mean with the t interval
  mean ± t_{(1+level)/2, m−1} · sd / √m over m seeds, and the paired t test's two-sided p.

Standard library and numpy only: the Student t distribution is computed here (`t_quantile`, `t_sf2`, through the
regularised incomplete beta function) rather than taken from a package the project does not depend on directly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import LedmergeError
from ..layout import ZOO_SEED, point_merge

LEVEL = 0.95
RESAMPLES = 10_000
# The columns of `per_prompt` and `across_seeds` (one row per LED, baseline and metric): n is the number of prompts
# (per prompt) or of zoo seeds (across seeds); b, c the discordant counts (per prompt only); lo, hi the interval of
# diff; p the test's two-sided p-value (exact McNemar, paired t).
COLUMNS = ["led", "baseline", "metric", "n", "led_rate", "baseline_rate", "diff", "lo", "hi", "b", "c", "p"]


# ---------------------------------------------------------------- the statistics

def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: 2 · Σ_{k ≤ min(b, c)} C(b + c, k) / 2^(b + c),
    at most 1 (1 when there is no discordant pair)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def discordant(led, baseline) -> tuple[int, int]:
    """(b, c) of two 0/1 outcome vectors over the same prompts: prompts counted for `led` only, for `baseline`
    only."""
    led, baseline = np.asarray(led, dtype=bool), np.asarray(baseline, dtype=bool)
    if led.shape != baseline.shape:
        raise ValueError(f"paired outcomes differ in length: {led.shape} and {baseline.shape}")
    return int((led & ~baseline).sum()), int((~led & baseline).sum())


def bootstrap_difference(b: int, c: int, n: int, seed: int, resamples: int = RESAMPLES,
                         level: float = LEVEL) -> tuple[float, float]:
    """Paired bootstrap percentile interval of the difference of two rates over the same n prompts, (b − c) / n.

    Resampling n prompts with replacement, pairs kept together, the difference of a resample depends only on how
    many of its prompts are LED-only (weight b/n) and baseline-only (c/n) pairs: one multinomial draw per resample,
    which is the prompt-index bootstrap exactly, at no cost in n. Percentiles (1 ∓ level)/2 of the `resamples`
    differences (numpy's linear interpolation); `seed` seeds numpy's default generator, so a seed gives the same
    bits. No prompts: NaN."""
    if n <= 0:
        return math.nan, math.nan
    if b < 0 or c < 0 or b + c > n:
        raise ValueError(f"discordant counts b={b}, c={c} do not fit n={n} prompts")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [b / n, c / n, max(0.0, 1 - (b + c) / n)], size=resamples)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail of Student's t with `df` degrees of freedom: P(|T| ≥ |t|) = I_{df/(df+t²)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (q in (0, 1)), by bisection on the tail."""
    if not 0 < q < 1 or df <= 0:
        raise ValueError(f"t quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
    if q == 0.5:
        return 0.0
    target = 2 * (1 - q) if q > 0.5 else 2 * q  # two-sided tail at the quantile's magnitude
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) > target:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    t = (lo + hi) / 2
    return t if q > 0.5 else -t


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, low, high, p) of paired differences: the mean with its t interval mean ± t_{(1+level)/2, m−1} · sd/√m
    (sd: the sample standard deviation of the m values) and the two-sided p of the one-sample t test of mean 0.
    Fewer than 2 values: no interval (NaN); all values equal: a zero-width interval and no p (NaN)."""
    values = np.asarray(values, dtype=float)
    m = len(values)
    mean = float(values.mean()) if m else math.nan
    if m < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(values.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal differences (up to rounding): no spread to test against
        return mean, mean, mean, math.nan
    half = t_quantile((1 + level) / 2, m - 1) * sd / math.sqrt(m)
    return mean, mean - half, mean + half, t_sf2(mean / (sd / math.sqrt(m)), m - 1)


# ---------------------------------------------------------------- the comparisons

def outcomes_of(report: dict, metric: str) -> tuple[np.ndarray, str] | None:
    """A metrics.json's per-prompt outcomes of `metric` (a 0/1 vector) and the hash of its prompts; None when the
    file records none (a metric it lacks, or an evaluation from before outcomes were recorded)."""
    rate = report.get("rates", {}).get(metric)
    if not rate or "outcomes" not in rate:
        return None
    flags = np.frombuffer(rate["outcomes"].encode(), dtype=np.uint8) == ord("1")
    return flags, rate.get("prompts", "")


def per_prompt(reports: dict[str, dict], led: list[str], baselines: list[str], metrics: list[str], seed: int,
               resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[pd.DataFrame, list[str]]:
    """One row per (LED merge, baseline, metric) with per-prompt outcomes in both models' metrics.json (`COLUMNS`),
    and the metrics left out for want of them. Two models whose outcomes are over different prompts are an error."""
    rows, missing = [], []
    for m in metrics:
        if any(outcomes_of(reports[name], m) is None for name in [*led, *baselines]):
            missing.append(m)
    for a in led:
        for base in baselines:
            for m in metrics:
                if m in missing:
                    continue
                (x, px), (y, py) = outcomes_of(reports[a], m), outcomes_of(reports[base], m)
                if px != py or len(x) != len(y):
                    raise LedmergeError(f"{a} and {base} were evaluated on different prompts for {m} ({len(x)} and "
                                        f"{len(y)} prompts, or other ones): rerun their evaluations with one config")
                b, c = discordant(x, y)
                n = len(x)
                lo, hi = bootstrap_difference(b, c, n, seed, resamples, level)
                rows.append(dict(led=a, baseline=base, metric=m, n=n, led_rate=x.mean() if n else math.nan,
                                 baseline_rate=y.mean() if n else math.nan, diff=(b - c) / n if n else math.nan,
                                 lo=lo, hi=hi, b=b, c=c, p=mcnemar_exact(b, c)))
    return pd.DataFrame(rows, columns=COLUMNS), missing


def _seed_configs(sweeps: pd.DataFrame, params: list[str]) -> dict[tuple, pd.DataFrame]:
    """The points of sweeps repeated over zoo seeds, by configuration: (merge, ((param, value), ...)) -> its rows,
    one per seed. A configuration is the merge and the values of the parameters its sweep varies besides the seed."""
    configs: dict[tuple, list] = {}
    for _, g in sweeps.groupby("sweep", sort=False):
        if g[ZOO_SEED].nunique(dropna=True) < 2:
            continue
        varied = [c for c in params if c != ZOO_SEED and g[c].nunique(dropna=True) > 1]
        for _, row in g.iterrows():
            key = (point_merge(row["model"]), tuple((c, row[c]) for c in varied))
            configs.setdefault(key, []).append(row)
    return {k: pd.DataFrame(v).drop_duplicates("model").drop_duplicates(ZOO_SEED) for k, v in configs.items()}


def config_label(key: tuple) -> str:
    """led, (("location", "snip"),) -> "led (location snip)"."""
    merge, values = key
    return merge + (" (" + ", ".join(f"{c} {v:g}" if isinstance(v, float) else f"{c} {v}" for c, v in values) + ")"
                    if values else "")


def across_seeds(sweeps: pd.DataFrame, led: list[str], params: list[str], metrics: list[str],
                 level: float = LEVEL) -> pd.DataFrame:
    """One row per (LED configuration, baseline configuration, metric) that the sweeps repeat over at least two
    common zoo seeds (`COLUMNS`; n: the seeds): the mean per-seed difference, its t interval and the paired t test's
    p. `params`: sweeps.csv's swept-parameter columns."""
    if sweeps.empty or ZOO_SEED not in sweeps:
        return pd.DataFrame(columns=COLUMNS)
    configs = _seed_configs(sweeps, [c for c in params if c in sweeps])
    rows = []
    for a_key, a in configs.items():
        if a_key[0] not in led:
            continue
        for b_key, b in configs.items():
            if b_key[0] in led:
                continue
            both = a.merge(b, on=ZOO_SEED, suffixes=("_led", "_base")).sort_values(ZOO_SEED)
            if len(both) < 2:
                continue
            for m in metrics:
                x, y = both[f"{m}_led"].astype(float), both[f"{m}_base"].astype(float)
                keep = x.notna() & y.notna()
                mean, lo, hi, p = t_interval((x - y)[keep], level)
                rows.append(dict(led=config_label(a_key), baseline=config_label(b_key), metric=m,
                                 n=int(keep.sum()), led_rate=x[keep].mean(), baseline_rate=y[keep].mean(),
                                 diff=mean, lo=lo, hi=hi, b=math.nan, c=math.nan, p=p))
    return pd.DataFrame(rows, columns=COLUMNS)
