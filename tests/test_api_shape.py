"""One definition per concept, one public API shape: merged functions against brute-force
references on random data, deprecated aliases (still working, warning), EmotionDirections in."""

from __future__ import annotations

import warnings

import numpy as np
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


# ------------------------------------------------------------------ interventions: one factory


def _old_steer_hooks(model, vecs, alpha, scale, positions, site="resid_post"):
    """The steering hooks as they were before ``interventions`` (the reference)."""
    from emocircuits import sites as S
    from emocircuits.generation import is_decoding

    state = {"step": 0}
    idx = positions.long() if isinstance(positions, torch.Tensor) else None
    mode = "index" if idx is not None else positions

    def counter(x, hook):  # noqa: ARG001
        state["step"] = state["step"] + 1 if is_decoding(model) else 0
        return x

    def make(layer):
        v_cpu = vecs[layer]

        def hook(x, hook):  # noqa: ARG001
            decoding = is_decoding(model)
            if mode == "generated" and not decoding:
                return x
            if idx is not None and decoding:
                return x
            a = float(alpha(state["step"])) if callable(alpha) else float(alpha)
            if a == 0.0:
                return x
            v = v_cpu.to(x.device)
            if mode == "all":
                part = x
            elif idx is None:
                part = x[:, -1:]
            else:
                cols = idx.to(x.device)
                if cols.dim() == 1:
                    cols = cols.unsqueeze(0).expand(x.shape[0], -1)
                cols = cols % x.shape[1]
                g = cols.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                part = torch.gather(x, 1, g)
            pf = part.float()
            if scale == "rms":
                add = a * torch.sqrt(pf.pow(2).mean(-1, keepdim=True) + 1e-12) * v
            else:
                add = (a * v).expand_as(pf)
            new = (pf + add).to(x.dtype)
            if mode == "all":
                return new
            out = x.clone()
            if idx is None:
                out[:, -1:] = new
            else:
                out.scatter_(1, g, new)
            return out
        return hook

    fwd = [(S.hook_name(model, "resid_pre", 0), counter)] if callable(alpha) else []
    return fwd + [(S.hook_name(model, site, layer), make(layer)) for layer in vecs]


def _old_unit_hooks(model, by_layer, lam, positions, ablate):
    """circuits.circuit_hooks / components._intervention_hooks as they were (the reference):
    ``by_layer[(site, layer)] = (ids, values)``."""
    from emocircuits import sites as S

    hooks = []
    for (site, layer), (ids_list, vals) in by_layer.items():
        ids_cpu = torch.tensor(ids_list, dtype=torch.long)

        def hook(x, hook, ids_cpu=ids_cpu, vals=vals, site=site):  # noqa: ARG001
            ids = ids_cpu.to(x.device)
            out = x.clone()
            sl = slice(None) if positions == "all" else slice(-1, None)
            part = out[:, sl]
            if site == "mlp_post":
                part[..., ids] = (torch.zeros_like(part[..., ids]) if ablate
                                  else part[..., ids] + lam * vals.to(x.device, x.dtype))
            else:
                part[:, :, ids] = (torch.zeros_like(part[:, :, ids]) if ablate
                                   else part[:, :, ids] + lam * vals.to(x.device, x.dtype))
            return out
        hooks.append((S.hook_name(model, site, layer), hook))
    return hooks


def _logits(model, hooks=()):
    from emocircuits.prompts import tokenize

    b = tokenize(model, ["The cat sat on the mat and", "Hello there", "One two three four five"])
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        return model(b.tokens, attention_mask=b.attention_mask)


@pytest.mark.parametrize("scale", ["rms", "none"])
@pytest.mark.parametrize("positions", ["last", "all", "generated", "index"])
def test_steer_on_interventions_is_bitwise_the_old_hooks(tiny, scale, positions):
    from emocircuits.generation import GenerationConfig, generate
    from emocircuits.steering import steer, steering_vectors

    m = tiny
    g = torch.Generator().manual_seed(11)
    v = torch.randn(m.cfg.n_layers, m.cfg.d_model, generator=g)
    pos = torch.tensor([-3, -1]) if positions == "index" else positions
    lay = [0, 2]
    vecs = steering_vectors(m, v, lay)
    want = _logits(m, _old_steer_hooks(m, vecs, 3.0, "rms" if scale == "rms" else "unit", pos))
    with steer(m, v, lay, 3.0, scale=scale, positions=pos):
        got = _logits(m)
    assert torch.equal(got, want)
    if positions in ("last", "generated"):
        def sched(k):
            return 2.0 / (1 + k)
        cfg = GenerationConfig(max_new_tokens=4)
        with m.hooks(fwd_hooks=_old_steer_hooks(m, vecs, sched, scale if scale == "rms" else "unit", pos)):
            ref = generate(m, ["Hello there", "The cat sat"], cfg, progress=False)
        with steer(m, v, lay, sched, scale=scale, positions=pos):
            new = generate(m, ["Hello there", "The cat sat"], cfg, progress=False)
        assert new.tokens == ref.tokens


@pytest.mark.parametrize("ablate", [False, True])
@pytest.mark.parametrize("positions", ["last", "all"])
def test_unit_interventions_are_bitwise_the_old_hooks(tiny, ablate, positions):
    from emocircuits.interventions import Intervention, intervene

    m = tiny
    g = torch.Generator().manual_seed(12)
    by_layer = {("mlp_post", 1): ([3, 0, 7], torch.randn(3, generator=g)),
                ("z", 0): ([1], torch.randn(1, m.cfg.d_head, generator=g)),
                ("z", 2): ([0, 2], torch.randn(2, m.cfg.d_head, generator=g))}
    want = _logits(m, _old_unit_hooks(m, by_layer, 1.7, positions, ablate))
    ivs = [Intervention(site, layer, "zero" if ablate else "shift", units=ids, value=vals, strength=1.7,
                        positions=positions) for (site, layer), (ids, vals) in by_layer.items()]
    with intervene(m, ivs):
        got = _logits(m)
    assert torch.equal(got, want)
    assert not torch.equal(got, _logits(m))  # it did something


def test_modulate_ablate_and_component_sweep_ride_the_factory(tiny_llama):
    m = tiny_llama
    g = torch.Generator().manual_seed(13)
    mlp_delta = torch.randn(m.cfg.n_layers, m.cfg.d_mlp, generator=g)
    z_delta = torch.randn(m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_head, generator=g)
    neurons = [[1, 4], [], [0, 2, 5]][: m.cfg.n_layers] + [[] for _ in range(max(0, m.cfg.n_layers - 3))]
    heads = [[0], [1, 2], []][: m.cfg.n_layers] + [[] for _ in range(max(0, m.cfg.n_layers - 3))]
    c = CI.build_circuit("anger", neurons, heads, mlp_delta, z_delta)
    for ablate, npos in ((False, "last"), (True, "all")):
        by = {}
        for L in range(m.cfg.n_layers):
            if neurons[L]:
                by[("mlp_post", L)] = (neurons[L], c.neuron_values[L])
        want_n = _old_unit_hooks(m, by, 0.5, npos, ablate)
        by = {("z", L): (heads[L], c.head_values[L]) for L in range(m.cfg.n_layers) if heads[L]}
        want = _logits(m, want_n + _old_unit_hooks(m, by, 0.5, "all", ablate))
        ctx = CI.ablate(m, c) if ablate else CI.modulate(m, c, 0.5)
        with ctx:
            got = _logits(m)
        assert torch.equal(got, want), ablate
    # component_sweep's interventions: zero / shift Δμ of the given components
    ivs = K.sweep_interventions([(1, 3), (0, 5), (1, 7)], "neuron", "enhance", mlp_delta, 2.0, "last")
    assert [(iv.layer, list(map(int, iv.units))) for iv in ivs] == [(1, [3, 7]), (0, [5])]
    torch.testing.assert_close(ivs[0].value, mlp_delta[1, [3, 7]], rtol=0, atol=0)


def test_intervene_removes_hooks_on_exceptions(tiny_llama):
    from emocircuits.interventions import Intervention, intervene
    from emocircuits.steering import steer

    m = tiny_llama
    base = _logits(m)
    v = torch.randn(m.cfg.d_model)
    ivs = [Intervention("resid_post", 1, "shift", value=v, strength=4.0, positions="all"),
           Intervention("mlp_post", 0, "scale", units=[0, 1, 2], strength=3.0, positions="all"),
           Intervention("z", 1, "set", units=[0], value=torch.ones(m.cfg.d_head), positions="last")]
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(m, ivs):
            assert not torch.equal(_logits(m), base)
            raise RuntimeError("boom")
    assert torch.equal(_logits(m), base)
    with pytest.raises(KeyError):
        with steer(m, v, [0], 2.0, scale="none"):
            raise KeyError("inside")
    assert torch.equal(_logits(m), base)
    c = CI.build_circuit("a", [[0]] + [[] for _ in range(m.cfg.n_layers - 1)],
                         [[0]] + [[] for _ in range(m.cfg.n_layers - 1)],
                         torch.ones(m.cfg.n_layers, m.cfg.d_mlp), torch.ones(m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_head))
    for ctx in (CI.modulate(m, c, 5.0), CI.ablate(m, c)):
        with pytest.raises(ValueError, match="x"):
            with ctx:
                raise ValueError("x")
        assert torch.equal(_logits(m), base)
    with pytest.raises(ValueError, match="op"):
        with intervene(m, [Intervention("mlp_post", 0, "double", units=[0])]):  # type: ignore[arg-type]
            pass
    assert torch.equal(_logits(m), base)


def test_interventions_scale_set_and_index_positions(tiny_llama):
    """scale / set / index positions against a direct edit of the captured activation."""
    from emocircuits import sites as S
    from emocircuits.interventions import Intervention, intervene

    m = tiny_llama
    name = S.hook_name(m, "mlp_post", 1)
    seen = {}

    def grab(key):
        def hook(x, hook):  # noqa: ARG001
            seen[key] = x.detach().clone()
            return x
        return hook

    _logits(m, [(name, grab("clean"))])
    pos = torch.tensor([-2, 0])
    with intervene(m, [Intervention("mlp_post", 1, "scale", units=[2, 5], strength=-2.0, positions=pos)]):
        _logits(m, [(name, grab("scaled"))])
    want = seen["clean"].clone()
    cols = pos % want.shape[1]
    for c in cols.tolist():
        want[:, c, [2, 5]] *= -2.0
    assert torch.equal(seen["scaled"], want)
    val = torch.tensor([0.5, -1.5])
    with intervene(m, [Intervention("mlp_post", 1, "set", units=[4, 6], value=val, positions="last")]):
        _logits(m, [(name, grab("set"))])
    want = seen["clean"].clone()
    want[:, -1, [4, 6]] = val
    assert torch.equal(seen["set"], want)


# ------------------------------------------------------------------ strength / gen_config / scale


def test_strength_alias_and_explicit_scale(tiny_llama):
    from emocircuits.steering import ImplicitScaleWarning, steer

    m = tiny_llama
    v = torch.randn(m.cfg.n_layers, m.cfg.d_model, generator=torch.Generator().manual_seed(21))
    with steer(m, v, [1], strength=2.0, scale="rms"):
        want = _logits(m)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with steer(m, v, [1], alpha=2.0, scale="rms"):
            got = _logits(m)
    assert torch.equal(got, want)
    assert any(issubclass(x.category, DeprecationWarning) and "alpha" in str(x.message) for x in w)
    assert all(x.filename == __file__ for x in w if issubclass(x.category, DeprecationWarning))
    with pytest.raises(TypeError, match="strength"):
        with steer(m, v, [1], strength=3.0, alpha=2.0, scale="rms"):
            pass
    # a raw tensor without scale= keeps the documented default (rms) but says so
    with pytest.warns(ImplicitScaleWarning, match="scale="):
        with steer(m, v, [1], 2.0):
            implicit = _logits(m)
    assert torch.equal(implicit, want)
    # "none" adds strength·v, "unit" is its old name; EmotionDirections: no warning
    with steer(m, v, [1], 2.0, scale="none"):
        none = _logits(m)
    with steer(m, v, [1], 2.0, scale="unit"):
        assert torch.equal(_logits(m), none)
    dirs = EmotionDirections(["anger"], list(range(m.cfg.n_layers)), {"resid_post": v[None]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplicitScaleWarning)
        with steer(m, dirs, [1], 2.0, emotion="anger"):
            assert torch.equal(_logits(m), want)


def test_gen_config_and_strength_keyword_aliases(tiny_llama):
    from emocircuits import control as CT
    from emocircuits.generation import GenerationConfig, generate

    m = tiny_llama
    cfg = GenerationConfig(max_new_tokens=3)
    want = generate(m, ["Hello there"], gen_config=cfg, progress=False).tokens
    assert _deprecated(generate, m, ["Hello there"], config=cfg, progress=False).tokens == want
    assert generate(m, ["Hello there"], cfg, progress=False).tokens == want  # positional still works
    with pytest.raises(TypeError, match="gen_config"):
        generate(m, ["Hello there"], cfg, config=cfg, progress=False)
    # controllability: config= -> gen_config=
    L, d = m.cfg.n_layers, m.cfg.d_model
    va = CT.VADirections(torch.randn(2, L, d, generator=torch.Generator().manual_seed(2)), list(range(L)), "t")

    def judge_va(texts):
        return np.zeros((len(texts), 2))

    kw = dict(strength=1.0, judge_va=judge_va, progress=False)
    a = CT.controllability(m, ["Hi"], va, [(1.0, 0.0)], gen_config=cfg, **kw)
    b = _deprecated(CT.controllability, m, ["Hi"], va, [(1.0, 0.0)], config=cfg, **kw)
    assert a.texts == b.texts
    # component_sweep: lam= -> strength=
    from emocircuits.prompts import Prompt

    ps = [Prompt("Reply in anger. The bus never came.", emotion="anger", skeleton_id="s0", valence="neutral")]
    dmu = torch.randn(L, m.cfg.d_mlp, generator=torch.Generator().manual_seed(3))
    kw = dict(kind="neuron", ks=(1,), mode="enhance", delta_mu=dmu, n_random=1, progress=False)
    s1 = K.component_sweep(m, ps, "anger", [(1, 2)], strength=2.0, **kw)
    s2 = _deprecated(K.component_sweep, m, ps, "anger", [(1, 2)], lam=2.0, **kw)
    torch.testing.assert_close(s1.top, s2.top, rtol=0, atol=0, equal_nan=True)
    assert s1.meta["strength"] == 2.0


def test_steering_sweep_strengths_alias(tiny_llama):
    from emocircuits.generation import GenerationConfig
    from emocircuits.steering import SteeringSweep, SweepResult, steering_sweep

    m = tiny_llama
    dirs = _random_dirs(E=2, L=m.cfg.n_layers, d=m.cfg.d_model, sites=("resid_post",))
    kw = dict(gen_config=GenerationConfig(max_new_tokens=2), progress=False, include_baseline=False)
    a = steering_sweep(m, ["Hi"], dirs, ["anger", "fear"], [[1]], [2.0], **kw)
    b = _deprecated(steering_sweep, m, ["Hi"], dirs, ["anger", "fear"], [[1]], alphas=[2.0], **kw)
    assert [r["readout_share"] for r in a.rows] == [r["readout_share"] for r in b.rows]
    assert a.rows[0]["strength"] == a.rows[0]["alpha"] == 2.0
    assert a.summary()[0]["strength"] == 2.0 and SweepResult is SteeringSweep


def test_emotion_directions_accepted_everywhere(tiny_llama):
    from emocircuits import control as CT

    m = tiny_llama
    L = m.cfg.n_layers
    dirs = _random_dirs(E=3, L=L, d=m.cfg.d_model, seed=31)
    dirs = EmotionDirections(["anger", "fear", "happiness"], dirs.layers, dirs.vectors)
    # va_directions
    a = CT.va_directions("lstsq", directions=dirs)
    b = CT.va_directions("lstsq", directions=dirs.tensor("resid_post"), emotions=dirs.emotions,
                         layers=dirs.layers)
    assert torch.equal(a.vectors, b.vectors) and a.layers == b.layers
    # sublayer_influence
    sigma = torch.rand(2, L) + 0.5
    kw = dict(alphas=(0.5,), batch_size=2, progress=False)
    r1 = CI.sublayer_influence(m, ["Hello there", "One two"], dirs, sigma=sigma, **kw)
    r2 = CI.sublayer_influence(m, ["Hello there", "One two"], dirs.tensor("resid_mid"),
                               dirs.tensor("resid_post"), sigma, emotions=dirs.emotions, **kw)
    assert torch.equal(r1.influence, r2.influence) and r1.emotions == dirs.emotions
    # head attribution, final readout: v_ref defaults to circuits.reference_direction(dirs)
    from emocircuits.prompts import Prompt

    ps = [p for p in _component_prompts() if p.emotion in ("anger", "fear")]
    ps += [Prompt("Reply in happiness. We met.", emotion="happiness", skeleton_id="s0", valence="neutral")]
    f1 = K.head_attribution(m, ps, None, readout="final", directions_mid=dirs, progress=False)
    f2 = K.head_attribution(m, ps, None, dirs.emotions, readout="final",
                            v_ref=CI.reference_direction(dirs), progress=False)
    assert torch.equal(f1.mean, f2.mean)
    h1 = K.head_importance(m, ps, None, dirs, method="closed_form", layers=[1], progress=False)
    h2 = K.head_importance(m, ps, None, dirs.tensor("resid_mid"), dirs.emotions, method="closed_form",
                           layers=[1], progress=False)
    assert torch.equal(h1.mean, h2.mean)


def test_hidden_at_gives_collect_numbers(tiny):
    """hidden_at (token ids) == collect(position=index tensor) (texts) batched alike."""
    from emocircuits.activations import collect
    from emocircuits.probes import hidden_at
    from emocircuits.prompts import encode

    texts = ["The cat sat on the mat and", "Hello there", "One two three four five six", "Why?"]
    ids = [encode(tiny, t) for t in texts]
    pos = [[-1, 0], [-2, 1], [-1, 2], [-1, 1]]
    h = hidden_at(tiny, ids, pos, [0, 2], batch_size=3)
    a = collect(tiny, texts, "resid_post", torch.tensor(pos), layers=[0, 2], batch_size=3,
                sort_by_length=False, progress=False)
    assert torch.equal(h, a["resid_post"])
    with pytest.raises(IndexError, match="row 3: position 9"):
        hidden_at(tiny, ids, pos[:3] + [[9, 0]], [0])


def test_result_names_are_distinct_with_old_aliases():
    from emocircuits import steering

    assert K.SweepResult is K.ComponentSweep and steering.SweepResult is steering.SteeringSweep
    assert K.ComponentSweep is not steering.SteeringSweep


def test_valence_score_one_helper():
    from emocircuits.emotions import valence_score
    from emocircuits.probes import valence_of

    rng = np.random.default_rng(5)
    classes = ("anger", "happiness", "surprise", "sadness", "neutral")
    p = rng.dirichlet(np.ones(5), size=7)
    brute = p[:, 1] - (p[:, 0] + p[:, 3])  # positive: happiness; negative: anger, sadness
    np.testing.assert_allclose(valence_score(p, classes), brute, rtol=0, atol=1e-15)
    np.testing.assert_allclose(_deprecated(valence_of, p, classes), brute, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="probs must be"):
        valence_score(p[:, :3], classes)
