"""The probes and control studies' switches for the measurements of the former
experiments/07_probes.py and 08_control.py, on the tiny random Llama at tiny sizes: each switch
runs, its typed result round-trips through ``save``/``load``, and the two presets parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emocircuits import control as CT
from emocircuits import probes as PR
from emocircuits.data import load_utterances
from emocircuits.results import jsonable
from emocircuits.run.config import ConfigError
from emocircuits.studies import dry_run, load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EMOS = ["anger", "happiness"]
BASE = ["data.n_train=2", "data.n_validation=1", "data.n_test=1", "generation.max_new_tokens=3",
        "generation.min_new_tokens=1", f"run.emotions={EMOS!r}".replace("'", '"'),
        "generation.repetition_penalty=1.0", "generation.no_repeat_ngram_size=0", "directions.n_folds=2",
        "directions.keyword_control=false", 'judge.prefer="lexicon"']
PROBES = ['run.stages=["probes"]', "probes.max_utterances=24", "probes.cv=2", "probes.zero_shot_n=0",
          "probes.persistence_n=0"]
PROBE_SWITCHES = [
    'probes.kinds=["logreg", "mlp"]', "probes.mean_pool=true", 'probes.probe_input="raw"',
    "probes.in_context_probe=true", 'probes.sample="per_class"', "probes.probe_layer=1",
    "probes.persistence_n=1", "probes.persistence_tokens=3",
    "probes.persistence_cv=2", "probes.persistence_keep_hidden=true", "probes.malleability_n=1",
    "probes.sev_n=1",
]
EMOS3 = ["anger", "sadness", "happiness"]  # lstsq VA directions need >= 3 emotions
SET_EMOS3 = f"run.emotions={EMOS3!r}".replace("'", '"')
CONTROL_SWITCHES = [
    'run.stages=["circuits", "control"]', SET_EMOS3,
    "circuits.lambdas=[1.5]", "circuits.random_controls=0", "circuits.n_influence_scenarios=1",
    "circuits.influence_alphas=[0.5]", "circuits.budget_per_sublayer=2", "circuits.readout=false",
    'control.va_methods=["lstsq", "contrastive"]', "control.strengths=[1.0, 2.0]",
    "control.levels=[-1.0, 1.0]", "control.n_scenarios=1", 'control.readout_prefix="auto"',
    'control.methods=["unsteered", "vocabulary_bias", "steering", "decaying_steering", "circuit"]',
    "control.steering_strength=2.0", "control.decay_alpha0=3.0", "control.decay_floor=0.5",
]


def cfg(*over: str):
    return load_config("quick", [*BASE, *over], model="tiny-llama")


def run(tiny_llama, path, *over: str):
    return run_pipeline(cfg(*over), path, model=tiny_llama, progress=False, report=False, keep_going=False)


def roundtrip(r, name: str):
    """The stage's result as saved, loaded back through its own type: identical numbers."""
    res = r.result(name)
    back = type(res).load(r.records[name].dir / "result")
    assert type(back) is type(res)
    assert jsonable(back.to_dict()) == jsonable(res.to_dict())
    assert jsonable(back.headline()) == jsonable(res.headline())
    return back


# ----------------------------------------------------------------------------- presets


def test_presets_parse_with_the_former_scripts_sizes(tmp_path):
    p = load_config(ROOT / "experiments" / "07_probes.toml")
    assert p.run.stages == ("probes",)
    s = p.section("probes")
    assert (s.probe_input, s.kinds, s.sample, s.in_context_probe) == ("raw", ("logreg", "mlp"), "per_class", True)
    assert (s.zero_shot_n, s.persistence_n, s.persistence_tokens, s.malleability_n, s.sev_n) == (5, 6, 128, 5, 12)
    c = load_config(ROOT / "experiments" / "08_control.toml")
    assert c.run.stages == ("steering", "circuits", "control")  # α and λ chosen on validation upstream
    s = c.section("control")
    assert (s.steering_strength, s.circuit_strength) == (None, None)
    assert s.vocabulary_strengths == (1.0, 2.0, 4.0, 8.0)
    assert s.va_methods == ("lstsq", "contrastive") and s.strengths == (1.0, 2.0, 4.0)
    assert s.methods == ("unsteered", "vocabulary_bias", "steering", "decaying_steering", "circuit")
    assert (c.data.n_train, c.data.n_test, c.generation.max_new_tokens) == (10, 4, 30)
    for f in ("07_probes.toml", "08_control.toml"):
        assert "to run" in dry_run(load_config(ROOT / "experiments" / f, model="tiny-llama"), tmp_path)
    assert not list((ROOT / "experiments").glob("0[78]_*.py"))  # the scripts became presets


def test_bad_switches_are_refused():
    with pytest.raises(ConfigError, match="kinds"):
        cfg("probes.kinds=[]")
    with pytest.raises(ConfigError, match="probe_input"):
        cfg('probes.probe_input="template"')
    with pytest.raises(ConfigError, match="repeats"):
        cfg('control.methods=["steering", "steering"]')
    with pytest.raises(ConfigError, match="methods"):
        cfg('control.methods=["prompting"]')


# ----------------------------------------------------------------------------- library pieces


def test_per_class_spreads_over_groups():
    u = load_utterances().filter("test")
    sel = u.per_class(2, ["anger", "neutral"])
    assert [x.label for x in sel] == ["anger", "anger", "neutral", "neutral"]
    assert sel[0].group != sel[1].group  # the first row of two different groups
    assert len(u.per_class(0)) == 0


def test_word_rates_and_transfer_bands():
    assert CT.any_emotion_word_rate(["I am so happy and angry", ""], ["anger", "happiness"]) == [2 / 6, 0.0]
    r = PR.PersistenceResult(
        layer=1, classes=("a", "b"), k=np.arange(5), n_valid=np.full(5, 2),
        transfer_accuracy=np.array([1.0, 0.5, 0.0, 1.0, 0.5]), transfer_true_prob=np.zeros(5),
        reference_accuracy=1.0, bucket_k=[0], bucket_accuracy_mean=np.zeros(1), bucket_accuracy_std=np.zeros(1),
        chance_majority=0.5, chance_uniform=0.5, texts=[])
    assert PR.transfer_by_band(r, ((1, 2), (3, 40), (50, 60))) == {"k=1-2": 0.25, "k=3-40": 0.75}


# ----------------------------------------------------------------------------- probes


@pytest.fixture(scope="module")
def probes_run(tiny_llama, tmp_path_factory):
    """One probes run with every new switch on."""
    return run(tiny_llama, tmp_path_factory.mktemp("probes"), *PROBES, *PROBE_SWITCHES)


def test_probes_mlp_and_mean_pooled_sweeps(probes_run, tiny_llama):
    res = roundtrip(probes_run, "probes")
    assert res.sweep.kind == "logreg" and res.sweep.pool == "last"
    assert set(res.other_sweeps) == {"mlp_last", "logreg_mean"}
    assert res.other_sweeps["mlp_last"].kind == "mlp"
    assert res.other_sweeps["logreg_mean"].layers == list(range(tiny_llama.cfg.n_layers))  # no embedding
    h = res.headline()
    for k in ("probe_mlp_last_peak_accuracy", "probe_logreg_mean_peak_accuracy", "probe_onset_layer_95",
              "probe_test_accuracy_at_peak"):
        assert k in h, k


def test_probes_in_context_probe_malleability_and_sev(probes_run):
    res = roundtrip(probes_run, "probes")
    assert res.probe_layer == 1 and not res.notes
    assert set(res.malleability) == {"probe", "in_context_probe"}
    m = res.malleability["in_context_probe"]
    assert m.n == 3 and set(m.accuracy) == set(PR.DEFAULT_SYSTEM_PROMPTS)  # 1 row × 3 classes
    assert m.result.probs["calm"].shape == (3, 3)
    sev = res.sev
    assert sev.n_prompts == 3 and set(sev.probes) == {"probe", "in_context_probe"}
    assert set(sev.mean_readout_valence) == {"positive", "neutral", "negative"}
    assert all(0.0 <= v.auc <= 1.0 for v in sev.probes.values())
    h = res.headline()
    assert "sev_auc_in_context_probe" in h and "malleability_in_context_probe_accuracy_calm" in h


def test_probes_persistence_options(probes_run, tiny_llama):
    p = roundtrip(probes_run, "probes").persistence
    assert p.layer == 1 and len(p.texts) == 3
    assert tuple(p.hidden.shape) == (3, 4, tiny_llama.cfg.d_model)  # kept: k = 0..3
    assert "persistence_k=1-32" in probes_run.result("probes").headline()


def test_probes_in_context_probe_is_noted_when_the_input_is_wrapped(tiny_llama, tmp_path):
    r = run(tiny_llama, tmp_path, *PROBES, "probes.in_context_probe=true", 'probes.probe_layer="onset"',
            "probes.malleability_n=2")
    res = roundtrip(r, "probes")
    assert list(res.malleability) == ["probe"] and res.malleability["probe"].n == 2
    assert res.probe_layer == res.sweep.onset_layer(0.95)
    assert any("in_context_probe" in n for n in res.notes)
    assert res.zero_shot is None and res.persistence is None and res.sev is None


# ----------------------------------------------------------------------------- control


@pytest.fixture(scope="module")
def control_run(tiny_llama, tmp_path_factory):
    """Both VA direction methods × two strengths and every compared method (circuits upstream)."""
    return run(tiny_llama, tmp_path_factory.mktemp("control"), *CONTROL_SWITCHES)


def test_control_va_methods_strengths_and_their_cosine(control_run):
    res = roundtrip(control_run, "control")
    assert list(res.controllability) == ["lstsq@1", "lstsq@2", "contrastive@1", "contrastive@2"]
    c = res.controllability["contrastive@2"]
    assert c.meta["method"] == "contrastive" and c.meta["strength"] == 2.0
    assert c.text_va.shape == (4, 3, 2) and c.readout_va.shape == (4, 3, 2)  # 2×2 grid, 3 prompts
    assert res.va_comparison.cosine.shape[0] == 2 and set(res.va_band_cosine) == {"valence", "arousal"}
    h = res.headline()
    assert {"va_valence_pearson_r", "va_readout_arousal_mae", "va_cos_valence_lstsq_contrastive"} <= set(h)


def test_control_method_comparison(control_run):
    res = roundtrip(control_run, "control")
    assert list(res.methods) == ["unsteered", "vocabulary_bias", "steering", "decaying_steering", "circuit"]
    lam = control_run.result("circuits").chosen["lambda"]
    assert res.methods["circuit"].setting["strength"] == lam == 1.5  # the circuits stage's λ
    assert res.methods["steering"].setting["strength"] == 2.0
    dec = res.methods["decaying_steering"]
    assert set(dec.alpha_schedule) == set(EMOS3)
    assert all(h[0] == 3.0 and min(h) >= 0.5 for h in dec.alpha_schedule.values())  # α0, floor
    for m in res.methods.values():
        assert m.evaluation.accuracy.n == 3 * len(EMOS3)
        assert 0.0 <= m.emotion_word_rate <= m.any_emotion_word_rate <= 1.0
    h = res.headline()
    assert h["vocabulary_bias_accuracy"] == h["control_vocabulary_bias_accuracy"]
    assert "control_decaying_steering_perplexity" in h and not res.notes


def test_control_methods_without_their_upstream_are_noted(tiny_llama, tmp_path):
    r = run(tiny_llama, tmp_path, 'run.stages=["control"]', SET_EMOS3, "control.levels=[-1.0, 1.0]",
            "control.n_scenarios=1", 'control.methods=["steering", "circuit"]')
    res = roundtrip(r, "control")
    assert res.methods == {} and len(res.notes) == 2
    assert list(res.controllability) == ["lstsq@2"] and res.va_comparison is None
    assert "vocabulary_bias_accuracy" not in res.headline()
