"""The studies' switches for the measurements of the former experiments/00–04 scripts, on the
tiny random Llama at tiny sizes: each switch runs and its typed result round-trips through
``save``/``load``; every preset in experiments/ parses and plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from emocircuits import directions as D
from emocircuits.components import pairwise_jaccard
from emocircuits.results import jsonable
from emocircuits.run.config import ConfigError
from emocircuits.studies import dry_run, load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EMOS = ["anger", "happiness"]
BASE = ["data.n_train=2", "data.n_validation=1", "data.n_test=1", "generation.max_new_tokens=3",
        "generation.min_new_tokens=1", f"run.emotions={EMOS!r}".replace("'", '"'),
        "directions.n_folds=2", "directions.keyword_control=false", 'judge.prefer="lexicon"']
SWITCHES = [
    "prompting.neutral_readout=true",
    'directions.methods=["context_agnostic", "mean_difference", "pca", "probe"]',
    "directions.reply_directions=true", "directions.reply_scenarios=1",
    "directions.reply_max_new_tokens=3",
    'steering.layer_bands="paper+early"', "steering.strengths=[1.0]",
    "steering.reference_strength=2.0",
    "components.n_prompts_per_emotion=2", "components.exact_prompts_per_emotion=1",
    'components.exact_valences=["positive", "negative"]', "components.ablation_layer_step=2",
    'components.exact_method="batched"', 'components.readouts=["final", "logit"]',
    'components.sweep_runs=["neuron:ablate", "head:ablate", "neuron:enhance", "head:enhance"]',
    'components.sweep_emotions=["anger"]', "components.sweep_prompts_per_emotion=1",
    "components.sweep_ks=[1]", "components.n_random=1", "components.neuron_rank_layers=[0, 1]",
    'run.stages=["prompting", "steering", "components"]',
]


def cfg(*over: str):
    return load_config("quick", [*BASE, *over], model="tiny-llama")


@pytest.fixture(scope="module")
def switched(tiny_llama, tmp_path_factory):
    """One run with every new switch on (prompting, directions, steering, components)."""
    r = run_pipeline(cfg(*SWITCHES), tmp_path_factory.mktemp("switched"), model=tiny_llama,
                     progress=False, report=False, keep_going=False)
    assert r.ran == ["prompting", "directions", "steering", "components"], r.results["stages"]
    return r


def roundtrip(r, name: str):
    """The stage's result as saved, loaded back through its own type: identical numbers."""
    res = r.result(name)
    back = type(res).load(r.records[name].dir / "result")
    assert jsonable(back.to_dict()) == jsonable(res.to_dict())
    assert back.headline() == res.headline()
    return back


# ----------------------------------------------------------------------------- presets


PRESETS = sorted((ROOT / "experiments").glob("*.toml"))


def test_experiment_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"00_readout_table.toml", "01_prompting.toml", "02_directions_and_steering.toml",
            "04_components.toml"} <= names
    assert not list((ROOT / "experiments").glob("0[0-4]_*.py"))  # the scripts became presets


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_experiment_preset_parses_and_plans(path, tmp_path):
    c = load_config(path)
    assert c.run.stages, f"{path.name}: [run] stages is missing"
    assert c.run.preset == path.stem
    head = path.read_text().split("\n\n", 1)[0]
    assert f"emocircuits run --preset experiments/{path.name}" in head, "the command on top"
    assert "to run" in dry_run(load_config(path, model="tiny-llama"), tmp_path)


# ----------------------------------------------------------------------------- prompting


def test_prompting_confusion_timing_and_neutral_readout(switched):
    res = roundtrip(switched, "prompting")
    n = 1 * 3 * len(EMOS)
    assert sum(sum(c.values()) for c in res.judge_confusion.values()) == n
    assert set(res.judge_confusion) == set(EMOS)
    assert res.elicitation_timing["n_generations"] == n
    assert res.elicitation_timing["mean_new_tokens"] <= 3
    assert set(res.readout_neutral_labels) == {"positive", "neutral", "negative"}
    nr = res.neutral_readout
    assert nr.share.shape == (3, len(EMOS)) and np.allclose(nr.share.sum(1), 1.0)
    assert nr.assistant_prefix and len(nr.labels) == 3 and set(nr.labels) <= set(EMOS)
    assert set(nr.valence_score_mean) == {"positive", "neutral", "negative"}
    assert 0.0 <= nr.valence_auc <= 1.0
    assert "neutral_readout_valence_auc" in res.headline()


def test_prompting_readout_only_skips_generation(tiny_llama, tmp_path):
    c = cfg("prompting.elicit=false", "prompting.readout=false", "prompting.neutral_readout=true",
            'prompting.readout_prefix="I feel"', 'run.stages=["prompting"]')
    r = run_pipeline(c, tmp_path, model=tiny_llama, progress=False, report=False, keep_going=False)
    res = roundtrip(r, "prompting")
    assert res.evaluation is None and res.readout_instructed is None and res.accuracy is None
    assert res.neutral_readout.assistant_prefix == "I feel"
    assert not (r.records["prompting"].dir / "generations.jsonl").exists()
    assert list(res.headline()) == ["neutral_readout_valence_auc"]
    with pytest.raises(ConfigError, match="nothing to do"):
        cfg("prompting.elicit=false", "prompting.readout=false")


# ----------------------------------------------------------------------------- directions


def test_directions_methods_decoding_per_site_and_reply_directions(switched, tiny_llama):
    res = roundtrip(switched, "directions")
    L = tiny_llama.cfg.n_layers
    assert set(res.other_methods) == {"mean_difference", "pca", "probe"}
    for per in res.method_cosine.values():
        assert set(per) == {"resid_mid", "resid_post"}
        assert all(len(c) == L and all(-1.0 - 1e-6 <= x <= 1.0 + 1e-6 for x in c) for c in per.values())
    assert set(res.decoding_by_site) == {"resid_mid", "resid_post"}
    assert np.array_equal(res.decoding.centered, res.decoding_by_site["resid_post"].centered)
    assert res.emotion_cosine.labels == EMOS and res.emotion_cosine.matrix.shape == (2, 2)
    assert res.layer_cosine.matrix.shape == (2 * L, 2 * L)
    assert set(res.adjacent_cosines) == set(EMOS)
    assert set(res.adjacent_cosines["anger"]) == {"off_diagonal_mean", "within_layer", "to_next_layer"}
    assert res.reply is not None and res.reply.meta["method"] == "reply_mean"
    assert list(res.reply_cosine) == ["resid_post"] and len(res.reply_cosine["resid_post"]) == L
    assert "reply_direction_cosine_max_resid_post" in res.headline()


def test_direction_agreement_and_adjacent_cosines():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    d = D.EmotionDirections(["anger", "joy"], [0, 1, 2], {"resid_mid": v, "resid_post": v.clone()})
    assert np.allclose(D.direction_agreement(d, d, "resid_mid"), 1.0)
    flipped = D.EmotionDirections(["anger", "joy"], [1, 2], {"resid_mid": -v[:, 1:]})
    assert np.allclose(D.direction_agreement(d, flipped, "resid_mid"), -1.0)
    adj = D.adjacent_site_cosines(d, "anger")
    assert adj["within_layer"] == pytest.approx(1.0)  # resid_mid_l == resid_post_l here
    assert -1.0 <= adj["to_next_layer"] <= 1.0
    with pytest.raises(ValueError, match="not in the reference"):
        D.direction_agreement(flipped, d, "resid_mid")


# ----------------------------------------------------------------------------- steering


def test_steering_two_bands_and_reference_setting(switched):
    res = roundtrip(switched, "steering")
    assert len(res.grid) == 1 + 2  # unsteered + paper band + early band, one strength
    assert {r["layers"] for r in res.grid[1:]} == {"1", "0"}  # 3 layers: paper band 1, early 0
    for r in res.grid:
        assert 0.0 <= r["readout_share"] <= 1.0 and set(r["judge_by_emotion"]) == set(EMOS)
    assert res.reference["strength"] == 2.0 and res.reference["same_as_chosen"] is False
    assert res.test_reference is not None and res.test_reference.accuracy.n == 3 * len(EMOS)
    assert "steering_reference_accuracy" in res.headline()
    assert 0.0 <= res.test.readout["mean_target_share"] <= 1.0


# ----------------------------------------------------------------------------- components


def test_components_subset_exact_readouts_overlaps_and_sweeps(switched, tiny_llama):
    res = roundtrip(switched, "components")
    L, H = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads
    assert res.sizes == {"prompts": 4, "exact_prompts": 2, "exact_layers": [0, 2]}
    assert res.heads_exact.method == "ablation" and tuple(res.heads_exact.mean.shape) == (2, 2, H)
    assert tuple(res.heads_attribution.mean.shape) == (2, L, H)
    assert -1.0 <= res.agreement_pooled["spearman"] <= 1.0
    assert set(res.heads_by_readout) == {"final", "logit"}
    assert set(res.readout_agreement["logit"]) == {"vs_same_layer", "vs_exact"}
    assert set(res.overlaps) == {"neurons", "heads_attribution", "heads_exact"}
    assert set(res.overlaps["neurons"]["pairs"]) == {"anger-happiness"}
    assert list(res.sweeps) == ["anger"]
    runs = res.sweeps["anger"]
    assert set(runs) == {"neuron:ablate", "head:ablate", "neuron:enhance", "head:enhance"}
    for spec, sw in runs.items():
        assert (sw.kind, sw.mode) == tuple(spec.split(":")) and sw.ks == [1]
        assert torch.isfinite(sw.top).all()  # s_final is read along v_ref now, s_logit as before
    assert {k for k in res.timing_s if k.startswith("sweep_")} == {
        f"sweep_anger_{s.replace(':', '_')}" for s in runs}


def test_components_config_checks():
    with pytest.raises(ConfigError, match="sweep_emotions"):
        cfg('components.sweep_emotions=["fear"]')
    with pytest.raises(ConfigError, match="sweep_runs"):
        cfg('components.sweep_runs=["neuron:dance"]')
    assert pairwise_jaccard({"a": [(0, 1, 0.5)], "b": [(0, 1, 0.2), (1, 2, 0.1)]}) == {
        "pairs": {"a-b": 0.5}, "mean": 0.5}
