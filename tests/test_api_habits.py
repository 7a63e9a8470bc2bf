"""TransformerLens / nnsight / SAELens habits work, and results show themselves (issue 17, 2-3):
TL hook names as sites, ``acts[site, layer]``, a bare string is one prompt, ``load_model("tiny-*")``,
``steer`` with a ``{layer: vector}`` dict, compact reprs, ``_repr_html_``, ``to_dataframe``, ``plot``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import test_results as TR  # the BUILDERS table: one instance of every library result type
import torch
from matplotlib.figure import Figure

import emocircuits as ec
from emocircuits import models
from emocircuits import sites as S
from emocircuits import steering as ST
from emocircuits.interventions import Intervention
from emocircuits.judges import readout as JR

PROMPTS = ["I waited an hour for the bus", "what a lovely day", "hm"]


def _collect(model, sites, prompts=PROMPTS, position="last", **kw):
    return ec.collect(model, prompts, sites, position, progress=False, **kw)


# ----------------------------------------------------------------------------- A1: hook names


TL_CASES = [
    ("blocks.{l}.hook_resid_pre", "resid_pre"),
    ("blocks.{l}.hook_resid_mid", "resid_mid"),
    ("blocks.{l}.hook_resid_post", "resid_post"),
    ("blocks.{l}.hook_attn_out", "attn_out"),
    ("blocks.{l}.hook_mlp_out", "mlp_out"),
    ("blocks.{l}.attn.hook_z", "z"),
    ("blocks.{l}.attn.hook_result", "head_result"),
    ("blocks.{l}.mlp.hook_post", "mlp_post"),
    ("blocks.{l}.ln2.hook_out", "ln2_out"),
]


@pytest.mark.parametrize("template,site", TL_CASES)
def test_hook_name_site_is_that_site_at_that_layer(tiny, template, site):
    layer = 1
    name = template.format(l=layer)
    assert S.parse_site(name) == (site, layer)
    by_hook = _collect(tiny, name)
    by_pair = _collect(tiny, (site, layer))
    by_site = _collect(tiny, site, layers=[layer])
    assert by_hook.layers == by_pair.layers == by_site.layers == {site: [layer]}
    assert torch.equal(by_hook[site], by_site[site]) and torch.equal(by_pair[site], by_site[site])


def test_hook_names_mix_with_site_names_and_layers(tiny_llama):
    acts = _collect(tiny_llama, ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post",
                                 "blocks.0.mlp.hook_post", "resid_mid", "ln_final.hook_out"],
                    position="all", layers=[1])
    assert acts.layers == {"resid_post": [0, 2], "mlp_post": [0], "resid_mid": [1],
                           "final_norm": [tiny_llama.cfg.n_layers - 1]}
    ref = _collect(tiny_llama, ["resid_post", "mlp_post", "resid_mid", "final_norm"], position="all")
    for site, layers in acts.layers.items():
        for layer in layers:
            assert torch.equal(acts[site, layer], ref[site, layer]), (site, layer)
    assert torch.equal(acts.lengths, ref.lengths)


def test_hook_names_elsewhere_and_unknown_names(tiny_llama):
    assert S.hook_name(tiny_llama, "blocks.2.attn.hook_z") == "blocks.2.attn.hook_z"
    assert S.hook_name(tiny_llama, ("mlp_post", 1)) == "blocks.1.mlp.hook_post"
    assert S.hook_name(tiny_llama, "ln_final.hook_out") == "ln_final.hook_out"
    assert S.parse_site("blocks.0.attn.hook_pattern") == ("pattern", 0)
    assert S.site_width(tiny_llama, "blocks.0.attn.hook_z") == S.site_width(tiny_llama, "z")
    with pytest.raises(ValueError, match="layer 2"):
        S.hook_name(tiny_llama, "blocks.2.hook_resid_post", 1)
    for bad in ("blocks.1.hook_bogus", "resid_bogus", "blocks.x.hook_resid_post"):
        with pytest.raises(S.UnknownSiteError) as e:
            _collect(tiny_llama, bad)
        msg = str(e.value)
        assert bad in msg and "blocks.<layer>.<hook>" in msg and "hook_resid_post" in msg
        assert "resid_post" in msg and "(site, layer)" in msg
    with pytest.raises(IndexError, match="out of range"):
        _collect(tiny_llama, "blocks.9.hook_resid_post")
    # an Intervention named by hook stores the site name
    iv = Intervention("blocks.1.attn.hook_z", 1, "zero", units=[0])
    assert iv.site == "z"
    with pytest.raises(ValueError, match="layer 1"):
        Intervention("blocks.1.attn.hook_z", 2, "zero")


# ----------------------------------------------------------------------------- A2: acts[site, layer]


def test_acts_index_by_site_and_model_layer(tiny_llama):
    for position in ("last", "all"):
        acts = _collect(tiny_llama, ("resid_post", "z"), position=position, layers=[0, 2])
        assert acts["resid_post"].shape[1] == 2  # the site alone: unchanged
        for site in ("resid_post", "z"):
            for j, layer in enumerate([0, 2]):
                assert torch.equal(acts[site, layer], acts[site][:, j])
                assert torch.equal(acts[site, layer], acts.layer(site, layer))
        assert torch.equal(acts["blocks.2.hook_resid_post"], acts["resid_post"][:, 1])
        assert torch.equal(acts["blocks.0.attn.hook_z"], acts["z"][:, 0])
        assert acts["z", 2].shape == (3, *acts["z"].shape[2:])
        with pytest.raises(KeyError, match=r"layer 1 .*collected layers: \[0, 2\]"):
            acts["resid_post", 1]
        with pytest.raises(KeyError, match="not collected"):
            acts["mlp_out", 0]
        assert ("resid_post", 2) in acts and ("resid_post", 1) not in acts and "mlp_out" not in acts


# ----------------------------------------------------------------------------- A3: a string is one prompt


def test_a_bare_string_is_one_prompt(tiny_llama):
    text = "I waited an hour"
    one = _collect(tiny_llama, "resid_post", prompts=text)
    lst = _collect(tiny_llama, "resid_post", prompts=[text])
    assert len(one) == 1 and torch.equal(one["resid_post"], lst["resid_post"])
    assert one.meta["n"] == 1 and one.meta["prompts_hash"] == lst.meta["prompts_hash"]
    allpos = _collect(tiny_llama, "resid_post", prompts=text, position="all")
    assert allpos["resid_post"].shape[0] == 1

    r1, rl = ec.emotion_readout(tiny_llama, "I feel"), ec.emotion_readout(tiny_llama, ["I feel"])
    assert r1.mass.shape == (1, len(r1.emotions)) and np.array_equal(r1.mass, rl.mass)
    assert torch.equal(JR.last_token_logits(tiny_llama, "I feel"), JR.last_token_logits(tiny_llama, ["I feel"]))
    judged = JR.LogitReadout(tiny_llama).judge("I feel", "joy")
    assert len(judged.labels) == 1

    g1 = ec.generate(tiny_llama, text, max_new_tokens=4, progress=False)
    gl = ec.generate(tiny_llama, [text], max_new_tokens=4, progress=False)
    assert len(g1.texts) == 1 and g1.texts == gl.texts and g1.tokens == gl.tokens

    t1, tl = ec.tokenize(tiny_llama, text), ec.tokenize(tiny_llama, [text])
    assert len(t1) == 1 and torch.equal(t1.tokens, tl.tokens)
    p = ec.Prompt(text, emotion="anger")
    assert torch.equal(_collect(tiny_llama, "resid_post", prompts=p)["resid_post"], lst["resid_post"])


# ----------------------------------------------------------------------------- A4: load_model("tiny-*")


@pytest.mark.parametrize("name,arch", [("tiny-llama", "llama"), ("tiny-gemma", "gemma")])
def test_load_model_tiny(name, arch):
    m = ec.load_model(name)
    ref = models.tiny_model(arch, seed=0)
    assert m.cfg.n_layers == ref.cfg.n_layers == 3
    tok = ec.tokenize(m, PROMPTS)
    assert torch.equal(m(tok.tokens, attention_mask=tok.attention_mask),
                       ref(tok.tokens, attention_mask=tok.attention_mask))
    assert ec.load_model(name.upper(), device="cpu", dtype="float32").cfg.n_layers == 3
    with pytest.raises(ValueError, match="float32"):
        ec.load_model(name, dtype="bf16")


# ----------------------------------------------------------------------------- A5: steer with a dict


def _logits(model, **steer_kw):
    tok = ec.tokenize(model, PROMPTS)
    with ec.steer(model, **steer_kw):
        return model(tok.tokens, attention_mask=tok.attention_mask)


@pytest.mark.parametrize("scale", ["none", "rms"])
def test_steer_with_a_layer_dict_equals_the_tensor_form(tiny, scale):
    g = torch.Generator().manual_seed(3)
    d = tiny.cfg.d_model
    v0, v2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    table = torch.zeros(tiny.cfg.n_layers, d)
    table[0], table[2] = v0, v2
    ref = _logits(tiny, directions=table, layers=[0, 2], strength=2.5, scale=scale)
    got = _logits(tiny, directions={2: v2, 0: v0}, strength=2.5, scale=scale)  # layers = the keys
    assert torch.equal(got, ref)
    got = _logits(tiny, directions={0: v0, 2: v2, -2: v2}, layers=[0, 2], strength=2.5, scale=scale)
    assert torch.equal(got, ref)  # only the asked layers; -2 is layer 1
    one = _logits(tiny, directions={2: v2}, strength=2.5, scale=scale)
    assert torch.equal(one, _logits(tiny, directions=v2, layers=[2], strength=2.5, scale=scale))
    by_hook = _logits(tiny, directions=v2, site="blocks.2.hook_resid_post", strength=2.5, scale=scale)
    assert torch.equal(by_hook, one)


def test_steer_dict_warnings_and_errors(tiny_llama):
    d = tiny_llama.cfg.d_model
    v = torch.ones(d)
    with pytest.warns(ST.ImplicitScaleWarning):
        with ec.steer(tiny_llama, {1: v}) as vecs:
            assert list(vecs) == [1] and torch.equal(vecs[1], v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ST.ImplicitScaleWarning)
        with ec.steer(tiny_llama, {1: v}, scale="rms"):
            pass
    with pytest.raises(KeyError, match="layer 2"):
        with ec.steer(tiny_llama, {1: v}, layers=[2], scale="none"):
            pass
    with pytest.raises(ValueError, match="width"):
        with ec.steer(tiny_llama, {1: torch.ones(d + 1)}, scale="none"):
            pass
    with pytest.raises(ValueError, match=r"\[d\]"):
        with ec.steer(tiny_llama, {1: torch.ones(2, d)}, scale="none"):
            pass
    with pytest.raises(TypeError, match="ints"):
        with ec.steer(tiny_llama, {"1": v}, scale="none"):
            pass
    with pytest.raises(ValueError, match="emotion="):
        with ec.steer(tiny_llama, {1: v}, emotion="joy", scale="none"):
            pass
    with pytest.raises(ValueError, match="layer 1"):
        with ec.steer(tiny_llama, v, layers=[2], site="blocks.1.hook_resid_post", scale="none"):
            pass


# ----------------------------------------------------------------------------- B: results show themselves


@pytest.fixture(scope="module")
def instances():
    tiny = models.tiny_model("llama", seed=0)
    return {name: build(tiny) for name, build in TR.BUILDERS.items()}


def test_every_result_repr_is_compact(instances):
    for name, obj in instances.items():
        r = repr(obj)
        assert r.startswith(f"{name}(") and r.endswith(")"), r
        assert len(r) < 400, (name, len(r), r)
        assert "tensor(" not in r and "array(" not in r, r
        html = obj._repr_html_()
        assert isinstance(html, str) and html.startswith("<") and name in html
        assert "tensor(" not in html and "array(" not in html


def test_repr_shows_kind_shapes_emotions_layers(instances):
    r = repr(instances["EmotionDirections"])
    assert "emotions=[anger, joy, fear]" in r and "layers=[0, 2]" in r and "float32[3, 2, 8]" in r
    r = repr(instances["Activations"])
    assert "resid_post: float32[3, 2, 6, 64]" in r and "layers=" in r
    r = repr(instances["EmotionCircuit"])
    assert "emotion='joy'" in r and "neurons=3 [2, 0, 1]" in r and "heads=3 [1, 2, 0]" in r
    assert "float32[3, 2]" in repr(instances["ReadoutResult"])
    # a big result stays small: a 30-layer circuit with thousands of values
    big = ec.circuits.EmotionCircuit("anger", [list(range(400))] * 30, [[0, 1]] * 30,
                                     [torch.randn(400)] * 30, [torch.randn(2, 64)] * 30)
    assert len(repr(big)) < 300
    ps = instances["ProbeSweep"]
    assert len(repr(ps)) <= type(ps).REPR_LIMIT


def test_repr_html_uses_the_table_when_tabular(instances):
    html = instances["HeadImportance"]._repr_html_()
    assert "<table" in html and "score" in html  # the to_dataframe head


DATAFRAME_COLUMNS = {
    "AccuracyTable": ["group", "name", "accuracy"],
    "JudgeResult": ["label", "match", "abstained", "anger", "joy"],
    "ReadoutResult": ["label", "anger", "joy"],
    "GenerationResult": ["text", "n_tokens", "prompt_length"],
    "FluencyResult": ["perplexity", "repeated_ngram_rate"],
    "MethodEvaluation": ["emotion", "match", "label"],
    "Decodability": ["layer", "centered", "uncentered", "chance"],
    "EmotionDirections": ["site", "emotion", "layer", "norm", "max_cos_other"],
    "EmotionCircuit": ["emotion", "kind", "layer", "unit", "delta"],
    "InfluenceResult": ["emotion", "alpha", "sublayer", "layer", "influence"],
    "Allocation": ["layer", "neurons", "heads"],
    "VAComparison": ["layer", "valence_cos", "arousal_cos", "axis_cos_a", "axis_cos_b"],
    "ControllabilityResult": ["target_valence", "target_arousal", "text_valence", "text_arousal"],
    "ReadoutAccuracy": ["emotion", "accuracy", "accuracy_no_keyword", "target_share",
                        "neutral_target_share"],
    "ZeroShotResult": ["reply", "prediction", "constrained", "anger", "joy", "fear"],
}


@pytest.mark.parametrize("name", sorted(DATAFRAME_COLUMNS))
def test_to_dataframe_columns(instances, name):
    df = instances[name].to_dataframe()
    assert list(df.columns) == DATAFRAME_COLUMNS[name]
    assert len(df) > 0


def test_dataframes_carry_real_layer_numbers(instances):
    hi = instances["HeadImportance"]
    df = hi.to_dataframe()
    assert {"layer", "head", "emotion", "score"} <= set(df.columns)
    assert sorted(set(df["layer"])) == hi.layers
    row = df[(df.emotion == "joy") & (df.layer == 1) & (df["head"] == 3)].iloc[0]
    assert row["score"] == pytest.approx(float(hi.mean[1, 1, 3]))
    nc = instances["NeuronContributions"].to_dataframe()
    assert {"layer", "neuron", "emotion", "score"} <= set(nc.columns)
    assert np.array_equal(nc["score"].to_numpy(), nc["C_mean"].to_numpy())
    dirs = TR.BUILDERS["EmotionDirections"](None)
    assert sorted(set(dirs.to_dataframe()["layer"])) == [0, 2]
    circ = instances["EmotionCircuit"].to_dataframe()
    assert len(circ) == 6 and set(circ["kind"]) == {"neuron", "head"}
    assert circ[circ.kind == "neuron"]["unit"].tolist() == [3, 1, 7]
    acc = instances["AccuracyTable"].to_dataframe()
    assert acc.iloc[0].tolist()[:2] == ["overall", "all"]
    ro = instances["ReadoutResult"]
    share = ro.to_dataframe(values="share")
    assert np.array_equal(share[["anger", "joy"]].to_numpy(), ro.share)
    assert share["label"].tolist() == ro.labels


PLOTS = ["Decodability", "KeywordControlResult", "EmotionDirections", "CosineMatrix",
         "HeadImportance", "ComponentSweep", "InfluenceResult", "EmotionCircuit", "PatchingResult",
         "ProbeSweep", "SteeringSweep", "MethodComparison"]


@pytest.mark.parametrize("name", PLOTS)
def test_plot_returns_a_figure(instances, name):
    fig = instances[name].plot()
    assert isinstance(fig, Figure) and fig.axes


def test_plot_options_and_figures_still_save(instances, tmp_path):
    from emocircuits.viz import figures as F

    assert isinstance(instances["HeadImportance"].plot(emotion="fear"), Figure)
    with pytest.raises(KeyError):
        instances["HeadImportance"].plot(emotion="calm")
    assert isinstance(instances["SteeringSweep"].plot(metric="perplexity"), Figure)
    assert isinstance(instances["EmotionDirections"].plot(layer=2, site="resid_mid"), Figure)
    out = F.probe_accuracy({"a": [0.2, 0.5]}, tmp_path / "p.png", layers=[0, 1])
    assert out == tmp_path / "p.png" and out.is_file() and not F.png_is_blank(out)
    fig = F.probe_accuracy({"a": [0.2, 0.5]}, layers=[0, 1])
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "f.png")  # a returned Figure still draws
    assert not F.png_is_blank(tmp_path / "f.png")


def test_a_bare_string_is_one_pair_in_fluency(tiny_llama):
    one = ec.evaluate.fluency(tiny_llama, "I feel", "happy today")
    lst = ec.evaluate.fluency(tiny_llama, ["I feel"], ["happy today"])
    assert len(one.perplexity) == 1 and one.perplexity == lst.perplexity
