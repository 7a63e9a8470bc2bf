"""Uncertainty for accuracies: bootstrap intervals over scenarios, paired differences and
permutation p-values, and fluent accuracy.

The unit of independence is the scenario (an SEV skeleton): its three events and every target
emotion share it, so intervals resample scenarios, not texts.

* ``bootstrap_mean(values, units)``: mean of ``values`` with a 95 % percentile interval from
  resampling the units with replacement (B draws).
* ``paired_difference(a, b, units)``: mean(a) − mean(b) over paired rows, its bootstrap
  interval, and a two-sided sign-flip permutation p-value at the unit level (under H0 the two
  methods are exchangeable within a scenario: each scenario's summed difference flips sign).
* ``fluent(rows, reference_perplexity)``: a text counts only if the judge matched it, it is not
  empty, its perplexity under the unmodified model is ≤ ``max_ratio`` × the reference, and its
  repeated-3-gram rate is below ``max_repeat``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .results import Result


@dataclass
class Estimate(Result):
    """A mean with its 95 % bootstrap interval over ``n_units`` units (``n`` rows)."""

    value: float
    low: float
    high: float
    n: int
    n_units: int
    p_value: float | None = None  # paired differences only

    def __str__(self) -> str:
        p = f", p = {self.p_value:.3g}" if self.p_value is not None else ""
        return (f"{100 * self.value:.1f} % [{100 * self.low:.1f}, {100 * self.high:.1f}] "
                f"(n = {self.n}, {self.n_units} scenarios{p})")


def _grouped(values: Sequence[float], units: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums and counts (units in order of first appearance)."""
    if len(values) != len(units):
        raise ValueError(f"{len(values)} values but {len(units)} units")
    if not len(values):
        raise ValueError("no values")
    index: dict = {}
    ids = np.array([index.setdefault(u, len(index)) for u in units])
    v = np.asarray(values, dtype=float)
    sums = np.bincount(ids, weights=v, minlength=len(index))
    counts = np.bincount(ids, minlength=len(index)).astype(float)
    return sums, counts


def bootstrap_mean(values: Sequence[float], units: Sequence, *, n_boot: int = 2000,
                   seed: int = 0, level: float = 0.95) -> Estimate:
    """mean(values) with a percentile interval from resampling units with replacement.

    Example::

        >>> est = bootstrap_mean([1, 0, 1, 1, 0, 1], ["s1", "s1", "s2", "s2", "s3", "s3"])
        >>> print(est)
        66.7 % [50.0, 100.0] (n = 6, 3 scenarios)
        >>> round(est.value, 3), est.low, est.high
        (0.667, 0.5, 1.0)
    """
    sums, counts = _grouped(values, units)
    k = len(sums)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, k, size=(n_boot, k))
    w = np.apply_along_axis(np.bincount, 1, draw, minlength=k)  # [B, k] multiplicities
    boot = (w @ sums) / (w @ counts)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(sums.sum() / counts.sum()), float(lo), float(hi), int(counts.sum()), k)


def paired_difference(a: Sequence[float], b: Sequence[float], units: Sequence, *,
                      n_boot: int = 2000, n_perm: int = 10000, seed: int = 0,
                      level: float = 0.95) -> Estimate:
    """mean(a − b) over paired rows, bootstrap interval over units, sign-flip permutation p.

    The p-value flips the sign of each unit's summed difference: exactly over all 2^k sign
    patterns when there are k ≤ ``EXACT_UNITS`` units (the smallest possible p is then
    2 / 2^k, so 5 scenarios can never give p < 0.05), else over ``n_perm`` random patterns.

    Example::

        >>> units = ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4"]
        >>> print(paired_difference([1, 1, 1, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0, 1, 1], units))
        50.0 % [12.5, 87.5] (n = 8, 4 scenarios, p = 0.25)
    """
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} rows")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    est = bootstrap_mean(d, units, n_boot=n_boot, seed=seed, level=level)
    sums, counts = _grouped(d, units)
    obs = abs(sums.sum())
    k = len(sums)
    if k <= EXACT_UNITS:
        signs = 1.0 - 2.0 * ((np.arange(2 ** k)[:, None] >> np.arange(k)) & 1)  # every pattern
        est.p_value = float(np.mean(np.abs(signs @ sums) >= obs - 1e-12))
    else:
        rng = np.random.default_rng(seed + 1)
        signs = rng.choice([-1.0, 1.0], size=(n_perm, k))
        perm = np.abs(signs @ sums)
        est.p_value = float((1 + np.sum(perm >= obs - 1e-12)) / (n_perm + 1))
    return est


EXACT_UNITS = 16  # up to this many units the sign-flip test enumerates every pattern


def smallest_p(n_units: int) -> float:
    """The smallest two-sided p-value the sign-flip test can give with ``n_units`` units."""
    return 2.0 / 2 ** n_units if n_units <= EXACT_UNITS else 0.0


def fluent(rows: Sequence[dict], reference_perplexity: float, *, max_ratio: float = 3.0,
           max_repeat: float = 0.3) -> list[bool]:
    """Per row: judged a match, non-empty, perplexity ≤ max_ratio × reference, rep3 < max_repeat."""
    out = []
    for r in rows:
        ppl = r.get("perplexity")
        rep = r.get("repeated_3gram_rate")
        ok = (bool(r.get("match")) and bool(str(r.get("text", "")).strip())
              and ppl is not None and math.isfinite(ppl) and ppl <= max_ratio * reference_perplexity
              and rep is not None and rep < max_repeat)
        out.append(ok)
    return out


def scenario_of(row: dict) -> str:
    """The scenario id of an evaluation row (its ``scenario`` field, else the key's first part)."""
    if row.get("scenario") is not None:
        return str(row["scenario"])
    key = row.get("key")
    if key is None:
        raise ValueError("row has neither 'scenario' nor 'key'")
    return str(key).split("__")[0]
