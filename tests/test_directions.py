"""Emotion directions: invariants, planted-direction recovery for every method, validity checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emocircuits.activations import Activations, collect
from emocircuits.directions import (
    EmotionDirections,
    context_agnostic,
    cosine_across_emotions,
    cosine_across_layers,
    keyword_control,
    mean_difference,
    nearest_centroid_accuracy,
    pca_directions,
    probe_directions,
    reply_mean_activations,
)
from emocircuits.prompts import Prompt, emotion_prompts

EMO = ["anger", "sadness", "happiness", "fear", "surprise", "disgust"]


def _synthetic(n_scen=12, d=32, n_layers=3, signal=3.0, noise=0.5, seed=0, emotions=EMO):
    """h = context_g + signal * V[e, l] + noise, V random unit planted directions."""
    g = torch.Generator().manual_seed(seed)
    E = len(emotions)
    V = torch.randn(E, n_layers, d, generator=g)
    V = V / V.norm(dim=-1, keepdim=True)
    rows, prompts = [], []
    for s in range(n_scen):
        for val in ("positive", "negative"):
            ctx = 5 * torch.randn(n_layers, d, generator=g)
            for k, e in enumerate(emotions):
                rows.append(ctx + signal * V[k] + noise * torch.randn(n_layers, d, generator=g))
                prompts.append(Prompt(f"{s}{val}{e}", e, f"sc_{s:02d}", val))
    x = torch.stack(rows)
    acts = Activations({"resid_post": x, "resid_mid": x * 0.5 + 1}, {"resid_post": [0, 1, 2],
                       "resid_mid": [0, 1, 2]}, "last", meta={"prompts_hash": "abc", "model": "synthetic"})
    return acts, prompts, V


def _centred_unit(V):
    u = V - V.mean(0, keepdim=True)
    return u / u.norm(dim=-1, keepdim=True)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("E", [3, 6])
def test_off_diagonal_cosine_is_minus_one_over_e_minus_one(E):
    """Complete groups => Σ_e u_e = 0 => mean_{e≠e'} <u_e,u_e'> = −mean_e |u_e|² / (E−1) exactly;
    the unit-direction cosine is −1/(E−1) up to the spread of the norms."""
    from emocircuits.directions import group_centered_means

    acts, prompts, _ = _synthetic(emotions=EMO[:E], seed=E)
    raw, info = group_centered_means(acts["resid_post"], [p.group for p in prompts],
                                     [p.emotion for p in prompts], EMO[:E])
    assert not info.dropped
    assert torch.allclose(raw.sum(0), torch.zeros_like(raw[0]), atol=1e-4)
    for j in range(3):
        r = raw[:, j].double()
        gram = r @ r.T
        off = (gram.sum() - gram.trace()) / (E * E - E)
        assert off.item() == pytest.approx(-gram.trace().item() / E / (E - 1), rel=1e-5)
    dirs = context_agnostic(acts, prompts, EMO[:E])
    for layer in dirs.layers:
        cm = cosine_across_emotions(dirs, "resid_post", layer)
        assert cm.off_diagonal_mean() == pytest.approx(-1 / (E - 1), abs=0.05)


def test_off_diagonal_cosine_exact_with_equal_norms():
    # a simplex of E equal-norm centred vectors: the cosine average is exactly −1/(E−1)
    E, d = 6, 16
    base = torch.randn(E, d)
    q, _ = torch.linalg.qr(torch.randn(d, d))
    simplex = torch.eye(E) - 1.0 / E  # rows sum to 0, equal norms
    planted = torch.zeros(E, d)
    planted[:, :E] = simplex
    planted = planted @ q
    x, prompts = [], []
    for s in range(5):
        ctx = 3 * torch.randn(d)
        for k, e in enumerate(EMO):
            x.append(ctx + planted[k] + 0 * base[k])
            prompts.append(Prompt("t", e, f"s{s}", "neutral"))
    acts = Activations({"resid_post": torch.stack(x)[:, None]}, {"resid_post": [0]}, "last")
    dirs = context_agnostic(acts, prompts, EMO)
    cm = cosine_across_emotions(dirs, "resid_post", 0)
    assert cm.off_diagonal_mean() == pytest.approx(-1 / (E - 1), abs=1e-5)


@pytest.mark.parametrize("method", ["context_agnostic", "pca", "probe", "mean_difference"])
def test_planted_directions_recovered(method):
    acts, prompts, V = _synthetic()
    target = _centred_unit(V)  # what is identifiable from group-centred data
    if method == "context_agnostic":
        dirs = context_agnostic(acts, prompts, EMO, sites="resid_post")
    elif method == "pca":
        dirs = pca_directions(acts, prompts, EMO, sites="resid_post")
    elif method == "probe":
        dirs = probe_directions(acts, prompts, EMO, sites="resid_post", group_center=True)
    else:
        # neutral = context only; mean(h_e) − mean(h_neutral) = signal * V_e + noise
        g = torch.Generator().manual_seed(5)
        xn = acts["resid_post"].view(-1, 6, 3, 32).mean(1) - 3.0 * V.mean(0)
        xn = xn + 0.1 * torch.randn(xn.shape, generator=g)
        neutral = Activations({"resid_post": xn}, {"resid_post": [0, 1, 2]}, "last")
        dirs = mean_difference(acts, prompts, EMO, neutral, sites="resid_post")
        target = V
    v = dirs.vectors["resid_post"]
    assert torch.allclose(v.norm(dim=-1), torch.ones(6, 3), atol=1e-5)
    cos = _cos(v, target)
    # the probe's weights follow the margin (separable data), not the class mean: looser bound
    assert cos.min() > (0.8 if method == "probe" else 0.95), (method, cos)
    # and a wrong direction is not recovered (the test can fail)
    assert _cos(v, target.roll(1, 0)).max() < 0.7


def test_probe_without_group_centring_runs_and_aligns():
    acts, prompts, V = _synthetic(signal=6.0)
    dirs = probe_directions(acts, prompts, EMO, sites="resid_post")
    assert _cos(dirs.vectors["resid_post"], _centred_unit(V)).mean() > 0.6


def test_incomplete_groups_reported_and_dropped():
    acts, prompts, _ = _synthetic(n_scen=4)
    keep = [i for i, p in enumerate(prompts) if not (p.group == ("sc_01", "negative") and p.emotion == "fear")]
    sub = Activations({k: v[keep] for k, v in acts.acts.items()}, acts.layers, "last", meta=acts.meta)
    dirs = context_agnostic(sub, [prompts[i] for i in keep], EMO)
    assert dirs.meta["n_groups_used"] == 7
    assert dirs.meta["n_groups_dropped"] == 1
    assert dirs.meta["dropped"] == {"sc_01/negative": ["fear"]}
    pca = pca_directions(sub, [prompts[i] for i in keep], EMO)
    assert pca.meta["n_groups_dropped"] == 1


def test_nan_and_mismatch_errors():
    acts, prompts, _ = _synthetic(n_scen=2)
    bad = acts.acts["resid_post"].clone()
    bad[3, 1, 4] = float("nan")
    b = Activations({"resid_post": bad}, {"resid_post": [0, 1, 2]}, "last")
    for fn in (context_agnostic, pca_directions, probe_directions):
        with pytest.raises(ValueError, match="NaN"):
            fn(b, prompts, EMO)
    with pytest.raises(ValueError, match="rows"):
        context_agnostic(acts, prompts[:-1], EMO)
    with pytest.raises(KeyError, match="resid_pre"):
        context_agnostic(acts, prompts, EMO, sites="resid_pre")


def test_save_load_roundtrip(tmp_path):
    acts, prompts, _ = _synthetic(n_scen=3)
    dirs = context_agnostic(acts, prompts, EMO)
    p = dirs.save(tmp_path / "d" / "dirs.safetensors")
    back = EmotionDirections.load(p)
    assert back.emotions == dirs.emotions and back.layers == dirs.layers
    assert back.meta == dirs.meta
    for s in dirs.sites:
        assert torch.equal(back.vectors[s], dirs.vectors[s])
    assert torch.equal(back.get("fear", "resid_mid"), dirs.vectors["resid_mid"][3])
    assert torch.equal(back["resid_post"]["anger"], dirs.get("anger"))
    assert not list((tmp_path / "d").glob("*.tmp"))
    with pytest.raises(KeyError, match="joy"):
        back.get("joy")
    with pytest.raises(FileNotFoundError):
        EmotionDirections.load(tmp_path / "nope.safetensors")


def test_cosine_across_layers_positions():
    acts, prompts, _ = _synthetic(n_scen=3)
    dirs = context_agnostic(acts, prompts, EMO)
    cm = cosine_across_layers(dirs, "anger")
    assert cm.labels == ["Attn0", "MLP0", "Attn1", "MLP1", "Attn2", "MLP2"]
    assert np.allclose(np.diag(cm.matrix), 1.0, atol=1e-6)
    # brute force one entry
    a = dirs.get("anger", "resid_mid")[1].double()
    b = dirs.get("anger", "resid_post")[2].double()
    assert cm.matrix[2, 5] == pytest.approx(float(a @ b / a.norm() / b.norm()), abs=1e-6)
    assert cm.to_dataframe().shape == (6, 6)


def test_nearest_centroid_accuracy_brute_force():
    acts, prompts, _ = _synthetic(n_scen=6, signal=1.0, noise=1.5)
    r = nearest_centroid_accuracy(acts, prompts, EMO, "resid_post", n_folds=3)
    # brute force, layer 1
    x = acts["resid_post"][:, 1].double()
    scen = sorted({p.skeleton_id for p in prompts})
    fold = {s: i % 3 for i, s in enumerate(scen)}
    hits_c = hits_u = n = 0
    for k in range(3):
        tr = [i for i, p in enumerate(prompts) if fold[p.skeleton_id] != k]
        te = [i for i, p in enumerate(prompts) if fold[p.skeleton_id] == k]

        def centre(idx):
            out = {}
            for i in idx:
                g = prompts[i].group
                members = [j for j in idx if prompts[j].group == g]
                out[i] = x[i] - x[members].mean(0)
            return out

        ctr = centre(tr)
        cent = {e: torch.stack([ctr[i] for i in tr if prompts[i].emotion == e]).mean(0) for e in EMO}
        mu = {e: torch.stack([x[i] for i in tr if prompts[i].emotion == e]).mean(0) for e in EMO}
        cte = centre(te)
        for i in te:
            pc = min(EMO, key=lambda e: float((cte[i] - cent[e]).norm()))
            pu = min(EMO, key=lambda e: float((x[i] - mu[e]).norm()))
            hits_c += pc == prompts[i].emotion
            hits_u += pu == prompts[i].emotion
            n += 1
    assert r.centered[1] == pytest.approx(hits_c / n)
    assert r.uncentered[1] == pytest.approx(hits_u / n)
    assert r.centered[1] > r.chance  # signal present
    assert r.n_groups == 12


def test_fold_error():
    acts, prompts, _ = _synthetic(n_scen=2)
    with pytest.raises(ValueError, match="n_folds"):
        nearest_centroid_accuracy(acts, prompts, EMO, "resid_post", n_folds=3)


def _records(n=4):
    from emocircuits.data import load_sev

    return load_sev("builtin:train")[:n]


def test_collect_to_directions_on_tiny_model(tiny_llama):
    recs = _records(3)
    ps = emotion_prompts(tiny_llama, recs, EMO[:3])
    acts = collect(tiny_llama, ps, ["resid_mid", "resid_post"], progress=False)
    dirs = context_agnostic(acts, ps, EMO[:3])
    assert dirs.vectors["resid_post"].shape == (3, tiny_llama.cfg.n_layers, tiny_llama.cfg.d_model)
    assert dirs.meta["n_groups_used"] == 9 and dirs.meta["data_hash"] == acts.meta["prompts_hash"]
    assert dirs.meta["model"]


def test_keyword_control_tiny(tiny_llama):
    recs = _records(4)
    r = keyword_control(tiny_llama, recs, EMO[:3], ("red", "blue", "green"), n_folds=2, progress=False)
    assert r.emotion.centered.shape == (tiny_llama.cfg.n_layers,)
    # prompts differing only by one word: the centred decoder reads the word (A3)
    assert r.control.centered.min() == pytest.approx(1.0)
    assert "ctrl(c)" in r.format()
    assert len(r.to_dataframe()) == tiny_llama.cfg.n_layers
    with pytest.raises(ValueError, match="emotions"):
        keyword_control(tiny_llama, recs, EMO[:3], ("red", "anger"), progress=False)


def test_reply_mean_activations_match_manual(tiny_llama):
    recs = _records(1)
    ps = emotion_prompts(tiny_llama, recs, EMO[:2])[:3]
    tok = tiny_llama.tokenizer
    replies = [tok(" I am so upset about this.", add_special_tokens=False)["input_ids"],
               tok(" Fine.", add_special_tokens=False)["input_ids"], []]
    acts, kept = reply_mean_activations(tiny_llama, ps, replies, ["resid_post"], layers=[1],
                                        progress=False)
    assert kept == [0, 1]
    # manual: full forward of one sequence, mean over the reply positions
    for j, i in enumerate(kept):
        full = ps[i].text + tok.decode(replies[i])
        a = collect(tiny_llama, [full], ["resid_post"], "all", layers=[1], progress=False)
        n = int(a.lengths[0])
        k = len(replies[i])
        ref = a["resid_post"][0, 0, n - k:n].mean(0)
        assert torch.allclose(acts["resid_post"][j, 0], ref, atol=1e-5)


def test_group_deltas_brute_force_and_the_centring_built_on_it():
    """One group-centring step: group_deltas equals a per-group loop on random data (with an
    incomplete group, a duplicated (group, emotion) and rows of other emotions); the centred
    means, PCA and nearest-centroid paths all use it."""
    from emocircuits.directions import group_centered_means, group_deltas

    g = torch.Generator().manual_seed(3)
    emos = ["a", "b", "c"]
    groups, labels = [], []
    for gi in range(5):
        for e in emos + ["zzz"]:
            groups.append(("s", gi))
            labels.append(e)
    groups += [("s", 1), ("s", 9), ("s", 9)]          # a duplicate of (s1, a); an incomplete group
    labels += ["a", "a", "b"]
    x = torch.randn(len(groups), 2, 4, generator=g) * 3 + 1
    d, info = group_deltas(x, groups, labels, emos)
    assert info.used == [("s", i) for i in range(5)] and info.dropped == {("s", 9): ["c"]}
    for k, grp in enumerate(info.used):
        h = torch.stack([x[[i for i in range(len(groups)) if groups[i] == grp and labels[i] == e]]
                         .double().mean(0) for e in emos])
        torch.testing.assert_close(d[k], h - h.mean(0), rtol=0, atol=1e-12)
    u, _ = group_centered_means(x, groups, labels, emos)
    c = d.mean(0)
    torch.testing.assert_close(u.double(), c - c.mean(0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        group_deltas(torch.full_like(x, float("nan")), groups, labels, emos)
    with pytest.raises(ValueError, match="no complete"):
        group_deltas(x[:2], groups[:2], labels[:2], emos)


def test_pca_and_centroid_paths_unchanged_by_the_merge():
    """pca_directions == the top singular vector of a brute-force per-group δ matrix."""
    acts, prompts, _ = _synthetic(n_scen=4, d=8, seed=5)
    emos = EMO[:3]
    x = acts["resid_post"].double()
    groups = sorted({p.group for p in prompts if p.emotion in emos}, key=str)
    dirs = pca_directions(acts, prompts, emos, sites="resid_post")
    for k in range(len(emos)):
        rows = []
        for grp in groups:
            h = torch.stack([x[[i for i, p in enumerate(prompts) if p.group == grp and p.emotion == f]].mean(0)
                             for f in emos])
            rows.append((h - h.mean(0))[k])
        m = torch.stack(rows)  # [g, layer, d]
        for j in range(m.shape[1]):
            v = torch.linalg.svd(m[:, j], full_matrices=False)[2][0]
            v = v * torch.sign((m[:, j] @ v).mean())
            assert float(_cos(dirs.vectors["resid_post"][k, j], v)) > 1 - 1e-6


def test_directions_ignore_other_collected_sites(tiny_llama):
    """Collecting z (4-d) beside the residual sites does not stop directions on the residual
    sites, and gives the same directions as collecting those sites alone."""
    from emocircuits import directions as D
    from emocircuits.activations import collect
    from emocircuits.data import load_sev
    from emocircuits.prompts import emotion_prompts

    emos = ["anger", "sadness", "happiness"]
    ps = emotion_prompts(tiny_llama, list(load_sev("builtin:train"))[:2], emos)
    both = collect(tiny_llama, ps, ("resid_post", "z"), "last", progress=False)
    alone = collect(tiny_llama, ps, ("resid_post",), "last", progress=False)
    a = D.context_agnostic(both, ps, emos, sites=["resid_post"])
    b = D.context_agnostic(alone, ps, emos, sites=["resid_post"])
    assert torch.equal(a.vectors["resid_post"], b.vectors["resid_post"])
    D.nearest_centroid_accuracy(both, ps, emos, "resid_post", n_folds=2)
    with pytest.raises(ValueError, match=r"one position per prompt .* at \['z'\]"):
        D.context_agnostic(both, ps, emos, sites=["z"])
