"""One definition per concept, one public API shape: merged functions against brute-force
references on random data, deprecated aliases (still working, warning), EmotionDirections in."""

from __future__ import annotations

import warnings

import pytest
import torch

from emocircuits import circuits as CI
from emocircuits import components as K
from emocircuits.directions import EmotionDirections, direction_tensor


def _deprecated(fn, *args, **kwargs):
    """Call ``fn`` and return its result, asserting that it raised a DeprecationWarning."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    assert any(issubclass(x.category, DeprecationWarning) for x in w), [str(x.message) for x in w]
    return out


def _random_dirs(E=3, L=6, d=8, seed=0, sites=("resid_mid", "resid_post")):
    g = torch.Generator().manual_seed(seed)
    vecs = {}
    for s in sites:
        v = torch.randn(E, L, d, generator=g)
        vecs[s] = v / v.norm(dim=-1, keepdim=True)
    return EmotionDirections(["anger", "fear", "joy"][:E], list(range(L)), vecs)


# ------------------------------------------------------------------ EmotionDirections accessors


def test_emotion_directions_tensor_and_vector():
    dirs = _random_dirs()
    assert torch.equal(dirs.tensor("resid_mid"), dirs.vectors["resid_mid"])
    assert torch.equal(dirs.tensor("resid_post", ["joy", "anger"]), dirs.vectors["resid_post"][[2, 0]])
    assert torch.equal(dirs.vector("fear", 4, "resid_mid"), dirs.vectors["resid_mid"][1, 4])
    sub = EmotionDirections(dirs.emotions, [3, 1], {"resid_post": dirs.vectors["resid_post"][:, [3, 1]]})
    with pytest.raises(ValueError, match="lack model layers"):
        sub.tensor("resid_post", n_layers=4)
    t, emos = direction_tensor(dirs, "resid_post")
    assert emos == dirs.emotions and torch.equal(t, dirs.vectors["resid_post"])
    raw = torch.randn(3, 6, 8)
    t, emos = direction_tensor(raw, "resid_post", ["a", "b", "c"])
    assert t is raw and emos == ["a", "b", "c"]


# ------------------------------------------------------------------ reference direction


def test_reference_direction_one_definition():
    dirs = _random_dirs(L=28, seed=1)
    mid, post = dirs.vectors["resid_mid"], dirs.vectors["resid_post"]
    want = []
    for e in range(3):  # brute force: sign-align to attn L21, sum, normalise
        us = [u / u.norm() for L in range(21, 26) for u in (mid[e, L].double(), post[e, L].double())]
        acc = sum((u if float(u @ us[0]) >= 0 else -u) for u in us)
        want.append(acc / acc.norm())
    want = torch.stack(want).float()
    torch.testing.assert_close(CI.reference_direction(mid, post), want)
    torch.testing.assert_close(CI.reference_direction(dirs), want)
    torch.testing.assert_close(CI.reference_direction(dirs, emotion="fear"), want[1])
    torch.testing.assert_close(CI.reference_direction(mid[2], post[2]), want[2])
    old = _deprecated(K.reference_direction, mid, post)
    torch.testing.assert_close(old, want)
    with pytest.raises(ValueError, match="band"):
        CI.reference_direction(mid[0], post[0], band=[30])


# ------------------------------------------------------------------ difference vectors


def _emotion_prompts(n_scen=3, emos=("anger", "fear", "joy")):
    from emocircuits.prompts import Prompt

    return [Prompt(f"Reply in {e}. Story {s} went {v}.", emotion=e, skeleton_id=f"s{s}", valence=v)
            for s in range(n_scen) for v in ("positive", "negative") for e in emos]


def test_delta_mu_brute_force_and_the_deprecated_site_helper(tiny_llama):
    from emocircuits.activations import collect

    emos = ["anger", "fear", "joy"]
    prompts = _emotion_prompts()
    x = torch.randn(len(prompts), 2, 5, generator=torch.Generator().manual_seed(4)) * 2 + 3
    u, info = CI.delta_mu(x, prompts, emos)
    assert len(info.used) == 6
    want = torch.zeros(3, 2, 5, dtype=torch.float64)
    for grp in {p.group for p in prompts}:
        rows = {p.emotion: i for i, p in enumerate(prompts) if p.group == grp}
        h = torch.stack([x[rows[e]].double() for e in emos])
        want += (h - h.mean(0)) / 6
    torch.testing.assert_close(u.double(), want, rtol=0, atol=1e-6)
    # the Δμ of both intervention points, and the old per-site helper, are this function
    acts = collect(tiny_llama, prompts, ("mlp_post", "z"), progress=False)
    dv = CI.difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, emos)
    assert torch.equal(dv.mlp, CI.delta_mu(acts["mlp_post"], prompts, emos)[0])
    old = _deprecated(K.difference_vectors, tiny_llama, prompts, emos, "z", layers=[0, 1], progress=False)
    torch.testing.assert_close(old, dv.z[:, [0, 1]])
    from emocircuits.prompts import Prompt

    with pytest.raises(ValueError, match="skeleton ids"):
        CI.delta_mu(x[:1], [Prompt("x", emotion="anger")], emos)


# ------------------------------------------------------------------ neuron / head scores


def _component_prompts():
    from emocircuits.prompts import Prompt

    return [Prompt(f"Reply in {e}. {b}.", emotion=e, skeleton_id=f"s{i}", valence="neutral")
            for i, b in enumerate(["The bus never came", "My friend called", "We found a letter"])
            for e in ("anger", "fear", "joy")]


def test_neuron_scores_one_definition(tiny_llama):
    from emocircuits import sites as S
    from emocircuits.activations import collect

    m = tiny_llama
    prompts = _component_prompts()
    g = torch.Generator().manual_seed(7)
    raw = torch.randn(3, m.cfg.n_layers, m.cfg.d_model, generator=g) * 2
    dirs = EmotionDirections(["anger", "fear", "joy"], list(range(m.cfg.n_layers)),
                             {"resid_post": raw, "resid_mid": raw.flip(0)})
    nc = K.neuron_contributions(m, prompts, None, dirs, progress=False)
    nc_raw = K.neuron_contributions(m, prompts, None, raw, ["anger", "fear", "joy"], progress=False)
    assert torch.equal(nc.C_mean, nc_raw.C_mean)
    W_out = torch.stack([S.W_out(m, L) for L in range(m.cfg.n_layers)])
    acts = collect(m, prompts, "mlp_post", progress=False)["mlp_post"]
    for ei, e in enumerate(dirs.emotions):
        rows = [i for i, p in enumerate(prompts) if p.emotion == e]
        got = K.neuron_scores_from_acts(acts[rows], W_out, raw[ei])
        brute = torch.zeros(m.cfg.n_layers, m.cfg.d_mlp, dtype=torch.float64)
        for L in range(m.cfg.n_layers):
            v = raw[ei, L].double() / raw[ei, L].double().norm()
            brute[L] = acts[rows, L].double().mean(0) * (W_out[L].detach().double() @ v)
        torch.testing.assert_close(got.double(), brute, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, nc.C_mean[ei], rtol=1e-5, atol=1e-7)
        old = _deprecated(CI.neuron_scores_from_acts, acts[rows], W_out, raw[ei])
        assert torch.equal(old, got)


def test_head_scores_one_definition(tiny):
    from emocircuits.activations import collect

    m = tiny
    prompts = _component_prompts()[:6]
    dirs = _random_dirs(L=m.cfg.n_layers, d=m.cfg.d_model, seed=8)
    exact = K.head_ablation_importance(m, prompts, None, dirs, progress=False)  # batched ablation
    acts = collect(m, prompts, ("resid_pre", "attn_o_out", "z"), progress=False)
    v = dirs.tensor("resid_mid")
    for ei, e in enumerate(dirs.emotions):
        rows = [i for i, p in enumerate(prompts) if p.emotion == e]
        if not rows:
            continue
        imp, base = K.head_ablation_scores_from_acts(m, acts["resid_pre"][rows], acts["attn_o_out"][rows],
                                                     acts["z"][rows], v[ei])
        torch.testing.assert_close(imp.mean(0).float(), exact.mean[ei], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(base.mean(0).float(), exact.baseline_mean[ei], atol=1e-5, rtol=1e-4)
    cf = K.head_ablation_importance_closed_form(m, prompts, None, dirs, progress=False)
    assert (cf.mean - exact.mean).abs().max() < 1e-5
    # the resid_mid stand-in is deprecated
    from emocircuits import sites as S

    W_O = torch.stack([S.W_O(m, L) for L in range(m.cfg.n_layers)])
    _deprecated(CI.head_scores_from_acts, acts["z"], W_O, v[0])


# ------------------------------------------------------------------ the emotion token set


def test_one_emotion_token_set_for_readout_and_vocabulary_bias(tiny_llama):
    from emocircuits import control as CT
    from emocircuits.emotions import EKMAN6, EMOTION_WORDS
    from emocircuits.judges.readout import emotion_readout, emotion_token_ids, emotion_tokens

    tok = tiny_llama.tokenizer
    toks = emotion_tokens(tiny_llama, EKMAN6)
    # brute force: first tokens of " w" and "w" that decode to the word or a >= 4-letter prefix
    cand = {}
    for e in EKMAN6:
        cand[e] = set()
        for w in EMOTION_WORDS[e]:
            for s in (" " + w, w):
                t = tok(s, add_special_tokens=False)["input_ids"][0]
                piece = tok.decode([t]).strip().lower()
                if piece == w or (len(piece) >= 4 and w.startswith(piece)):
                    cand[e].add(t)
    for e in EKMAN6:
        others = set().union(*(cand[f] for f in EKMAN6 if f != e))
        assert set(toks.token_ids[e]) == cand[e] - others, e
        assert emotion_token_ids(tiny_llama, e) == toks.token_ids[e]
    s_tok = tok("sad", add_special_tokens=False)["input_ids"][0]  # "s": a fragment, in neither
    assert tok.decode([s_tok]).strip() != "sad" and s_tok not in toks.token_ids["sadness"]
    # the readout measures, and the vocabulary bias pushes, exactly these tokens
    r = emotion_readout(tiny_llama, ["I feel"], EKMAN6)
    assert r.tokens.token_ids == toks.token_ids
    proc = CT.VocabularyBias.for_prompts(tiny_llama, ["Hi"], ["fear"], emotions=EKMAN6)
    assert proc.token_ids == dict(toks.token_ids)
    sch = CT.DecayingSchedule.for_model(tiny_llama, 1.0, emotions=EKMAN6)
    assert sch.token_ids == {t for v in toks.token_ids.values() for t in v}
    assert CT.VocabularyBias(toks, "anger").token_ids == dict(toks.token_ids)  # EmotionTokens in
    old = _deprecated(CT.emotion_word_token_ids, tiny_llama)
    assert old == dict(toks.token_ids)
