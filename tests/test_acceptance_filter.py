"""The paper's acceptance filter (``directions.acceptance_filter``): only (scenario, event)
groups whose instructed replies were all accepted by the judge feed the directions, the
components and the circuits; the number of groups kept is reported."""

from __future__ import annotations

import pytest
import torch

from emocircuits import directions as D
from emocircuits import elicitation as EL
from emocircuits.activations import collect
from emocircuits.prompts import emotion_prompts
from emocircuits.studies import common, get_study, load_config, run_pipeline

EMOS = ["anger", "sadness", "happiness"]
TINY = ["data.n_train=3", "data.n_validation=1", "data.n_test=1", "generation.max_new_tokens=3",
        "generation.min_new_tokens=0", "directions.keyword_control=false", "directions.n_folds=2",
        f"run.emotions={EMOS!r}".replace("'", '"'), 'run.stages=["circuits"]', "circuits.lambdas=[1.0]",
        "circuits.budgets=[2]", "circuits.random_controls=1", "circuits.faithfulness=false",
        "circuits.n_influence_scenarios=3", "directions.acceptance_filter=true"]


def _row(skel, val, emo, match):
    return {"key": f"{skel}__{val}__{emo}", "skeleton_id": skel, "valence": val, "emotion": emo,
            "judge": {"match": match}}


def test_complete_groups_needs_every_emotion_accepted():
    rows = [_row("a", "positive", e, True) for e in EMOS]  # complete
    rows += [_row("a", "negative", e, e != "sadness") for e in EMOS]  # one rejected
    rows += [_row("b", "neutral", e, True) for e in EMOS[:2]]  # an emotion missing
    rows += [_row("b", "positive", e, True) for e in reversed(EMOS)]  # complete, other order
    assert EL.complete_groups(rows, EMOS) == [("a", "positive"), ("b", "positive")]
    assert EL.complete_groups(rows, EMOS[:2]) == [("a", "positive"), ("b", "neutral"), ("b", "positive")]
    with pytest.raises(KeyError, match="row 0 .* no 'judge'"):
        EL.complete_groups([{"skeleton_id": "a", "valence": "positive", "emotion": "anger"}], EMOS)


def test_keep_groups_keeps_order(tiny_llama):
    recs = common.records(load_config("quick", TINY, model="tiny-llama"), "train")
    ps = emotion_prompts(tiny_llama, recs, EMOS)
    keep = [(recs[1].skeleton_id, "negative"), (recs[0].skeleton_id, "positive")]
    kept = EL.keep_groups(ps, keep)
    assert len(kept) == 2 * len(EMOS) and [p.group for p in kept][0] == (recs[0].skeleton_id, "positive")
    assert [ps.index(p) for p in kept] == sorted(ps.index(p) for p in kept)


@pytest.fixture
def reject_one_group(monkeypatch):
    """A judge that accepts every instructed reply except sadness in the first train
    scenario's negative event (one incomplete group of the 9)."""
    real = EL.judge_generations
    calls = []

    def fake(rows, judge, **kw):
        out = real(rows, judge, **kw)
        first = rows[0]["skeleton_id"]
        calls.append(len(rows))
        return [{**r, "judge": {**r["judge"], "match": not (r["skeleton_id"] == first and r["valence"] == "negative"
                                                             and r["emotion"] == "sadness")}} for r in out]

    monkeypatch.setattr(EL, "judge_generations", fake)
    return calls


def test_filter_feeds_directions_and_circuits_only_complete_groups(tiny_llama, tmp_path, reject_one_group):
    cfg = load_config("quick", TINY, model="tiny-llama")
    off = load_config("quick", [t for t in TINY if "acceptance_filter" not in t], model="tiny-llama")
    st = get_study("directions")
    assert st.plan(cfg).generate == st.plan(off).generate + 3 * 3 * len(EMOS)  # the filter's replies are planned
    r = run_pipeline(cfg, tmp_path / "run", model=tiny_llama, progress=False, report=False, keep_going=False)
    assert r.ran == ["directions", "circuits"], r.results["stages"]
    assert reject_one_group == [3 * 3 * len(EMOS)]  # every train prompt's instructed reply judged once
    d = r.result("directions")
    recs = common.records(cfg, "train")
    dropped = (recs[0].skeleton_id, "negative")
    assert d.groups_total == 9 and len(d.accepted_groups) == 8 and list(dropped) not in d.accepted_groups
    head = r.results["stages"]["directions"]["headline"]
    assert head["acceptance_filter_groups_kept"] == 8 and head["acceptance_filter_groups_total"] == 9
    # the directions are exactly those of the kept prompts (computed here another way)
    kept = [p for p in emotion_prompts(tiny_llama, recs, EMOS) if p.group != dropped]
    acts = collect(tiny_llama, kept, ("resid_mid", "resid_post"), "last", progress=False)
    ref = D.context_agnostic(acts, kept, EMOS, sites=["resid_mid", "resid_post"])
    for site in ("resid_mid", "resid_post"):
        torch.testing.assert_close(d.directions.vectors[site], ref.vectors[site], rtol=0, atol=1e-6)
    # the circuits' difference vectors use the same groups
    used = r.result("circuits").difference_vectors.groups.used
    assert sorted(map(tuple, used)) == sorted(map(tuple, d.accepted_groups))


def test_filter_off_is_the_default_and_keeps_every_group(tiny_llama, tmp_path, reject_one_group):
    cfg = load_config("quick", [t for t in TINY if "acceptance_filter" not in t], model="tiny-llama")
    assert cfg.section("directions").acceptance_filter is False
    r = run_pipeline(cfg, tmp_path / "run", model=tiny_llama, progress=False, report=False, keep_going=False)
    assert reject_one_group == [] and r.result("directions").accepted_groups is None
    assert len(r.result("circuits").difference_vectors.groups.used) == 9


def test_no_complete_group_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    real = EL.judge_generations
    monkeypatch.setattr(EL, "judge_generations", lambda rows, judge, **kw: [
        {**r, "judge": {**r["judge"], "match": False}} for r in real(rows, judge, **kw)])
    cfg = load_config("quick", TINY, model="tiny-llama")
    r = run_pipeline(cfg, tmp_path / "run", model=tiny_llama, progress=False, report=False)
    st = r.results["stages"]["directions"]["status"]
    assert "acceptance_filter" in st and "no complete group of the 9 train groups" in st
