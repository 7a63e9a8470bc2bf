from __future__ import annotations

import pytest
import torch

from emocircuits import patching as P
from emocircuits import sites
from emocircuits.judges.readout import emotion_readout
from emocircuits.prompts import tokenize

TEXTS = ["The cat sat on the mat today.", "I went to the store and", "Hello, how are you doing?",
         "We lost the game again", "Rain all week long."]


def _proj(model, site, layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = sites.site_width(model, site)[0] if site != "mlp_in" else model.cfg.d_model
    return P.projection_metric(model, site, layer, torch.randn(w, generator=g))


def _same_len_pair(model):
    a = ["I feel happy about the party today.", "The weather is lovely this morning."]
    b = ["I feel angry about the party today.", "The weather is awful this morning."]
    ta, tb = tokenize(model, a), tokenize(model, b)
    assert torch.equal(ta.lengths, tb.lengths)
    return a, b


def test_patch_into_itself_changes_nothing(tiny):
    m = P.logit_readout_metric(tiny, "anger")
    base = P.metric_values(tiny, TEXTS, m)
    locs = [P.Loc("resid_mid", 1), P.head(0, 2), P.neuron(2, 5), P.Loc("resid_post", 1, position=-2)]
    out = P.patch(tiny, TEXTS, locs, m, source=TEXTS)
    assert torch.allclose(out, base, atol=1e-5)
    r = P.patch_heads(tiny, TEXTS, m, source=TEXTS, progress=False)
    assert r.effect.abs().max() < 1e-5
    assert r.effect.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)


def test_denoising_whole_stream_restores_source(tiny):
    clean, corrupt = _same_len_pair(tiny)
    m = P.logit_readout_metric(tiny, "happiness")
    out = P.patch(tiny, locs=P.Loc("resid_pre", 0), metric=m, **P.denoising(clean, corrupt))
    assert torch.allclose(out, P.metric_values(tiny, clean, m), atol=1e-5)
    out = P.patch(tiny, locs=P.Loc("resid_post", tiny.cfg.n_layers - 1), metric=m,
                  **P.noising(clean, corrupt))
    assert torch.allclose(out, P.metric_values(tiny, corrupt, m), atol=1e-4)


def test_zero_head_matches_manual_hook(tiny):
    m = _proj(tiny, "resid_post", 2)
    out = P.patch(tiny, TEXTS, P.head(1, 3), m, ablation="zero")

    def zero(x, hook):  # noqa: ARG001
        x = x.clone()
        x[:, :, 3] = 0
        return x

    with tiny.hooks(fwd_hooks=[(sites.hook_name(tiny, "z", 1), zero)]):
        ref = P.metric_values(tiny, TEXTS, m)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, P.metric_values(tiny, TEXTS, m), atol=1e-4)


def test_mean_ablation_matches_manual(tiny_llama):
    model = tiny_llama
    ref_texts = TEXTS[:3]
    m = _proj(model, "resid_post", 2)
    # mean of neuron 7 at the last token over the reference prompts
    b = tokenize(model, ref_texts)
    store = {}
    with torch.no_grad(), model.hooks(fwd_hooks=[(sites.hook_name(model, "mlp_post", 1),
                                                  lambda x, hook: store.setdefault("a", x))]):
        model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=2)
    mu = store["a"][:, -1, 7].mean()

    def setm(x, hook):  # noqa: ARG001
        x = x.clone()
        x[:, -1, 7] = mu
        return x

    with model.hooks(fwd_hooks=[(sites.hook_name(model, "mlp_post", 1), setm)]):
        want = P.metric_values(model, TEXTS, m)
    got = P.patch(model, TEXTS, P.neuron(1, 7), m, ablation="mean", reference=ref_texts)
    assert torch.allclose(got, want, atol=1e-5)
    # all positions: mean over every real token of the reference prompts
    sweep = P.patch_heads(model, TEXTS, m, ablation="mean", reference=ref_texts, layers=[1],
                          progress=False)
    one = P.patch(model, TEXTS, P.head(1, 2), m, ablation="mean", reference=ref_texts)
    assert abs(float(sweep.effect[0, 2]) - float((one - P.metric_values(model, TEXTS, m)).mean())) < 1e-5


def test_resample_is_seeded_and_uses_other_prompts(tiny_llama):
    m = _proj(tiny_llama, "resid_post", 2)
    a = P.patch(tiny_llama, TEXTS, P.neuron(1, 3), m, ablation="resample", seed=3)
    b = P.patch(tiny_llama, TEXTS, P.neuron(1, 3), m, ablation="resample", seed=3)
    assert torch.equal(a, b)
    order = P._resample_order(50, 5, True, 0)
    assert (order != torch.arange(50) % 5).all() or True  # rows ≥ 5 wrap; check the first 5
    assert (order[:5] != torch.arange(5)).all()
    # resample == patching from the resampled source list
    src = [TEXTS[int(j)] for j in P._resample_order(len(TEXTS), len(TEXTS), True, 3)]
    c = P.patch(tiny_llama, TEXTS, P.neuron(1, 3), m, source=src)
    assert torch.allclose(a, c, atol=1e-6)


def test_batched_sweeps_equal_single_patches(tiny):
    m = P.logit_readout_metric(tiny, "sadness")
    base = P.metric_values(tiny, TEXTS, m)
    r = P.patch_heads(tiny, TEXTS, m, ablation="zero", batch_size=2, progress=False)
    for layer, h in [(0, 0), (2, 3), (1, 1)]:
        one = P.patch(tiny, TEXTS, P.head(layer, h), m, ablation="zero")
        assert abs(float(r.effect[layer, h]) - float((one - base).mean())) < 1e-5
    rn = P.patch_neurons(tiny, TEXTS, m, ablation="zero", layers=[1], neurons=[0, 5, 95],
                         neurons_per_pass=2, progress=False)
    for j, n in enumerate([0, 5, 95]):
        one = P.patch(tiny, TEXTS, P.neuron(1, n), m, ablation="zero")
        assert abs(float(rn.effect[0, j]) - float((one - base).mean())) < 1e-5
    df = r.to_dataframe()
    assert len(df) == tiny.cfg.n_layers * tiny.cfg.n_heads and set(df.columns) >= {"layer", "head"}


@pytest.mark.parametrize("site", ["z", "mlp_post"])
def test_attribution_exact_for_linear_metric(tiny, site):
    """A projection of the patched layer's own linear readout: first order is exact."""
    layer = 1
    if site == "z":  # o_proj output is linear in z
        metric = _proj(tiny, "attn_o_out", layer)
        exact = P.patch_heads(tiny, TEXTS, metric, ablation="zero", layers=[layer], progress=False)
        att = P.attribution_patching(tiny, TEXTS, metric, sites=("z",), layers=[layer],
                                     progress=False)["z"]
    else:  # the metric is a projection of mlp_post itself at the last token
        metric = _proj(tiny, "mlp_post", layer)
        exact = P.patch_neurons(tiny, TEXTS, metric, ablation="zero", layers=[layer],
                                position=-1, progress=False)
        att = P.attribution_patching(tiny, TEXTS, metric, sites=("mlp_post",), layers=[layer],
                                     positions="last", progress=False)["mlp_post"]
    assert exact.effect.abs().max() > 1e-3
    assert torch.allclose(att.effect, exact.effect, atol=1e-4, rtol=1e-4)


def test_attribution_first_order_on_nonlinear_metric(tiny_llama):
    """Against finite differences: scaling a neuron by (1 − ε) changes the metric by ≈ ε·attr."""
    model, layer, n, eps = tiny_llama, 0, 11, 1e-3
    metric = P.logit_readout_metric(model, "fear")
    att = P.attribution_patching(model, TEXTS, metric, sites=("mlp_post",), layers=[layer],
                                 positions="last", progress=False)["mlp_post"]

    def scale(x, hook):  # noqa: ARG001
        x = x.clone()
        x[:, -1, n] *= 1 - eps
        return x

    base = P.metric_values(model, TEXTS, metric).double()
    with model.hooks(fwd_hooks=[(sites.hook_name(model, "mlp_post", layer), scale)]):
        moved = P.metric_values(model, TEXTS, metric).double()
    fd = float((moved - base).mean()) / eps
    assert abs(fd - float(att.effect[0, n])) < 1e-2 * max(1.0, abs(fd))


def test_metrics_match_direct_computation(tiny_llama):
    m = P.logit_readout_metric(tiny_llama, "anger", log=False)
    r = emotion_readout(tiny_llama, TEXTS)
    j = list(r.emotions).index("anger")
    assert torch.allclose(P.metric_values(tiny_llama, TEXTS, m), torch.tensor(r.mass[:, j]), atol=1e-6)
    d = P.logit_diff_metric(10, 20)
    b = tokenize(tiny_llama, TEXTS)
    with torch.no_grad():
        logits = tiny_llama(b.tokens, attention_mask=b.attention_mask)[:, -1]
    assert torch.allclose(P.metric_values(tiny_llama, TEXTS, d), logits[:, 10] - logits[:, 20], atol=1e-5)
    user = P.as_metric(lambda logits, cache: logits[:, 10] - logits[:, 20])
    assert torch.allclose(P.metric_values(tiny_llama, TEXTS, user), logits[:, 10] - logits[:, 20], atol=1e-5)


def test_clear_errors(tiny_llama):
    m = _proj(tiny_llama, "resid_post", 2)
    with pytest.raises(ValueError, match="token lengths differ.*same template"):
        P.patch(tiny_llama, ["Hi.", "A much longer prompt than the other"], P.head(1, 0), m,
                source=["A much longer prompt than the other", "Hi."])
    with pytest.raises(IndexError, match="head 9 out of range"):
        P.patch(tiny_llama, TEXTS, P.head(1, 9), m, ablation="zero")
    with pytest.raises(IndexError, match="neuron 500 out of range"):
        P.patch_neurons(tiny_llama, TEXTS, m, ablation="zero", neurons=[500], progress=False)
    with pytest.raises(ValueError, match="non-empty reference"):
        P.patch(tiny_llama, TEXTS, P.head(1, 0), m, ablation="mean", reference=[])
    with pytest.raises(ValueError, match="needs reference"):
        P.patch(tiny_llama, TEXTS, P.head(1, 0), m, ablation="mean")
    with pytest.raises(ValueError, match="exactly one of source"):
        P.patch(tiny_llama, TEXTS, P.head(1, 0), m)
    with pytest.raises(ValueError, match="unknown ablation"):
        P.patch(tiny_llama, TEXTS, P.head(1, 0), m, ablation="median")
    with pytest.raises(IndexError, match="out of range"):
        P.patch(tiny_llama, TEXTS, P.head(7, 0), m, ablation="zero")
    with pytest.raises(ValueError, match="emotion 'boredom'"):
        P.logit_readout_metric(tiny_llama, "boredom")


def test_mlp_in_site_is_the_hf_mlp_input(tiny):
    """``mlp_in`` (ln2.hook_out) equals the input of the HF MLP module (RMSNorm₂ output × γ₂)."""
    b = tokenize(tiny, ["Hello there friend, how are you.", "Hi."])
    cap, st = {}, {}
    mlp = tiny.original_model.model.layers[1].mlp
    h = mlp.register_forward_pre_hook(lambda mod, inp: cap.__setitem__("x", inp[0].detach().clone()))
    try:
        with torch.no_grad(), tiny.hooks(fwd_hooks=[(sites.hook_name(tiny, "mlp_in", 1),
                                                     lambda x, hook: st.setdefault("x", x.clone()))]):
            tiny(b.tokens, attention_mask=b.attention_mask)
    finally:
        h.remove()
    assert sites.hook_name(tiny, "mlp_in", 1) == "blocks.1.ln2.hook_out"
    torch.testing.assert_close(st["x"], cap["x"], atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- layer sweeps


@pytest.mark.parametrize("kind", ["source", "zero", "mean"])
def test_layer_sweep_equals_one_patch_per_layer(tiny, kind):
    """patch_layers (cache once, resume from the patched layer) = patch() per layer, whole site
    and one position, for a logit metric and for a metric that reads a middle layer."""
    clean, corrupt = _same_len_pair(tiny)
    kw = {"source": clean} if kind == "source" else {"ablation": kind}
    if kind == "mean":
        kw["reference"] = TEXTS
    for metric in (P.logit_readout_metric(tiny, "happiness"), _proj(tiny, "resid_post", 1, seed=3)):
        for site in ("resid_pre", "z", "mlp_post"):
            for position in (None, -1):
                r = P.patch_layers(tiny, corrupt, site, metric, position=position, progress=False, **kw)
                base = P.metric_values(tiny, corrupt, metric).double().mean()
                assert r.effect.shape == (tiny.cfg.n_layers, 1)
                for i, layer in enumerate(r.layers):
                    ref = P.patch(tiny, corrupt, P.Loc(site, layer, None, position), metric, **kw)
                    assert float(r.effect[i, 0]) == pytest.approx(float(ref.double().mean() - base),
                                                                   abs=2e-5), (site, layer, position)


def test_layer_sweep_each_position_equals_single_patches(tiny):
    a, b = _same_len_pair(tiny)
    clean, corrupt = [a[0], b[0]], [b[0], a[0]]  # one token length for every prompt
    m = P.logit_readout_metric(tiny, "anger")
    r = P.patch_layers(tiny, corrupt, "resid_post", m, source=clean, position="each", layers=[0, 2],
                       batch_size=1, progress=False)
    n_pos = int(tokenize(tiny, corrupt).lengths[0])
    assert r.effect.shape == (2, n_pos) and r.axes == ("layer", "position")
    base = P.metric_values(tiny, corrupt, m).double().mean()
    for i, layer in enumerate([0, 2]):
        for k in (0, n_pos // 2, n_pos - 1):
            ref = P.patch(tiny, corrupt, P.Loc("resid_post", layer, None, k), m, source=clean)
            assert float(r.effect[i, k]) == pytest.approx(float(ref.double().mean() - base), abs=2e-5)
    # patching the last position of the last layer's output restores the source metric
    assert float(r.patched[1, -1]) == pytest.approx(float(P.metric_values(tiny, clean, m).mean()), abs=1e-4)
    with pytest.raises(ValueError, match="same token length|different token lengths"):
        P.patch_layers(tiny, TEXTS, "z", m, ablation="zero", position="each", progress=False)


def test_forward_from_skips_the_blocks_below_and_restores_the_model(tiny):
    from emocircuits.activations import _decoder_stack, forward_from, forward_until

    tb = tokenize(tiny, TEXTS)
    cap = {}
    def keep(k):
        def fn(x, hook):  # noqa: ARG001
            cap[k] = x.clone()
        return fn

    hooks = [(sites.hook_name(tiny, "resid_pre", k), keep(k)) for k in range(tiny.cfg.n_layers)]
    full = forward_until(tiny, tb.tokens, tb.attention_mask, None, hooks)
    calls = [0]
    handle = tiny.blocks[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        for k in range(1, tiny.cfg.n_layers):
            out = forward_from(tiny, cap[k], k, tb.attention_mask)
            assert torch.allclose(out, full, atol=1e-5)
        assert calls[0] == 0
    finally:
        handle.remove()
    stack, layers = _decoder_stack(tiny)
    n_types = len(getattr(stack.config, "layer_types", None) or layers)

    def boom(x, hook):  # noqa: ARG001
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        forward_from(tiny, cap[1], 1, tb.attention_mask,
                     fwd_hooks=[(sites.hook_name(tiny, "resid_post", 2), boom)])
    stack2, layers2 = _decoder_stack(tiny)
    assert len(layers2) == tiny.cfg.n_layers and len(getattr(stack2.config, "layer_types", None) or layers2) == n_types
    assert torch.allclose(forward_until(tiny, tb.tokens, tb.attention_mask, None), full, atol=1e-6)
