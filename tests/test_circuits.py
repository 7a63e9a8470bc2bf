"""Tests for emocircuits.circuits: allocation, Δμ grouping, σ/v_ref, influence, modulation,
ablation, save/load, overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from emocircuits import circuits as C
from emocircuits import sites as S
from emocircuits.generation import GenerationConfig, generate
from emocircuits.prompts import Prompt, tokenize

# ----------------------------------------------------------------------------- allocation

# The paper's committed anger allocation (PAPER_METHOD.md §6.4): the rows the table gives,
# the other layers filled so that Σ L0–11 = 54/26 and Σ L12–27 = 338/142.
ANGER_NEURONS = [4, 4, 4, 4, 5, 4, 5, 4, 4, 5, 5, 6,
                 10, 12, 15, 17, 19, 21, 23, 25, 27, 28, 28, 27, 25, 23, 21, 17]
ANGER_HEADS = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
               4, 5, 6, 6, 7, 8, 9, 10, 11, 11, 12, 12, 11, 11, 10, 9]


def _influence_reproducing(k: list[int], minimum: int, frac_down: dict[int, float],
                           frac_up: dict[int, float]) -> np.ndarray:
    """Weights whose proportional shares are k − min, perturbed to non-integers: layers in
    ``frac_down`` get share t − δ (fraction 1 − δ, must win the remainder), layers in
    ``frac_up`` get t + δ' (small fraction, must not); Σδ = Σδ' keeps the total."""
    t = np.array(k, dtype=np.float64) - minimum
    assert abs(sum(frac_down.values()) - sum(frac_up.values())) < 1e-12
    for L, d in frac_down.items():
        t[L] -= d
    for L, d in frac_up.items():
        t[L] += d
    return t / t.sum() * 2.3  # any positive scale


def test_allocation_reproduces_paper_anger():
    assert sum(ANGER_NEURONS[:12]) == 54 and sum(ANGER_NEURONS[12:]) == 338
    assert sum(ANGER_HEADS[:12]) == 26 and sum(ANGER_HEADS[12:]) == 142
    w_mlp = _influence_reproducing(ANGER_NEURONS, 4, {12: 0.3, 21: 0.2, 27: 0.1}, {5: 0.1, 9: 0.2, 13: 0.3})
    w_attn = _influence_reproducing(ANGER_HEADS, 2, {22: 0.45, 18: 0.25}, {14: 0.2, 26: 0.5})
    infl = torch.tensor(np.stack([w_mlp, w_attn]))
    # early layers of the real profile are negative in places: clipping must give them the minimum
    infl[0, 0] = -0.21
    infl[1, 1] = -0.05
    alloc = C.allocate_circuit(infl)
    assert alloc.meta["K_total"] == 560 and alloc.meta["K_mlp"] == 392 and alloc.meta["K_attn"] == 168
    assert alloc.neurons == ANGER_NEURONS
    assert alloc.heads == ANGER_HEADS
    assert alloc.n_neurons == 392 and alloc.n_heads == 168
    assert min(alloc.neurons) == 4 and min(alloc.heads) == 2
    assert alloc.meta["log_mlp"]["cap"] == 156 and alloc.meta["log_attn"]["cap"] == 67
    # α axis: [alpha, 2, layer] is averaged over α first
    noise = torch.randn(4, 2, 28, dtype=torch.float64) * 0.01
    noise -= noise.mean(0, keepdim=True)
    alloc4 = C.allocate_circuit(infl[None] + noise)
    assert alloc4.neurons == ANGER_NEURONS and alloc4.heads == ANGER_HEADS


@pytest.mark.parametrize("n_layers", [28, 30, 7])
def test_allocation_totals_minima_random(n_layers):
    g = torch.Generator().manual_seed(n_layers)
    infl = torch.rand(4, 2, n_layers, generator=g) * 3 - 0.5
    a = C.allocate_circuit(infl)
    K = 10 * 2 * n_layers
    assert a.n_neurons == round(0.7 * K) and a.n_heads == K - round(0.7 * K)
    assert min(a.neurons) >= 4 and min(a.heads) >= 2
    if n_layers == 28:
        assert (a.n_neurons, a.n_heads) == (392, 168)
    # more weight never gets fewer units
    w = infl.mean(0).clamp(min=0)
    for p, ks in enumerate((a.neurons, a.heads)):
        order = torch.argsort(w[p], descending=True).tolist()
        assert all(ks[i] >= ks[j] - 1 for i, j in zip(order, order[1:], strict=False))


def test_allocate_kind_remainder_order():
    k, log = C.allocate_kind([0.44, 0.33, 0.23], total=10, min_per_layer=0, cap_ratio=1.0)
    assert k == [5, 3, 2]  # floors 4,3,2; the one leftover unit to the largest fraction (.4)
    k, _ = C.allocate_kind([0.36, 0.36, 0.28], total=10, min_per_layer=0, cap_ratio=1.0)
    assert k == [4, 3, 3]  # floors 3,3,2; fractions .6,.6,.8 -> layer 2, then the tie -> layer 0
    k, _ = C.allocate_kind([0.2, 0.5, 0.3], total=10, min_per_layer=1, cap_ratio=1.0)
    assert k == [2, 5, 3]  # rem 7 -> 1.4, 3.5, 2.1 -> floors 1,3,2 -> leftover to layer 1


def test_allocate_kind_cap():
    k, log = C.allocate_kind([0.9, 0.05, 0.05], total=20, min_per_layer=1, cap_ratio=0.4)
    assert log["cap"] == 8
    assert log["add"][0] == 8  # the proportional share is capped at ⌊0.4·20⌋
    assert sum(k) == 20 and k[0] == 9 and k == [9, 6, 5]


def test_allocate_kind_fallbacks():
    k, log = C.allocate_kind([1, 1, 1], total=5, min_per_layer=2)  # 5 < 2·3 -> minimum 1
    assert log["min"] == 1 and k == [2, 2, 1]
    k, log = C.allocate_kind([1, 1, 1], total=2, min_per_layer=2, cap_ratio=1.0)  # 2 < 3 -> minimum 0
    assert log["min"] == 0 and k == [1, 1, 0]
    k, log = C.allocate_kind([1, 1, 1], total=2, min_per_layer=2)  # cap ⌊0.4·2⌋ = 0: nothing placed
    assert k == [0, 0, 0] and log["unplaced"] == 2
    # availability: layer 0 planned 7 > 5 candidates; the deficit goes to the next largest plan
    k, log = C.allocate_kind([0.8, 0.1, 0.1], total=12, min_per_layer=2, cap_ratio=1.0, max_units=5)
    assert log["plan"] == [7, 3, 2] and k == [5, 5, 2] and log["unplaced"] == 0
    # all weights zero -> uniform
    k, _ = C.allocate_kind([0, -1, 0], total=9, min_per_layer=1)
    assert k == [3, 3, 3]


def test_select_components_topk():
    alloc = C.Allocation([2, 0, 3], [1, 2, 0])
    ns = torch.randn(3, 10)
    hs = torch.randn(3, 4)
    neurons, heads = C.select_components(alloc, ns, hs)
    for L in range(3):
        assert neurons[L] == torch.argsort(ns[L], descending=True)[: alloc.neurons[L]].tolist()
        assert heads[L] == torch.argsort(hs[L], descending=True)[: alloc.heads[L]].tolist()
    with pytest.raises(ValueError, match="layer 0"):
        C.select_components(C.Allocation([11, 0, 0], [0, 0, 0]), ns, hs)


# ----------------------------------------------------------------------------- Δμ


def _fake_prompts(n_skel=3, emotions=("anger", "joy", "fear")):
    out = []
    for s in range(n_skel):
        for v in ("positive", "neutral", "negative"):
            for e in emotions:
                out.append(Prompt(f"{s}{v}{e}", e, f"sk{s}", v))
    return out


def _brute_delta(x, prompts, emotions):
    groups = sorted({p.group for p in prompts})
    acc = torch.zeros(len(emotions), *x.shape[1:], dtype=torch.float64)
    for g in groups:
        rows = {p.emotion: x[i].double() for i, p in enumerate(prompts) if p.group == g}
        mean = sum(rows.values()) / len(rows)
        for j, e in enumerate(emotions):
            acc[j] += rows[e] - mean
    return acc / len(groups)


def test_difference_vectors_grouping_brute_force():
    emotions = ["anger", "joy", "fear"]
    prompts = _fake_prompts(emotions=emotions)
    perm = torch.randperm(len(prompts)).tolist()
    prompts = [prompts[i] for i in perm]
    n = len(prompts)
    mlp = torch.randn(n, 2, 7) + torch.randn(n, 1, 1) * 5  # strong per-prompt context offsets
    z = torch.randn(n, 2, 3, 4)
    dv = C.difference_vectors_from_acts(mlp, z, prompts, emotions)
    torch.testing.assert_close(dv.mlp.double(), _brute_delta(mlp, prompts, emotions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dv.z.double(), _brute_delta(z, prompts, emotions), atol=1e-5, rtol=1e-5)
    assert len(dv.groups.used) == 9  # (skeleton, valence) groups, not 3 skeletons
    # an incomplete (skeleton, valence) group is dropped, the rest matches brute force
    keep = [i for i, p in enumerate(prompts) if not (p.group == ("sk0", "positive") and p.emotion == "joy")]
    sub = [prompts[i] for i in keep]
    dv2 = C.difference_vectors_from_acts(mlp[keep], z[keep], sub, emotions)
    assert len(dv2.groups.used) == 8 and ("sk0", "positive") in dv2.groups.dropped
    complete = [i for i, p in enumerate(sub) if p.group != ("sk0", "positive")]
    torch.testing.assert_close(dv2.mlp.double(), _brute_delta(mlp[keep][complete], [sub[i] for i in complete], emotions),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="emotion-instructed"):
        C.difference_vectors_from_acts(mlp, z, [Prompt("x")] * n, emotions)


def test_difference_vectors_model_matches_unbatched(tiny_llama):
    from emocircuits.data import load_sev
    from emocircuits.prompts import emotion_prompts

    model = tiny_llama
    emotions = ["anger", "sadness"]
    prompts = emotion_prompts(model, load_sev("builtin:train")[:2], emotions, valences=("positive", "negative"))
    dv = C.difference_vectors(model, prompts, emotions, batch_size=3, progress=False)
    mlp_rows, z_rows = [], []
    for p in prompts:  # one unpadded forward per prompt
        store: dict = {}

        def grab(key, store=store):
            def f(x, hook):
                store[key] = x[0, -1]
            return f
        hooks = [(S.hook_name(model, s, L), grab((s, L))) for s in ("mlp_post", "z") for L in range(model.cfg.n_layers)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(tokenize(model, [p]).tokens)
        mlp_rows.append(torch.stack([store[("mlp_post", L)] for L in range(model.cfg.n_layers)]))
        z_rows.append(torch.stack([store[("z", L)] for L in range(model.cfg.n_layers)]))
    ref_mlp = _brute_delta(torch.stack(mlp_rows), prompts, emotions)
    ref_z = _brute_delta(torch.stack(z_rows), prompts, emotions)
    torch.testing.assert_close(dv.mlp.double(), ref_mlp, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dv.z.double(), ref_z, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- σ, v_ref


def test_sigma_and_reference_direction():
    post, mid = torch.randn(5, 3, 8), torch.randn(5, 3, 8) * 2
    sig = C.sigma_from_acts(post, mid)
    ref = torch.tensor([[np.mean([np.sqrt(np.mean(x[i, L].numpy() ** 2)) for i in range(5)]) for L in range(3)]
                        for x in (post, mid)])
    torch.testing.assert_close(sig, ref.float())
    assert C.reference_band(28) == [21, 22, 23, 24, 25]
    assert C.reference_band(30) == [23, 24, 25, 26, 27]
    assert C.reference_band(3) == [2]
    v_mid, v_post = torch.randn(6, 8), torch.randn(6, 8)
    v_post[4] = -v_mid[4]  # anti-aligned pair must be flipped
    band = [3, 4]
    u = [v_mid[3], v_post[3], v_mid[4], v_post[4]]
    u = [x / x.norm() for x in u]
    acc = sum(x if float(x @ u[0]) >= 0 else -x for x in u)
    torch.testing.assert_close(C.reference_direction(v_mid, v_post, band), acc / acc.norm())
    vhat = C.aligned_directions(v_mid, v_post, acc / acc.norm())
    assert (vhat @ (acc / acc.norm()) >= 0).all()
    torch.testing.assert_close(vhat.norm(dim=-1), torch.ones(2, 6))


# ----------------------------------------------------------------------------- influence

TEXTS = ["The train was late again today.", "I got the job!", "My cat knocked over a glass of water on the desk."]


def _influence_loop(model, texts, v_mid, v_post, sigma, alphas, v_ref):
    """Reference: one unpadded forward per (prompt, intervention)."""
    n_layers = model.cfg.n_layers
    E = v_mid.shape[0]
    out = torch.zeros(E, len(alphas), 2, n_layers, dtype=torch.float64)
    name = S.hook_name(model, "final_norm")

    def s_of(tokens, e, hooks):
        store = {}
        with torch.no_grad(), model.hooks(fwd_hooks=hooks + [(name, lambda x, hook: store.__setitem__("h", x[0, -1]))]):
            model(tokens)
        return float(store["h"].double() @ v_ref[e].double())

    for e in range(E):
        vhat = C.aligned_directions(v_mid[e], v_post[e], v_ref[e])
        toks = [tokenize(model, [t]).tokens for t in texts]
        base = np.mean([s_of(t, e, []) for t in toks])
        for a, p, L in itertools.product(range(len(alphas)), range(2), range(n_layers)):
            dose = alphas[a] * float(sigma[p, L]) * vhat[p, L]

            def add(x, hook, dose=dose):
                x = x.clone()
                x[:, -1] += dose
                return x
            site = S.hook_name(model, "mlp_out" if p == 0 else "attn_out", L)
            s = np.mean([s_of(t, e, [(site, add)]) for t in toks])
            out[e, a, p, L] = (s - base) / (alphas[a] * float(sigma[p, L]))
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_influence_matches_loop(tiny, use_cache):
    model = tiny
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    E = 2
    v_mid, v_post = torch.randn(E, n_layers, d), torch.randn(E, n_layers, d)
    v_mid, v_post = v_mid / v_mid.norm(dim=-1, keepdim=True), v_post / v_post.norm(dim=-1, keepdim=True)
    sigma = torch.rand(2, n_layers) * 2 + 0.5
    alphas = (0.3, 0.7)
    texts = TEXTS
    res = C.sublayer_influence(model, texts, v_mid, v_post, sigma, alphas=alphas, emotions=["a", "b"],
                               batch_size=2, max_rows=7, use_cache=use_cache, progress=False)
    ref = _influence_loop(model, texts, v_mid, v_post, sigma, alphas, res.v_ref)
    assert res.influence.shape == (E, 2, 2, n_layers)
    assert ref.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(res.influence.double(), ref, atol=2e-4, rtol=2e-3)
    # single-emotion [layer, d] input
    r1 = C.sublayer_influence(model, texts[:1], v_mid[0], v_post[0], sigma, alphas=alphas, progress=False,
                              use_cache=use_cache)
    assert r1.influence.shape == (1, 2, 2, n_layers)
    assert r1.mean(0).shape == (2, n_layers)


@pytest.mark.parametrize("arch,window,stacked", [("llama", 8, True), ("gemma", 8, False), ("gemma", 512, True)])
def test_influence_stacked_copies_match_loop(arch, window, stacked, monkeypatch):
    """The cached influence runs each chunk's interventions as copies of the last token stacked
    on the position axis (one prompt cache, a 4D mask); a cache whose sliding window would be
    reached falls back to rows on a repeated cache. Both equal one unpadded forward per
    (prompt, intervention); padding (prompts of different lengths) and chunks that do not
    divide the interventions are exercised."""
    from emocircuits.models import tiny_model

    model = tiny_model(arch, seed=1, sliding_window=window)
    calls = []
    real = C._stacked_sites
    monkeypatch.setattr(C, "_stacked_sites", lambda *a, **k: calls.append(1) or real(*a, **k))
    n_layers, d, E = model.cfg.n_layers, model.cfg.d_model, 3
    g = torch.Generator().manual_seed(3)
    v_mid, v_post = torch.randn(E, n_layers, d, generator=g), torch.randn(E, n_layers, d, generator=g)
    v_mid, v_post = v_mid / v_mid.norm(dim=-1, keepdim=True), v_post / v_post.norm(dim=-1, keepdim=True)
    sigma = torch.rand(2, n_layers, generator=g) * 2 + 0.5
    alphas = (0.3, 0.7)
    res = C.sublayer_influence(model, TEXTS, v_mid, v_post, sigma, alphas=alphas, batch_size=2, max_rows=10,
                               progress=False)
    assert bool(calls) == stacked
    ref = _influence_loop(model, TEXTS, v_mid, v_post, sigma, alphas, res.v_ref)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(res.influence.double(), ref, atol=2e-4, rtol=2e-3)


def test_stacked_mask_sees_prompt_and_itself_only():
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = C._stacked_mask(am, 3, torch.float32)
    assert m.shape == (2, 1, 3, 6)
    seen = m == 0
    # row 0: position 0 is padding; the three earlier real positions are seen by every copy
    assert seen[0, 0, :, :3].tolist() == [[False, True, True]] * 3
    assert seen[1, 0, :, :3].all()
    assert seen[:, 0, :, 3:].tolist() == [[[True, False, False], [False, True, False], [False, False, True]]] * 2


# ----------------------------------------------------------------------------- circuit, modulation


def _random_circuit(model, seed=0, emotion="anger"):
    g = torch.Generator().manual_seed(seed)
    n_layers, d_mlp, H, dh = model.cfg.n_layers, model.cfg.d_mlp, model.cfg.n_heads, model.cfg.d_head
    mlp_delta = torch.randn(n_layers, d_mlp, generator=g)
    z_delta = torch.randn(n_layers, H, dh, generator=g)
    neurons = [torch.randperm(d_mlp, generator=g)[: 3 + L].tolist() for L in range(n_layers)]
    heads = [torch.randperm(H, generator=g)[: 1 + L % 2].tolist() for L in range(n_layers)]
    neurons[1] = []  # an empty layer
    return C.build_circuit(emotion, neurons, heads, mlp_delta, z_delta, {"model": "tiny"}), mlp_delta, z_delta


def _capture_diffs(model, circuit, run, strength, **kw):
    """Capture mlp_post/z right before and right after the modulation hooks, per call."""
    before, after = [], []
    n_layers = model.cfg.n_layers
    names = [(s, L) for s in ("mlp_post", "z") for L in range(n_layers)]

    # mlp_post of layer 0 runs after z of layer 0: start a new record on z layer 0
    def rec2(store):
        def make(key):
            def hook(x, hook):
                if key == ("z", 0):
                    store.append({})
                store[-1][key] = x.detach().clone()
                return x
            return hook
        return [(S.hook_name(model, s, L), make((s, L))) for s, L in names]

    with model.hooks(fwd_hooks=rec2(before)):
        with C.modulate(model, circuit, strength, **kw):
            with model.hooks(fwd_hooks=rec2(after)):
                run()
    return before, after


@pytest.mark.parametrize("neuron_positions,head_positions", [("last", "all"), ("all", "last")])
def test_modulate_adds_exactly(tiny, neuron_positions, head_positions):
    model = tiny
    circuit, _, _ = _random_circuit(model)
    lam = 0.7
    b = tokenize(model, TEXTS)

    def run():
        with torch.no_grad():
            model(b.tokens, attention_mask=b.attention_mask)
    before, after = _capture_diffs(model, circuit, run, lam, neuron_positions=neuron_positions,
                                   head_positions=head_positions)
    assert len(before) == len(after) == 1
    for L in range(model.cfg.n_layers):
        d = after[0][("mlp_post", L)] - before[0][("mlp_post", L)]
        exp = torch.zeros_like(d)
        pos = slice(-1, None) if neuron_positions == "last" else slice(None)
        exp[:, pos, circuit.neurons[L]] = lam * circuit.neuron_values[L]
        torch.testing.assert_close(d, exp, atol=1e-5, rtol=1e-5)
        dz = after[0][("z", L)] - before[0][("z", L)]
        expz = torch.zeros_like(dz)
        hp = slice(-1, None) if head_positions == "last" else slice(None)
        expz[:, hp, circuit.heads[L]] = lam * circuit.head_values[L]
        torch.testing.assert_close(dz, expz, atol=1e-5, rtol=1e-5)
    # hooks are gone afterwards: output equals the unhooked one
    with torch.no_grad():
        ref = model(b.tokens, attention_mask=b.attention_mask)
        with C.modulate(model, circuit, 0.0):
            same = model(b.tokens, attention_mask=b.attention_mask)
        with C.modulate(model, circuit, lam):
            diff = model(b.tokens, attention_mask=b.attention_mask)
        again = model(b.tokens, attention_mask=b.attention_mask)
    torch.testing.assert_close(same, ref)
    torch.testing.assert_close(again, ref)
    assert (diff - ref).abs().max() > 1e-4


def test_modulate_during_generate(tiny_llama):
    model = tiny_llama
    circuit, _, _ = _random_circuit(model, seed=3)
    lam = 1.3
    n_new = 3

    def run():
        generate(model, TEXTS[:2], GenerationConfig(max_new_tokens=n_new, batch_size=2), progress=False)
    before, after = _capture_diffs(model, circuit, run, lam)
    assert len(before) == n_new  # prefill + (n_new - 1) decode calls
    for call in range(n_new):
        for L in range(model.cfg.n_layers):
            d = after[call][("mlp_post", L)] - before[call][("mlp_post", L)]
            if call > 0:
                assert d.shape[1] == 1
            exp = torch.zeros_like(d)
            exp[:, -1, circuit.neurons[L]] = lam * circuit.neuron_values[L]
            torch.testing.assert_close(d, exp, atol=1e-5, rtol=1e-5)
            dz = after[call][("z", L)] - before[call][("z", L)]
            expz = torch.zeros_like(dz)
            expz[:, :, circuit.heads[L]] = lam * circuit.head_values[L]
            torch.testing.assert_close(dz, expz, atol=1e-5, rtol=1e-5)


def test_modulate_composes_with_steer_and_cleans_up_on_error(tiny_llama):
    from emocircuits.steering import steer

    model = tiny_llama
    circuit, _, _ = _random_circuit(model, seed=5)
    b = tokenize(model, TEXTS)
    v = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    fwd = lambda: model(b.tokens, attention_mask=b.attention_mask)  # noqa: E731
    with torch.no_grad():
        base = fwd()
        with steer(model, v, layers=[1], strength=2.0, scale="rms"):
            s_only = fwd()
            with C.modulate(model, circuit, 1.0):
                both = fwd()
            s_again = fwd()
        with C.modulate(model, circuit, 1.0):
            m_only = fwd()
        for x in (s_only, m_only, both):
            assert (x - base).abs().max() > 1e-4
        assert (both - s_only).abs().max() > 1e-4 and (both - m_only).abs().max() > 1e-4
        torch.testing.assert_close(s_again, s_only)
        with pytest.raises(RuntimeError, match="boom"):
            with C.modulate(model, circuit, 1.0):
                raise RuntimeError("boom")
        torch.testing.assert_close(fwd(), base)


def test_ablate_zeroes_units(tiny_llama):
    model = tiny_llama
    circuit, _, _ = _random_circuit(model, seed=2)
    b = tokenize(model, TEXTS)
    after = []

    def grab(x, hook):
        after.append(x.detach().clone())
        return x
    with torch.no_grad(), C.ablate(model, circuit), model.hooks(fwd_hooks=[(S.hook_name(model, "mlp_post", 2), grab),
                                                                           (S.hook_name(model, "z", 2), grab)]):
        model(b.tokens, attention_mask=b.attention_mask)
    z2 = after[0] if after[0].dim() == 4 else after[1]
    g2 = after[1] if after[0].dim() == 4 else after[0]
    assert (g2[..., circuit.neurons[2]] == 0).all() and (g2 != 0).any()
    assert (z2[:, :, circuit.heads[2]] == 0).all()


def test_circuit_save_load_overlap(tmp_path, tiny_llama):
    c, mlp_delta, z_delta = _random_circuit(tiny_llama, seed=7)
    path = c.save(tmp_path / "anger")
    c2 = C.EmotionCircuit.load(path)
    assert c2.emotion == c.emotion and c2.neurons == c.neurons and c2.heads == c.heads and c2.meta == c.meta
    for a, b in zip(c.neuron_values + c.head_values, c2.neuron_values + c2.head_values, strict=True):
        torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob("*.tmp"))
    r = C.random_circuit(c, mlp_delta, z_delta, seed=1)
    assert r.sizes() == c.sizes()
    for L, ids in enumerate(r.neurons):
        torch.testing.assert_close(r.neuron_values[L], mlp_delta[L, ids])
    ov = C.overlap(c, c)
    assert ov == {"neurons": 1.0, "heads": 1.0}
    ov = C.overlap(c, r)
    ref_n = len(c.neuron_set() & r.neuron_set()) / len(c.neuron_set() | r.neuron_set())
    assert ov["neurons"] == pytest.approx(ref_n) and ov["neurons"] < 1
    r2 = C.random_circuit(c, mlp_delta, z_delta, seed=2)
    r.emotion, r2.emotion = "fear", "joy"
    summ = C.circuits_summary([c, r, r2])
    assert summ["circuits"]["anger"]["n_neurons"] == c.n_neurons
    assert len(summ["pairwise_jaccard"]) == 3
    mu = np.mean([C.overlap(a, b)["heads"] for a, b in [(c, r), (c, r2), (r, r2)]])
    assert summ["mean_jaccard"]["heads"] == pytest.approx(mu)
    with pytest.raises(ValueError, match="repeated"):
        C.circuits_summary([c, c])
    with pytest.raises(FileNotFoundError):
        C.EmotionCircuit.load(tmp_path / "nope")


def test_scores_from_acts_match_ablation(tiny_llama):
    """head score == drop of <resid_mid[L][last], v_mid[L]> when head h is zeroed (pre-norm model)."""
    model = tiny_llama
    L, h = 1, 2
    v_mid = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    b = tokenize(model, TEXTS)
    store = {}

    def grab(key):
        def f(x, hook):
            store[key] = x.detach().clone()
            return x
        return f

    def zero(x, hook):
        x = x.clone()
        x[:, :, h] = 0
        return x
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(S.hook_name(model, "z", Lx), grab(("z", Lx))) for Lx in range(model.cfg.n_layers)]
                         + [(S.hook_name(model, "resid_mid", L), grab("mid"))]):
            model(b.tokens, attention_mask=b.attention_mask)
        base = store["mid"][:, -1] @ (v_mid[L] / v_mid[L].norm())
        with model.hooks(fwd_hooks=[(S.hook_name(model, "z", L), zero), (S.hook_name(model, "resid_mid", L), grab("mid"))]):
            model(b.tokens, attention_mask=b.attention_mask)
        abl = store["mid"][:, -1] @ (v_mid[L] / v_mid[L].norm())
    z = torch.stack([store[("z", Lx)][:, -1] for Lx in range(model.cfg.n_layers)], 1)
    W_O = torch.stack([S.W_O(model, Lx) for Lx in range(model.cfg.n_layers)]).detach()
    hs = C.head_scores_from_acts(z, W_O, v_mid)
    assert float(hs[L, h]) == pytest.approx(float((base - abl).mean()), abs=1e-4)
    # neuron scores: mean g · (W_out v)
    g = torch.randn(4, model.cfg.n_layers, model.cfg.d_mlp)
    W_out = torch.stack([S.W_out(model, Lx) for Lx in range(model.cfg.n_layers)]).detach()
    v_post = torch.randn(model.cfg.n_layers, model.cfg.d_model)
    ns = C.neuron_scores_from_acts(g, W_out, v_post)
    ref = torch.stack([(g[:, Lx] * (W_out[Lx] @ (v_post[Lx] / v_post[Lx].norm()))).mean(0)
                       for Lx in range(model.cfg.n_layers)])
    torch.testing.assert_close(ns, ref, atol=1e-5, rtol=1e-4)


def test_faithfulness_runs(tiny_llama):
    model = tiny_llama
    c, mlp_delta, z_delta = _random_circuit(model, seed=4)
    v_ref = torch.randn(model.cfg.d_model)
    res = C.faithfulness(model, c, TEXTS[:2], TEXTS[1:], "anger", v_ref=v_ref / v_ref.norm(),
                         mlp_delta=mlp_delta, z_delta=z_delta, n_random=2)
    assert len(res.ablation_s["random_ablated"]) == 2
    assert np.isfinite(res.ratio_s) and res.s["circuit"] != res.s["neutral"]
    d = res.to_dict()
    assert d["emotion"] == "anger"


@pytest.mark.integration
def test_smol_dmu_influence_modulation(smol):
    """SmolLM2: Δμ from real prompts; influence cached == uncached; modulation changes decoding."""
    from emocircuits.data import load_sev
    from emocircuits.prompts import emotion_prompts, neutral_prompts

    model = smol
    recs = load_sev("builtin:train")[:1]
    emotions = ["anger", "happiness"]
    dv = C.difference_vectors(model, emotion_prompts(model, recs, emotions), emotions, progress=False)
    assert dv.mlp.shape == (2, model.cfg.n_layers, model.cfg.d_mlp) and len(dv.groups.used) == 3
    torch.testing.assert_close(dv.mlp.sum(0), torch.zeros_like(dv.mlp[0]), atol=1e-4, rtol=0)
    neu = neutral_prompts(model, recs, valences=("negative",))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, model.cfg.n_layers, model.cfg.d_model, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    sigma = torch.ones(2, model.cfg.n_layers)
    kw = dict(alphas=(0.5,), layers=[5, 25], progress=False)
    a = C.sublayer_influence(model, neu, v, v.flip(0), sigma, use_cache=True, **kw)
    b = C.sublayer_influence(model, neu, v, v.flip(0), sigma, use_cache=False, **kw)
    torch.testing.assert_close(a.influence, b.influence, atol=1e-3, rtol=1e-3)
    alloc = C.Allocation([4] * model.cfg.n_layers, [2] * model.cfg.n_layers)
    neurons, heads = C.select_components(alloc, dv.mlp[0], dv.z[0].norm(dim=-1))
    circ = C.build_circuit("anger", neurons, heads, dv.mlp[0], dv.z[0])
    cfg = GenerationConfig(max_new_tokens=6, batch_size=2)
    base = generate(model, neu, cfg, progress=False)
    with C.modulate(model, circ, 8.0):
        mod = generate(model, neu, cfg, progress=False)
    assert mod.tokens != base.tokens
    assert generate(model, neu, cfg, progress=False).tokens == base.tokens


def test_assemble_warns_when_the_budget_takes_most_heads():
    """The paper's budget on a small model selects most heads; assemble_circuit says so."""
    import warnings

    g = torch.Generator().manual_seed(3)
    n_layers, d_mlp, n_heads, d_head = 4, 64, 4, 8
    infl = torch.rand(2, n_layers, generator=g) + 0.1
    args = (torch.randn(n_layers, d_mlp, generator=g), torch.randn(n_layers, n_heads, generator=g),
            torch.randn(n_layers, d_mlp, generator=g), torch.randn(n_layers, n_heads, d_head, generator=g))
    with pytest.warns(UserWarning, match=r"selects \d+ of the model's 16 heads"):
        c = C.assemble_circuit("anger", infl, *args)  # 30 % of 80 units = 24 > 16 heads: capped
    assert c.n_heads > 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = C.assemble_circuit("anger", infl, *args, budget_per_sublayer=1, min_per_layer=(1, 0))
    assert c.n_heads <= 8


def test_jaccard_one_definition_and_empty_convention():
    from emocircuits import components as K

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = {(int(x), int(y)) for x, y in rng.integers(0, 4, size=(int(rng.integers(0, 8)), 2))}
        b = {(int(x), int(y)) for x, y in rng.integers(0, 4, size=(int(rng.integers(0, 8)), 2))}
        brute = len(a & b) / len(a | b) if (a | b) else 1.0
        assert C.jaccard(list(a), list(b)) == pytest.approx(brute)
    assert C.jaccard([], []) == 1.0 and C.jaccard([], [(0, 1)]) == 0.0
    assert K.jaccard is C.jaccard  # components re-exports the one definition
    assert C.jaccard([(1, 2), (1, 2), (3, 4)], [(1, 2)]) == 0.5  # duplicates count once
