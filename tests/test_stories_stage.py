"""The ``stories`` stage on the tiny random Llama at tiny sizes: it runs through the engine after
``directions``, writes its tables, figures and report section, its typed result round-trips,
its numbers agree with each other and with the dry-run plan, its directions steer, and its
``[stories]`` settings are checked before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emocircuits.data.stories import STORY_EMOTIONS
from emocircuits.results import jsonable, load_result
from emocircuits.run.config import ConfigError
from emocircuits.studies import dry_run, load_config, run_pipeline
from emocircuits.studies import stories as ST

EMOS = ["anger", "sadness", "happiness"]
CAP = 3
BASE = ["data.n_train=2", "data.n_validation=1", "data.n_test=2", "generation.max_new_tokens=3",
        "generation.min_new_tokens=1", "directions.n_folds=2", "directions.keyword_control=false",
        'judge.prefer="lexicon"', 'run.stages=["stories"]', f"stories.max_per_emotion={CAP}",
        "stories.max_neutral=6", "stories.n_permutations=50"]


def cfg(*over: str, emotions=EMOS):
    return load_config("quick", [*BASE, f"run.emotions={json.dumps(emotions)}", *over], model="tiny-llama")


def run(c, path, model):
    return run_pipeline(c, path, model=model, progress=False, keep_going=False)


@pytest.fixture(scope="module")
def done(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("stories")
    c = cfg()
    return c, path, run(c, path, tiny_llama)


def test_the_stage_runs_after_directions_with_tables_figures_and_report(done):
    c, path, r = done
    assert r.ran == ["directions", "stories"], r.results["stages"]
    st = r.results["stages"]["stories"]
    assert st["status"] == "done" and st["result_type"] == "StoriesResult"
    titles = [t["title"] for t in st["tables"]]
    for want in ("keyword control", "valence–arousal geometry", "best layers of the geometry",
                 "cosine between story and paper directions per layer (resid_post)",
                 "cosine between story and paper directions per layer (resid_mid)",
                 "nearest-direction decoding of the held-out test stories",
                 "test accuracy at the layer chosen on the validation stories",
                 "valence read-out on SEV test events"):
        assert any(t.startswith(want) for t in titles), (want, titles)
    figs = {f["path"].rsplit("/", 1)[-1] for f in st["figures"]}
    assert figs == {"va_geometry.png", "va_scatter.png", "cosine_resid_post.png", "cosine_resid_mid.png",
                    "story_decoding.png", "valence_auc.png"}, st["notes"]
    for f in st["figures"]:
        assert (path / f["path"]).stat().st_size > 1000
    res = r.result("stories")
    assert res.verdict.startswith("held-out test stories") and st["notes"]["keyword control"] == res.verdict
    assert any(w in res.verdict for w in ("story directions decode", "paper's directions decode",
                                          "no clear difference"))
    summ = r.results["summary"]
    for k in ("stories_va_r_valence", "stories_va_r_arousal", "stories_decoding_story_test",
              "stories_decoding_paper_test", "stories_valence_auc_story_max", "stories_valence_auc_paper_max",
              "stories_decoding_chance"):
        assert k in summ, k
    html = (path / "report.html").read_text(encoding="utf-8")
    assert "Emotion directions from stories" in html and "keyword control" in html


def test_the_result_round_trips(done):
    _, _, r = done
    res = r.result("stories")
    d = r.records["stories"].dir / "result"
    back = ST.StoriesResult.load(d)
    assert jsonable(back.to_dict()) == jsonable(res.to_dict())
    assert back.headline() == res.headline()
    assert type(load_result(d)) is ST.StoriesResult
    assert torch.equal(back.directions.vectors["resid_post"], res.directions.vectors["resid_post"])
    assert back.geometry.to_dataframe().equals(res.geometry.to_dataframe())


def test_the_numbers_agree(done, tiny_llama):
    c, _, r = done
    res = r.result("stories")
    paper = r.result("directions").directions
    L = tiny_llama.cfg.n_layers
    assert res.sites == ["resid_post", "resid_mid"] and res.layers == list(range(L))
    assert res.shared_emotions == EMOS and res.directions.emotions == EMOS
    assert res.concept_directions is None and res.geometry.emotions == EMOS
    # unit directions at every site and layer, as EmotionDirections (what steering takes)
    for site in res.sites:
        n = res.directions.vectors[site].double().norm(dim=-1)
        assert torch.allclose(n, torch.ones_like(n), atol=1e-5)
    assert res.directions.meta["method"] == "story_mean" and res.directions.meta["n_neutral"] == 6
    # cosines: recomputed from the two direction sets
    cos = torch.nn.functional.cosine_similarity(res.directions.get("anger", "resid_post").double(),
                                                paper.get("anger", "resid_post").double(), dim=-1)
    np.testing.assert_allclose(res.cosine["resid_post"]["anger"], cos.numpy(), atol=1e-6)
    # decoding: n per split, chance, per-layer accuracies, the chosen layer's test accuracy
    assert res.n_test == res.n_validation == CAP * len(EMOS) and res.chance == pytest.approx(1 / 3)
    for kind in ST.KINDS:
        for site in res.sites:
            for split in ("validation", "test", "test_raw"):
                acc = res.decoding[kind][site][split]
                assert len(acc) == L and all(0 <= a <= 1 for a in acc)
        j = res.layers.index(res.chosen_layer[kind])
        main = res.decoding[kind]["resid_post"]
        assert main["validation"][j] == max(main["validation"])
        assert res.test_at_chosen[kind] == main["test"][j]
        right = np.mean([p == y for p, y in zip(res.test_predictions[kind], res.test_labels, strict=True)])
        assert right == pytest.approx(res.test_at_chosen[kind])
    assert res.comparison.value == pytest.approx(res.test_at_chosen["story"] - res.test_at_chosen["paper"])
    assert len(set(res.test_ids)) == res.n_test and set(res.test_labels) == set(EMOS)
    # SEV valence read-out: 2 test scenarios × (positive, negative)
    assert res.n_sev == {"positive": 2, "negative": 2} and res.negative_emotions == ["anger", "sadness"]
    for kind in ST.KINDS:
        assert all(0 <= a <= 1 for a in res.valence_auc[kind]["resid_post"])
    # the plan counts exactly the forwards the stage ran
    assert res.n_forwards == ST.plan(c).forward


def test_the_story_directions_steer(done, tiny_llama):
    from emocircuits.prompts import encode
    from emocircuits.steering import steer

    res = done[2].result("stories")
    ids = torch.tensor([encode(tiny_llama, "The bus was late again.")])
    with torch.no_grad():
        base = tiny_llama(ids)[0, -1]
        with steer(tiny_llama, res.directions, [1], 4.0, emotion="anger", site="resid_post"):
            steered = tiny_llama(ids)[0, -1]
    assert not torch.allclose(base, steered)


def test_all_concepts_for_the_geometry_and_too_few_concepts(tiny_llama, tmp_path):
    two = ["anger", "happiness"]
    a = run(cfg(emotions=two), tmp_path, tiny_llama).result("stories")
    assert a.geometry is None and any("geometry: not computed" in n for n in a.notes)
    assert a.negative_emotions == ["anger"] and a.verdict
    r = run(cfg('stories.concepts="all"', emotions=two), tmp_path, tiny_llama)
    assert r.cached == ["directions"] and r.ran == ["stories"]
    b = r.result("stories")
    assert b.concept_directions.emotions == list(STORY_EMOTIONS) and b.directions.emotions == two
    assert b.geometry.emotions == list(STORY_EMOTIONS) and not b.geometry.exact
    assert b.geometry.n_permutations == 50 and b.headline()["stories_va_best_layer_valence"] in b.layers
    # the run's directions are centred over the run's emotions, not over the 20 concepts
    assert torch.allclose(b.directions.vectors["resid_post"], a.directions.vectors["resid_post"])
    assert b.n_forwards == ST.plan(cfg('stories.concepts="all"', emotions=two)).forward


def test_nearest_direction_and_auc_on_known_data():
    v = torch.eye(3, 4).unsqueeze(1)  # 3 emotions, 1 layer, d = 4
    x = torch.tensor([[2.0, 0, 0, 5], [0, 3, 0, 5], [0, 0, 1, 5], [1, 0, 0, 5]]).unsqueeze(1) + 10
    pred = ST.nearest_direction(x, v, centre=torch.full((1, 4), 10.0))
    assert pred.tolist() == [[0, 1, 2, 0]]
    assert ST.accuracy_per_layer(pred, [0, 1, 2, 1]) == [0.75]
    auc = ST.auc_per_layer(torch.tensor([[[1.0]], [[2.0]], [[-1.0]], [[0.5]]]), torch.ones(1, 1), [1, 1, 0, 0])
    assert auc == [1.0]


def test_the_dry_run_lists_the_stage(tmp_path):
    text = dry_run(cfg(), tmp_path / "r")
    line = next(ln for ln in text.splitlines() if ln.startswith("stories"))
    assert "to run" in line and str(int(ST.plan(cfg()).forward)) in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override, message", [
    ("stories.bogus=1", "unknown key 'bogus'"),
    ("stories.emotion=[\"anger\"]", "did you mean 'emotions'"),
    ('stories.concepts="some"', "stories.concepts"),
    ('stories.emotions=["anger", "joy"]', "unknown concept"),
    ('stories.emotions=["anger"]', ">= 2 distinct"),
    ('stories.sites=["z"]', "stories.sites"),
    ("stories.denoise_share=1.5", "denoise_share"),
    ("stories.max_per_emotion=0", "max_per_emotion"),
    ("stories.steering_strengths=[0.0]", "steering_strengths"),
    ("stories.circuit_lambdas=[-1.0]", "circuit_lambdas"),
    ("stories.circuit_budget=0", "circuit_budget"),
    ("stories.circuit_random=-1", "circuit_random"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg(override)


def test_steering_side_by_side_chooses_on_validation_and_compares_on_test(tiny_llama, tmp_path):
    r = run(cfg("stories.steering_strengths=[1.0, 4.0]"), tmp_path, tiny_llama)
    st = r.result("stories").steering
    assert set(st["chosen"]) == {"paper", "stories"}
    assert all(c["chosen_on"] == "validation" and c["strength"] in (1.0, 4.0) for c in st["chosen"].values())
    assert [row["setting"] for row in st["grid"]] == ["none", "paper α=1", "paper α=4", "stories α=1", "stories α=4"]
    methods = [row["method"] for row in st["comparison"]["table"]]
    assert methods == ["none", "steering (paper)", "steering (stories)"]
    n_test = 2 * 3 * len(EMOS)  # scenarios × events × targets
    assert all(row["n"] == n_test for row in st["comparison"]["table"])
    assert any(v.startswith("steering (stories)") for v in st["comparison"]["verdicts"])
    titles = [t["title"] for t in r.results["stages"]["stories"]["tables"]]
    assert any(t.startswith("steering with each kind on the test set") for t in titles)
    assert not any(p.name.startswith(".partial-") for p in (tmp_path / "stages").iterdir())


CIRCUITS = ['run.stages=["circuits", "stories"]', "circuits.lambdas=[1.0, 2.0]", "circuits.budgets=[2]",
            "circuits.random_controls=1", "circuits.faithfulness=false", "circuits.n_influence_scenarios=1",
            "circuits.influence_alphas=[0.5]", 'stories.sites=["resid_post", "resid_mid"]']


def test_circuits_from_story_directions_beside_the_papers(tiny_llama, tmp_path):
    """The story circuit: λ chosen on validation, same budget as the circuits stage's choice,
    its own random control on test, compared with the paper's circuit on the same test rows."""
    r = run(cfg(*CIRCUITS, "stories.circuit_lambdas=[0.5, 3.0]", "stories.circuit_random=2",
                "stories.circuit_influence_scenarios=1"), tmp_path, tiny_llama)
    assert r.ran == ["directions", "circuits", "stories"], r.results["stages"]
    res = r.result("stories")
    ci, circ = res.circuits, r.result("circuits")
    assert ci["chosen"]["chosen_on"] == "validation" and ci["chosen"]["lambda"] in (0.5, 3.0)
    assert ci["chosen"]["budget_per_sublayer"] == circ.chosen["budget_per_sublayer"] == 2
    assert [g["setting"] for g in ci["grid"]] == ["none", "stories λ=0.5", "stories λ=3"]
    methods = [row["method"] for row in ci["comparison"]["table"]]
    assert methods == ["none", "circuit (paper)", "circuit (stories)", "random circuit 0 (stories sizes)",
                       "random circuit 1 (stories sizes)"]
    n_test = 2 * 3 * len(EMOS)
    assert all(row["n"] == n_test for row in ci["comparison"]["table"])
    paper_row = next(row for row in ci["comparison"]["table"] if row["method"] == "circuit (paper)")
    paper_own = next(row for row in circ.comparison.table if row["method"] == "circuit")
    assert paper_row["fluent_accuracy"] == paper_own["fluent_accuracy"]  # the circuits stage's texts, reused
    verdicts = ci["comparison"]["verdicts"]
    assert any("random circuit (mean of 2)" in v for v in verdicts) and any("circuit (paper)" in v for v in verdicts)
    assert set(ci["sizes"]) == set(EMOS) and set(ci["overlap_with_paper"]) == set(EMOS)
    titles = [t["title"] for t in r.results["stages"]["stories"]["tables"]]
    assert any(t.startswith("circuits from each kind of directions on the test set") for t in titles)
    # the plan counts the story circuit's texts: 2 λ on validation, 1 + 2 circuits on test
    plan = ST.plan(cfg(*CIRCUITS, "stories.circuit_lambdas=[0.5, 3.0]", "stories.circuit_random=2"))
    assert plan.generate == pytest.approx(2 * 1 * 3 * len(EMOS) + 3 * n_test) and plan.work_seconds > 0


def test_story_circuits_need_the_circuits_stage(tiny_llama, tmp_path):
    r = run(cfg("stories.circuit_lambdas=[1.0]"), tmp_path, tiny_llama)
    res = r.result("stories")
    assert res.circuits == {} and any("needs the circuits stage" in n for n in res.notes)


def test_steering_side_by_side_reuses_the_steering_stage(tiny_llama, tmp_path):
    """With the steering stage on the paper band at resid_post, its unsteered and paper texts
    and its choice are reused: the paper rows equal the steering stage's, nothing generated twice."""
    c = cfg('run.stages=["steering", "stories"]', "steering.strengths=[1.0, 4.0]",
            "stories.steering_strengths=[0.5, 2.0]")
    r = run(c, tmp_path, tiny_llama)
    st, steer_res = r.result("stories").steering, r.result("steering")
    assert st["chosen"]["paper"]["from"] == "the steering stage"
    assert st["chosen"]["paper"]["strength"] == steer_res.chosen["strength"]
    assert st["chosen"]["stories"]["strength"] in (0.5, 2.0)
    assert [row["setting"] for row in st["grid"]] == ["none", "paper α=1", "paper α=4", "stories α=0.5",
                                                     "stories α=2"]
    table = {row["method"]: row for row in st["comparison"]["table"]}
    assert table["steering (paper)"]["accuracy"] == steer_res.test.accuracy.overall
    assert table["none"]["accuracy"] == steer_res.test_unsteered.accuracy.overall
    e, nv, nt = len(EMOS), 1 * 3 * len(EMOS), 2 * 3 * len(EMOS)
    assert ST.plan(c).generate == pytest.approx(2 * nv + nt)  # the story kind only
    assert ST.plan(cfg("stories.steering_strengths=[0.5, 2.0]")).generate == pytest.approx(
        nv / e + 4 * nv + nt / e + 2 * nt)
