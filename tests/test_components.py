from __future__ import annotations

import pytest
import torch

from emocircuits import circuits as CI
from emocircuits import components as C
from emocircuits import patching as P
from emocircuits import sites
from emocircuits.prompts import Prompt, tokenize

EMOS = ["anger", "happiness", "fear"]
BODIES = ["The meeting was moved again", "My friend called me", "We found the old letter",
          "The bus never came"]


def _prompts():
    out = []
    for i, body in enumerate(BODIES):
        for e in EMOS:
            out.append(Prompt(f"Reply in {e}. {body}.", emotion=e, skeleton_id=f"s{i}",
                              valence="neutral"))
    return out


def _dirs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(EMOS), model.cfg.n_layers, model.cfg.d_model, generator=g) * 3


def test_neuron_contributions_equal_brute_force(tiny, tmp_path):
    prompts = _prompts()
    dirs = _dirs(tiny)
    res = C.neuron_contributions(tiny, prompts, None, dirs, EMOS, batch_size=5, progress=False)
    L, N = tiny.cfg.n_layers, tiny.cfg.d_mlp
    for ei, e in enumerate(EMOS):
        cs, gs = [], []
        for p in [p for p in prompts if p.emotion == e]:
            b = tokenize(tiny, [p.text])
            store = {}
            hooks = [(sites.hook_name(tiny, "mlp_post", layer),
                      lambda x, hook, layer=layer, store=store: store.__setitem__(layer, x[0, -1].clone()))
                     for layer in range(L)]
            with torch.no_grad(), tiny.hooks(fwd_hooks=hooks):
                tiny(b.tokens)
            c = torch.zeros(L, N, dtype=torch.float64)
            for layer in range(L):
                v = dirs[ei, layer].double()
                v = v / v.norm()
                W = sites.W_out(tiny, layer).detach().double()
                for n in range(N):
                    c[layer, n] = float(store[layer][n]) * float(W[n] @ v)
            cs.append(c)
            gs.append(torch.stack([store[layer] for layer in range(L)]).double())
        c = torch.stack(cs)
        torch.testing.assert_close(res.C_mean[ei].double(), c.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.C_pos[ei].double(), c.clamp(min=0).mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.C_neg[ei].double(), (-c).clamp(min=0).mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.H_mean[ei].double(), torch.stack(gs).mean(0), atol=1e-5, rtol=1e-4)
    # ranking: promote = C_mean descending, suppress = ascending
    top = res.top("fear", k=5)
    scores = [s for _, _, s in top]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(res.C_mean[2].max()))
    low = res.top("fear", layer=1, k=3, sign="suppress")
    assert low[0][2] == pytest.approx(float(res.C_mean[2, 1].min())) and low[0][0] == 1
    # save / load / dataframe
    res.save(tmp_path / "n.safetensors")
    back = C.NeuronContributions.load(tmp_path / "n.safetensors")
    assert torch.equal(back.C_pos, res.C_pos) and back.emotions == EMOS
    assert len(res.to_dataframe()) == len(EMOS) * L * N


def test_batched_head_ablation_equals_loop(tiny, tmp_path):
    prompts = _prompts()[:6]
    dirs = _dirs(tiny, 1)
    a = C.head_ablation_importance(tiny, prompts, None, dirs, EMOS, batch_size=4, progress=False)
    b = C.head_ablation_importance(tiny, prompts, None, dirs, EMOS, batched=False, progress=False)
    assert (a.mean - b.mean).abs().max() <= 1e-5
    assert (a.baseline_mean - b.baseline_mean).abs().max() <= 1e-5
    assert a.mean.abs().max() > 1e-3
    # the one-forward closed form equals the batched ablation
    c = C.head_importance(tiny, prompts, None, dirs, EMOS, method="closed_form", progress=False)
    assert (a.mean - c.mean).abs().max() <= 1e-5
    assert (a.baseline_mean - c.baseline_mean).abs().max() <= 1e-5
    # == the generic patching path on one head: base − zero-ablated same-layer readout
    e, layer, h = 1, 2, 1
    ps = [p for p in prompts if p.emotion == EMOS[e]]
    v = dirs[e, layer] / dirs[e, layer].norm()
    m = P.projection_metric(tiny, "mlp_in", layer, v)
    r = P.patch(tiny, ps, P.head(layer, h), m, ablation="zero")
    want = (P.metric_values(tiny, ps, m) - r).mean()
    assert abs(float(a.mean[e, layer, h]) - float(want)) < 1e-5
    a.save(tmp_path / "h.safetensors")
    back = C.HeadImportance.load(tmp_path / "h.safetensors")
    assert torch.equal(back.mean, a.mean) and back.method == "ablation"
    assert len(a.to_dataframe()) == len(EMOS) * tiny.cfg.n_layers * tiny.cfg.n_heads


def test_same_layer_attribution_sum_trick_equals_per_layer_backward(tiny):
    prompts = _prompts()
    dirs = _dirs(tiny, 2)
    att = C.head_attribution(tiny, prompts, None, EMOS, readout="same_layer",
                             directions_mid=dirs, progress=False)
    e = 2
    ps = [p for p in prompts if p.emotion == EMOS[e]]
    for layer in range(tiny.cfg.n_layers):
        v = dirs[e, layer] / dirs[e, layer].norm()
        m = P.projection_metric(tiny, "mlp_in", layer, v)
        one = P.attribution_patching(tiny, ps, m, sites=("z",), layers=[layer], progress=False)["z"]
        torch.testing.assert_close(att.mean[e, layer], -one.effect[0], atol=1e-5, rtol=1e-4)
    # and it tracks the exact ablation score (first-order estimate)
    exact = C.head_ablation_importance(tiny, prompts, None, dirs, EMOS, progress=False)
    agree = C.rank_agreement(att.mean, exact.mean, k=5)
    assert agree["spearman"] > 0.5


def test_attribution_other_readouts_run(tiny_llama):
    prompts = _prompts()
    dm, dp = _dirs(tiny_llama, 3), _dirs(tiny_llama, 4)
    vref = CI.reference_direction(dm, dp)
    assert vref.shape == (len(EMOS), tiny_llama.cfg.d_model)
    assert torch.allclose(vref.norm(dim=-1), torch.ones(len(EMOS)), atol=1e-5)
    f = C.head_attribution(tiny_llama, prompts, None, EMOS, readout="final", v_ref=vref, progress=False)
    g = C.head_attribution(tiny_llama, prompts, None, EMOS, readout="logit", progress=False)
    assert f.mean.shape == g.mean.shape == (len(EMOS), tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads)
    assert f.mean.abs().max() > 0 and g.mean.abs().max() > 0


def test_reference_direction_band_and_signs():
    d = torch.zeros(1, 28, 4)
    d[0, :, 0] = 1.0
    post = d.clone()
    post[0, 23] = -post[0, 23]  # a flipped sign is aligned back
    v = CI.reference_direction(d, post)
    assert torch.allclose(v[0], torch.tensor([1.0, 0, 0, 0]))
    with pytest.raises(ValueError, match="band"):
        CI.reference_direction(d, post, band=[40])


def test_component_sweep_matches_manual(tiny_llama):
    model = tiny_llama
    prompts = _prompts()[:6]
    ranking = [(1, 3, 0.0), (2, 7, 0.0), (0, 5, 0.0), (1, 9, 0.0)]
    r = C.component_sweep(model, prompts, "anger", ranking, kind="neuron", ks=(1, 2),
                          n_random=2, progress=False)
    m = P.logit_readout_metric(model, "anger")
    base = P.metric_values(model, prompts, m)
    got = P.patch(model, prompts, [P.neuron(1, 3), P.neuron(2, 7)], m, ablation="zero")
    assert abs(float(r.top[1, 1]) - float((got - base).mean())) < 1e-5
    assert torch.isnan(r.top[:, 0]).all()  # no v_ref given
    assert r.random_all.shape == (2, 2, 2)
    # enhance with λ = 0 changes nothing; with Δμ it matches a manual hook (heads, all positions)
    dmu = torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    rh = C.component_sweep(model, prompts, "anger", [(1, 2), (0, 1)], kind="head", ks=(2,),
                           mode="enhance", delta_mu=dmu, lam=0.0, n_random=1, progress=False)
    assert rh.top.abs()[:, 1].max() < 1e-5
    rh = C.component_sweep(model, prompts, "anger", [(1, 2), (0, 1)], kind="head", ks=(1,),
                           mode="enhance", delta_mu=dmu, lam=2.0, n_random=1, progress=False)

    def add(x, hook):  # noqa: ARG001
        x = x.clone()
        x[:, :, 2] += 2.0 * dmu[1, 2]
        return x

    with model.hooks(fwd_hooks=[(sites.hook_name(model, "z", 1), add)]):
        want = P.metric_values(model, prompts, m)
    assert abs(float(rh.top[0, 1]) - float((want - base).mean())) < 1e-5
    assert len(rh.to_dataframe()) == 2


def test_difference_vectors_and_jaccard(tiny_llama):
    prompts = _prompts()
    u = C.difference_vectors(tiny_llama, prompts, EMOS, "z", layers=[0, 1], progress=False)
    assert u.shape == (len(EMOS), 2, tiny_llama.cfg.n_heads, tiny_llama.cfg.d_head)
    assert torch.allclose(u.sum(0), torch.zeros_like(u[0]), atol=1e-4)
    assert C.jaccard([(1, 2), (3, 4)], [(1, 2)]) == 0.5


def test_component_errors(tiny_llama):
    prompts = _prompts()
    dirs = _dirs(tiny_llama)
    with pytest.raises(ValueError, match=r"\[emotion=3, layer, d_model\]"):
        C.neuron_contributions(tiny_llama, prompts, None, dirs[:2], EMOS, progress=False)
    with pytest.raises(ValueError, match="layers"):
        C.neuron_contributions(tiny_llama, prompts, None, dirs[:, :2], EMOS, progress=False)
    with pytest.raises(ValueError, match=r"no prompts labelled \['sadness'\]"):
        C.neuron_contributions(tiny_llama, prompts, None, dirs, ["anger", "sadness", "fear"],
                               progress=False)
    with pytest.raises(ValueError, match="labels for"):
        C.head_ablation_importance(tiny_llama, prompts, ["anger"], dirs, EMOS, progress=False)
    with pytest.raises(ValueError, match="fewer than max k"):
        C.component_sweep(tiny_llama, prompts, "anger", [(0, 1)], ks=(1, 2), progress=False)
    with pytest.raises(IndexError, match="neuron 999 out of range"):
        C.component_sweep(tiny_llama, prompts, "anger", [(0, 999)], ks=(1,), progress=False)
    with pytest.raises(ValueError, match="needs delta_mu"):
        C.component_sweep(tiny_llama, prompts, "anger", [(0, 1)], ks=(1,), mode="enhance",
                          progress=False)
    with pytest.raises(ValueError, match="needs directions_mid"):
        C.head_attribution(tiny_llama, prompts, None, EMOS, progress=False)


def test_head_importance_dispatch(tiny_llama):
    prompts = _prompts()[:3]
    dirs = _dirs(tiny_llama, 5)
    a = C.head_importance(tiny_llama, prompts, None, dirs, EMOS, method="ablation", layers=[1], progress=False)
    b = C.head_importance(tiny_llama, prompts, None, dirs, EMOS, method="loop", layers=[1], progress=False)
    assert torch.allclose(a.mean, b.mean, atol=1e-5) and b.method == "ablation_loop"
    with pytest.raises(ValueError, match="method must be"):
        C.head_importance(tiny_llama, prompts, None, dirs, EMOS, method="magic")


@pytest.mark.integration
def test_smol_batched_head_ablation_equals_loop_and_attribution_tracks_it(smol):
    prompts = [Prompt("<|im_start|>user\nI lost my keys again today.<|im_end|>\n<|im_start|>assistant\n",
                      emotion="anger")]
    dirs = torch.randn(1, smol.cfg.n_layers, smol.cfg.d_model, generator=torch.Generator().manual_seed(0))
    a = C.head_ablation_importance(smol, prompts, None, dirs, ["anger"], layers=[4], progress=False)
    b = C.head_ablation_importance(smol, prompts, None, dirs, ["anger"], layers=[4], batched=False,
                                   progress=False)
    assert (a.mean - b.mean).abs().max() <= 1e-4 * max(1.0, float(a.mean.abs().max()))
    att = C.head_attribution(smol, prompts, None, ["anger"], directions_mid=dirs, layers=[4],
                             progress=False)
    assert C.rank_agreement(att.mean, a.mean, k=3)["spearman"] > 0.5


@pytest.mark.parametrize("mode", ["ablate", "enhance"])
def test_neuron_sweep_prefix_reuse_equals_full_forwards(tiny, mode):
    """Last-token sweeps rerun only the last token on a cached prefix: the same sums as one
    full forward per step (padded batches of mixed lengths, s_final and s_logit, random steps)."""
    model = tiny
    prompts = _prompts()[:7]
    g = torch.Generator().manual_seed(1)
    dmu = torch.randn(model.cfg.n_layers, model.cfg.d_mlp, generator=g)
    v_ref = torch.randn(model.cfg.d_model, generator=g)
    metric = C._emotion_score_metric(model, "anger", None, v_ref / v_ref.norm())
    steps = [[(0, 3)], [(1, 2), (2, 9)], [(0, 1), (1, 5), (2, 7), (2, 8)]]
    hooks = [C._intervention_hooks(model, c, "neuron", mode, dmu, 2.0, "last") for c in steps]
    texts = [p.text for p in prompts]
    fast, fb = C._step_sums(model, texts, metric, hooks, 3, prefix=True, progress=False)
    slow, sb = C._step_sums(model, texts, metric, hooks, 3, prefix=False, progress=False)
    assert fast.shape == (3, 2)
    assert torch.allclose(fb, sb, atol=1e-4, rtol=1e-5)
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-5)
    assert (fast - fb).abs().max() > 1e-4  # the steps do change the scores
    r = C.component_sweep(model, prompts, "anger", [(0, 3), (1, 2), (2, 9), (0, 1)], kind="neuron",
                          ks=(1, 2), mode=mode, delta_mu=dmu if mode == "enhance" else None,
                          strength=2.0, v_ref=v_ref, n_random=2, batch_size=3, progress=False)
    assert torch.allclose(r.top[0].double(), (slow[0] - sb) / len(texts), atol=1e-5)  # k=1: [(0, 3)]
    assert "KV-cached" in r.meta["reuse"]
