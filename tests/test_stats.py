"""Bootstrap intervals over scenarios cover the truth at the stated rate; paired differences
and permutation p-values; fluent accuracy."""

from __future__ import annotations

import numpy as np

from emocircuits.stats import bootstrap_mean, fluent, paired_difference


def _clustered(rng, n_units, per_unit, p, spread):
    """Bernoulli rows whose rate varies by unit (intra-scenario correlation)."""
    rates = np.clip(p + spread * rng.standard_normal(n_units), 0.01, 0.99)
    vals = (rng.random((n_units, per_unit)) < rates[:, None]).astype(float).ravel()
    units = np.repeat(np.arange(n_units), per_unit)
    return vals, units, rates


def test_bootstrap_interval_covers_the_true_rate_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits, trials = 0, 300
    for t in range(trials):
        # the true mean of the generating process: E[rate] estimated by a huge draw
        vals, units, _ = _clustered(rng, 40, 18, 0.4, 0.15)
        est = bootstrap_mean(vals, units, n_boot=400, seed=t)
        hits += est.low <= 0.4 <= est.high
    cover = hits / trials
    assert 0.90 <= cover <= 0.99, cover  # percentile bootstrap with 40 clusters: ~0.93–0.95


def test_resampling_texts_instead_of_scenarios_would_undercover():
    """With strong clustering, treating every text as independent gives too-narrow intervals:
    the scenario-level interval is wider, as it must be."""
    rng = np.random.default_rng(1)
    vals, units, _ = _clustered(rng, 20, 18, 0.5, 0.3)
    by_scenario = bootstrap_mean(vals, units, n_boot=1000)
    by_text = bootstrap_mean(vals, np.arange(len(vals)), n_boot=1000)
    assert (by_scenario.high - by_scenario.low) > 1.5 * (by_text.high - by_text.low)
    assert by_scenario.n == 360 and by_scenario.n_units == 20


def test_paired_difference_and_permutation_p():
    rng = np.random.default_rng(2)
    units = np.repeat(np.arange(30), 18)
    base = (rng.random(units.size) < 0.3).astype(float)
    better = np.maximum(base, (rng.random(units.size) < 0.3)).astype(float)  # strictly ≥
    d = paired_difference(better, base, units, n_perm=2000)
    assert d.value > 0.15 and d.low > 0 and d.p_value < 0.01
    same = paired_difference(base, base[rng.permutation(base.size)], units, n_perm=2000)
    assert same.low < 0 < same.high and same.p_value > 0.05
    # exact value against a plain loop
    assert abs(d.value - float(np.mean(better - base))) < 1e-12


def test_exact_sign_flip_p_against_a_brute_force_loop():
    """k ≤ 16 units: p over all 2^k sign patterns, checked by an itertools loop; 5 equal
    positive units give the smallest possible p, 2/32, which is not below 0.05."""
    import itertools

    from emocircuits.stats import smallest_p

    rng = np.random.default_rng(5)
    units = np.repeat(np.arange(7), 4)
    a, b = rng.random(28), rng.random(28)
    d = paired_difference(a, b, units)
    sums = np.array([np.sum((a - b)[units == u]) for u in range(7)])
    hits = sum(abs(np.dot(s, sums)) >= abs(sums.sum()) - 1e-12 for s in itertools.product((-1, 1), repeat=7))
    assert d.p_value == hits / 2 ** 7
    five = paired_difference(np.ones(10), np.zeros(10), np.repeat(np.arange(5), 2))
    assert five.p_value == smallest_p(5) == 2 / 32 and five.low == five.high == 1.0
    assert smallest_p(10) < 0.01 and smallest_p(40) == 0.0


def test_verdict_says_when_too_few_scenarios_for_significance():
    from emocircuits.evaluate import compare_methods

    def ev(name, match):
        rows = [{"emotion": "anger", "valence": v, "scenario": f"s{i}", "text": "I am angry.", "match": match,
                 "perplexity": 3.0, "repeated_3gram_rate": 0.0} for i in range(5) for v in ("positive", "negative")]
        return type("E", (), {"rows": rows, "readout": None, "fluency": {"perplexity_geomean": 3.0}})()

    cmp = compare_methods({"none": ev("none", False), "circuit": ev("circuit", True),
                           "random circuit 0": ev("r", False)})
    v = cmp.verdicts[0]
    assert v.startswith("circuit not distinguishable from random circuit") and "+100.0 points" in v
    assert "too few scenarios for p < 0.05 (the smallest possible p is 0.062)" in v


def test_fluent_accuracy_on_constructed_rows():
    rows = [
        {"match": True, "text": "I am so angry about this.", "perplexity": 4.0, "repeated_3gram_rate": 0.0},
        {"match": True, "text": "commence commence commence", "perplexity": 80.0, "repeated_3gram_rate": 0.0},
        {"match": True, "text": "Hell Hell Hell Hell Hell", "perplexity": 5.0, "repeated_3gram_rate": 0.8},
        {"match": True, "text": "   ", "perplexity": 2.0, "repeated_3gram_rate": 0.0},
        {"match": False, "text": "A calm reply.", "perplexity": 3.0, "repeated_3gram_rate": 0.0},
        {"match": True, "text": "x", "perplexity": float("nan"), "repeated_3gram_rate": 0.0},
    ]
    assert fluent(rows, reference_perplexity=3.0) == [True, False, False, False, False, False]
    assert fluent(rows, reference_perplexity=30.0)[1] is True
