"""Settings are chosen on validation, never on test: poisoning the test split changes the test
numbers but nothing that was chosen; the method comparison has intervals and verdicts."""

from __future__ import annotations

import dataclasses

import pytest

from emocircuits.data import load_sev, save_sev
from emocircuits.studies import load_config, run_pipeline

TINY = ["data.n_train=3", "data.n_validation=1", "data.n_test=2", "generation.max_new_tokens=4",
        "generation.min_new_tokens=0", "directions.keyword_control=false", "directions.n_folds=2",
        'run.emotions=["anger", "sadness", "happiness"]', "steering.strengths=[0.5, 4.0]",
        "circuits.lambdas=[1.0, 4.0]", "circuits.random_controls=2", "circuits.influence_alphas=[0.5]",
        "circuits.n_influence_scenarios=1", "circuits.budgets=[1, 2]",
        'control.methods=["vocabulary_bias", "circuit"]', "control.vocabulary_strengths=[1.0, 8.0]",
        "control.levels=[-1.0, 1.0]", "control.n_scenarios=1", "control.strengths=[1.0]",
        'run.stages=["steering", "circuits", "control"]']


@pytest.mark.slow
def test_poisoned_test_split_changes_nothing_chosen(tiny_llama, tmp_path):
    recs = list(load_sev("builtin:test"))
    poisoned = [dataclasses.replace(r, scenario="Xq zz " + r.scenario[::-1],
                                    event={v: "Furious disgusting terror! " * 3 for v in r.event})
                for r in recs]
    bad = tmp_path / "poisoned_test.jsonl"
    save_sev(poisoned, bad)
    a = run_pipeline(load_config("quick", TINY, model="tiny-llama"), tmp_path / "a", model=tiny_llama,
                     progress=False, report=False)
    b = run_pipeline(load_config("quick", [*TINY, f'data.test="{bad}"'], model="tiny-llama"),
                     tmp_path / "b", model=tiny_llama, progress=False, report=False)
    for st in ("steering", "circuits"):
        ra, rb = a.result(st), b.result(st)
        assert ra.chosen == rb.chosen, st
        assert ra.grid == rb.grid, st  # the validation grid is the same, number for number
    va, vb = a.result("control").methods["vocabulary_bias"], b.result("control").methods["vocabulary_bias"]
    assert va.setting == vb.setting and va.setting["chosen_on"] == "validation"
    assert [r["setting"] for r in va.setting["grid"]] == ["none", "bias=1", "bias=8"]
    assert va.setting["strength"] in (1.0, 8.0)
    assert va.evaluation.rows != vb.evaluation.rows  # the test texts did change
    # the control stage's comparison: fluent accuracy with intervals, circuit vs the others
    ccmp = a.result("control").comparison
    assert [r["method"] for r in ccmp.table] == ["none", "vocabulary_bias", "circuit"]
    assert any(v.startswith("circuit ") and "vocabulary_bias" in v for v in ccmp.verdicts)
    assert len(a.result("circuits").grid) == 1 + 4  # none + budgets × lambdas
    assert a.result("circuits").chosen["budget_per_sublayer"] in (1, 2)
    ta, tb = a.result("circuits").evaluations["circuit"], b.result("circuits").evaluations["circuit"]
    assert [r["text"] for r in ta.rows] != [r["text"] for r in tb.rows]  # test really changed
    # the comparison: intervals bracket the estimates, verdicts name the pooled random control
    cmp = a.result("circuits").comparison
    for row in cmp.table:
        assert row["fluent_low"] <= row["fluent_accuracy"] <= row["fluent_high"]
        assert row["fluent_accuracy"] <= row["accuracy"] + 1e-12  # fluent ⊆ raw
        assert row["n"] == 2 * 3 * 3 and row["n_scenarios"] == 2
    assert any("random circuit (mean of 2)" in v for v in cmp.verdicts)
    assert all("n = 18" in v for v in cmp.verdicts)
    assert list(cmp.to_dataframe().columns)[:2] == ["method", "fluent_accuracy"]
    assert "verdict_1" in a.results["summary"]
