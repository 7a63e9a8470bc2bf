"""Story directions (Sofroniew et al. 2026): the tensor pieces against brute force, the
denoising projection on a known subspace, PCA–rating correlations with a known answer, and
the whole pipeline on a tiny model (steerable, saved and loaded)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from emocircuits import story_directions as SD
from emocircuits.activations import collect
from emocircuits.data.stories import HUMAN_VA, STORY_EMOTIONS, human_va_unit, load_stories
from emocircuits.directions import EmotionDirections
from emocircuits.prompts import tokenize
from emocircuits.results import load_result
from emocircuits.steering import steer

# ----------------------------------------------------------------------------- token means


def _left_aligned(n=5, L=2, T=9, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 4, 6, 3])[:n]
    x = torch.randn(n, L, T, d, generator=g)
    for i, k in enumerate(lengths.tolist()):
        x[i, :, k:] = float("nan")  # padding must never be read
    return x, lengths


@pytest.mark.parametrize("from_token", [0, 1, 3, 5, 100])
def test_token_means_brute_force(from_token):
    x, lengths = _left_aligned()
    got = SD.token_means(x, lengths, from_token)
    assert got.shape == (5, 2, 4) and got.dtype == torch.float64
    for i, k in enumerate(lengths.tolist()):
        t0 = from_token if from_token < k else k - 1
        want = torch.stack([x[i, :, t].double() for t in range(t0, k)]).mean(0)
        torch.testing.assert_close(got[i], want)


def test_token_means_from_token_is_respected():
    x, lengths = _left_aligned()
    x = torch.nan_to_num(x)
    x[:, :, :3] = 1000.0  # tokens 0..2 carry a huge value
    assert SD.token_means(x, lengths, 0).abs().max() > 100
    far = SD.token_means(x, lengths, 3)
    for i, k in enumerate(lengths.tolist()):
        if k > 3:  # long enough: the first three tokens are skipped
            assert far[i].abs().max() < 100
        else:  # too short: its last token, which is one of the huge ones
            torch.testing.assert_close(far[i], x[i, :, k - 1].double())
    # other position axes
    xt = x.transpose(1, 2)  # [n, pos, layer, d]
    torch.testing.assert_close(SD.token_means(xt, lengths, 3, pos_dim=1), far)


def test_token_means_rejects_bad_input():
    x, lengths = _left_aligned()
    with pytest.raises(ValueError, match="from_token"):
        SD.token_means(x, lengths, -1)
    with pytest.raises(ValueError, match="lengths"):
        SD.token_means(x, lengths[:3], 0)
    with pytest.raises(ValueError, match="lengths must lie"):
        SD.token_means(x, torch.tensor([10, 1, 1, 1, 1]), 0)


def test_centre_over_emotions_sums_to_zero():
    c = torch.randn(6, 3, 8, dtype=torch.float64) + 5.0
    u = SD.centre_over_emotions(c)
    assert u.sum(0).abs().max() < 1e-12
    torch.testing.assert_close(u[2] - u[4], c[2] - c[4])


# ----------------------------------------------------------------------------- denoising


def _neutral_in_subspace(k=3, d=20, n=200, noise=1e-3, seed=0):
    """Neutral vectors = mean + Q z (Q [d, k] orthonormal, z with decreasing scales) + noise."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0, 3.0, 2.0, 1.5, 1.0][:k], dtype=torch.float64)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * scales
    x = 7.0 + z @ Q.T + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, Q


def test_denoising_removes_exactly_the_neutral_subspace():
    x, Q = _neutral_in_subspace()
    U = SD.neutral_subspace(x, 0.999)
    assert U.shape == (20, 3)  # the three planted axes carry all but the noise
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    # U spans the planted subspace (up to the noise)
    assert torch.linalg.matrix_norm(Q @ Q.T - U @ U.T, ord=2) < 1e-3
    g = torch.Generator().manual_seed(1)
    inside = torch.randn(5, 3, generator=g, dtype=torch.float64) @ U.T
    outside = torch.randn(5, 20, generator=g, dtype=torch.float64)
    outside = outside - outside @ U @ U.T
    v = inside * 4 + outside  # emotion vectors with a component in the neutral subspace
    w = SD.project_out(v, U)
    assert (w @ U).abs().max() < 1e-6  # orthogonal to U
    torch.testing.assert_close(w, outside, atol=1e-10, rtol=0)  # the complement untouched
    P = torch.eye(20, dtype=torch.float64) - U @ U.T
    torch.testing.assert_close(w @ P, v @ P, atol=1e-10, rtol=0)
    # idempotent, dtype kept, k = 0 is the identity
    torch.testing.assert_close(SD.project_out(w, U), w, atol=1e-12, rtol=0)
    assert SD.project_out(v.float(), U).dtype == torch.float32
    assert torch.equal(SD.project_out(v, U[:, :0]), v)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_number_of_components_matches_the_eigenvalue_cumsum(share):
    x, _ = _neutral_in_subspace(k=5, d=12, n=300, noise=0.05)
    U, lam = SD.neutral_subspace(x, share, return_eigenvalues=True)
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc).flip(0)  # covariance eigenvalues, largest first
    torch.testing.assert_close(lam, eig, atol=1e-8, rtol=1e-8)
    cum = (torch.cumsum(eig, 0) / eig.sum()).tolist()
    want = 0 if share == 0 else next(i + 1 for i, c in enumerate(cum) if c >= share - 1e-10)
    assert U.shape == (12, want) == (12, SD.components_for_share(lam, share))
    if want:  # fewest: one fewer would not reach the share
        assert cum[want - 1] >= share - 1e-10 and (want == 1 or cum[want - 2] < share)


def test_components_for_share_edges():
    assert SD.components_for_share([4.0, 3.0, 2.0, 1.0], 0.4) == 1
    assert SD.components_for_share([4.0, 3.0, 2.0, 1.0], 0.41) == 2
    assert SD.components_for_share([4.0, 3.0, 2.0, 1.0], 0.7) == 2  # exactly reached
    assert SD.components_for_share([4.0, 0.0, 0.0], 1.0) == 1  # zero variance never counted
    assert SD.components_for_share([0.0, 0.0], 0.5) == 0
    with pytest.raises(ValueError, match="share"):
        SD.components_for_share([1.0], 1.5)
    assert SD.neutral_subspace(torch.ones(1, 6), 0.5).shape == (6, 0)  # one text: no variance


# ----------------------------------------------------------------------------- VA geometry


def _va_vectors(val, aro, *, d=32, big=10.0, small=1.0, noise=1e-4, seed=0, L=1):
    """Vectors valence·a + arousal·b + noise, a ⟂ b, ‖a‖ = big ≫ ‖b‖ = small: [E, L, d]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    a, b = big * Q[:, 0], small * Q[:, 1]
    v = torch.tensor(val, dtype=torch.float64)[:, None] * a + torch.tensor(aro, dtype=torch.float64)[:, None] * b
    out = v[:, None].repeat(1, L, 1)
    return out + noise * torch.randn(out.shape, generator=g, dtype=torch.float64)


def test_va_geometry_known_answer_with_orthogonal_ratings():
    emos = [f"e{i}" for i in range(20)]
    g = np.random.default_rng(0)
    val = g.normal(size=20)
    aro = g.normal(size=20)
    val, aro = val - val.mean(), aro - aro.mean()
    aro = aro - (aro @ val) / (val @ val) * val  # uncorrelated with valence
    ratings = {e: (float(v), float(a)) for e, v, a in zip(emos, val, aro, strict=True)}
    x = _va_vectors(val, aro, L=3)
    geo = SD.va_geometry(x, emos, ratings=ratings, n_permutations=2000, seed=0)
    assert not geo.exact and geo.n_permutations == 2000
    assert np.all(geo.r_valence > 1 - 1e-6) and np.all(geo.r_arousal > 1 - 1e-6)
    assert np.allclose(geo.p_valence, 1 / 2001) and np.allclose(geo.p_arousal, 1 / 2001)
    assert geo.p_valence_best == pytest.approx(1 / 2001)
    # variance shares: PC1 carries ‖a‖² var(val), PC2 ‖b‖² var(aro), nothing else
    ev = np.array([100 * val.var(), aro.var()])
    assert np.allclose(geo.explained[:, :2], ev / ev.sum(), atol=1e-5)
    assert geo.explained[:, 2:].max() < 1e-6
    # the orientation makes the stored scores correlate positively
    assert np.corrcoef(geo.scores[0, :, 0], val)[0, 1] > 0.999
    assert np.corrcoef(geo.scores[0, :, 1], aro)[0, 1] > 0.999
    # flipping the vectors does not change r (PCA signs are arbitrary)
    flip = SD.va_geometry(-x, emos, ratings=ratings, n_permutations=2000, seed=0)
    assert np.allclose(flip.r_valence, geo.r_valence) and np.allclose(flip.scores, geo.scores)


def test_va_geometry_human_ratings_known_answer():
    """With Warriner's ratings valence and arousal correlate (ρ); PC2 then spans arousal's part
    orthogonal to valence, so r(PC2, arousal) = sqrt(1 − ρ²)."""
    emos = list(STORY_EMOTIONS)
    unit = human_va_unit()
    val = np.array([unit[e][0] for e in emos])
    aro = np.array([unit[e][1] for e in emos])
    rho = np.corrcoef(val, aro)[0, 1]
    x = _va_vectors(val, aro, big=30.0, small=1.0)
    geo = SD.va_geometry(x, emos)  # default ratings: human_va_unit, 10 000 permutations
    assert geo.r_valence[0] > 0.9995
    assert geo.r_arousal[0] == pytest.approx(math.sqrt(1 - rho ** 2), abs=2e-3)
    assert geo.p_valence[0] < 1e-3 and geo.p_arousal[0] < 1e-3
    # the 1–9 scale gives the same r (Pearson is affine-invariant)
    raw = SD.va_geometry(x, emos, ratings=HUMAN_VA)
    assert np.allclose(raw.r_valence, geo.r_valence) and np.allclose(raw.p_arousal, geo.p_arousal)


def test_va_geometry_shuffled_vectors_are_not_significant():
    emos = list(STORY_EMOTIONS)
    unit = human_va_unit()
    val = np.array([unit[e][0] for e in emos])
    aro = np.array([unit[e][1] for e in emos])
    x = _va_vectors(val, aro, big=10.0, small=3.0)
    perm = torch.from_numpy(np.random.default_rng(5).permutation(len(emos)))
    geo = SD.va_geometry(x[perm], emos, n_permutations=5000, seed=1)
    assert geo.r_valence[0] < 0.5 and geo.p_valence[0] > 0.05 and geo.p_arousal[0] > 0.05
    # under the null the p-values are roughly uniform (the test is calibrated)
    ps = []
    for s in range(40):
        pm = torch.from_numpy(np.random.default_rng(100 + s).permutation(len(emos)))
        ps.append(SD.va_geometry(x[pm], emos, n_permutations=499, seed=s).p_valence[0])
    ps = np.array(ps)
    assert 0.3 < ps.mean() < 0.7 and (ps < 0.05).mean() <= 0.15


def test_va_geometry_exact_enumeration_for_few_emotions():
    emos = ["anger", "fear", "happiness", "calm"]
    unit = human_va_unit()
    val = np.array([unit[e][0] for e in emos])
    aro = np.array([unit[e][1] for e in emos])
    geo = SD.va_geometry(_va_vectors(val, aro), emos, n_permutations=100)
    assert geo.exact and geo.n_permutations == 24  # 4! permutations, identity included
    assert geo.p_valence[0] >= 1 / 24 - 1e-12
    # the p-value is the share of permutations at least as extreme (brute force)
    import itertools

    sc = geo.scores[0, :, 0]
    r_all = [abs(np.corrcoef(sc, val[list(p)])[0, 1]) for p in itertools.permutations(range(4))]
    assert geo.p_valence[0] == pytest.approx(np.mean(np.array(r_all) >= geo.r_valence[0] - 1e-12))


def test_va_geometry_errors():
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="emotions="):
        SD.va_geometry(x)
    with pytest.raises(ValueError, match="ratings"):
        SD.va_geometry(x, ["anger", "fear", "nope"])
    with pytest.raises(ValueError, match="at least 3"):
        SD.va_geometry(x[:2], ["anger", "fear"])
    with pytest.raises(ValueError, match="layer labels"):
        SD.va_geometry(x, ["anger", "fear", "calm"], layers=[0])


def test_va_geometry_of_directions_table_plots_and_round_trip(tmp_path):
    emos = ["anger", "fear", "happiness", "calm", "sadness", "love", "boredom", "excitement"]
    unit = human_va_unit()
    val = np.array([unit[e][0] for e in emos])
    aro = np.array([unit[e][1] for e in emos])
    x = _va_vectors(val, aro, L=3, noise=0.3, seed=2).float()
    x[:, 0] = torch.randn(8, 32)  # layer 4 (row 0) is noise
    dirs = EmotionDirections(emos + ["neutral"], [4, 6, 9],
                             {"resid_post": torch.cat([x, torch.randn(1, 3, 32)])},
                             {"method": "story_mean", "from_token": 10})
    geo = SD.va_geometry(dirs, n_permutations=3000)  # "neutral" has no rating: left out
    assert geo.emotions == emos and geo.layers == [4, 6, 9] and geo.meta["unrated"] == ["neutral"]
    assert geo.meta["from_token"] == 10 and "r >= 0" in geo.meta["sign_rule"]
    assert geo.best_layer_valence in (6, 9) and geo.p_valence_best <= geo.p_valence.max()
    df = geo.to_dataframe()
    assert list(df.columns) == ["layer", "var_pc1", "var_pc2", "r_valence", "p_valence",
                                "r_arousal", "p_arousal"]
    assert df["layer"].tolist() == [4, 6, 9] and np.allclose(df["r_valence"], geo.r_valence)
    sub = SD.va_geometry(dirs, emos[:5], layers=[9], n_permutations=50)
    assert sub.layers == [9] and not sub.exact and sub.n_permutations == 50  # 5! = 120 > 50
    r = repr(geo)
    assert r.startswith("VAGeometry(") and len(r) < 400 and "array(" not in r
    fig = geo.plot()
    assert isinstance(fig, Figure) and fig.axes
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("0.81" in t for t in labels) and any("0.66" in t for t in labels)
    assert any("0.76" in t for t in labels) and any("0.83" in t for t in labels)
    sc = SD.va_scatter(geo, 6)
    assert isinstance(sc, Figure) and len(sc.axes[0].texts) == len(emos)
    assert SD.va_scatter(geo, out=tmp_path / "s.png").is_file()
    with pytest.raises(KeyError):
        SD.va_scatter(geo, 5)
    js = geo.save(tmp_path / "geo")
    for back in (SD.VAGeometry.load(js), load_result(js)):
        assert type(back) is SD.VAGeometry
        assert back.emotions == geo.emotions and back.layers == geo.layers
        for name in ("valence", "arousal", "explained", "scores", "r_valence", "r_arousal",
                     "p_valence", "p_arousal"):
            assert np.array_equal(getattr(back, name), getattr(geo, name)), name
        assert (back.best_layer_valence, back.p_arousal_best, back.exact, back.meta) == (
            geo.best_layer_valence, geo.p_arousal_best, geo.exact, geo.meta)


# ----------------------------------------------------------------------------- end to end

EMOS = ["anger", "happiness", "fear", "calm"]  # STORY_EMOTIONS order (the default)


@pytest.fixture(scope="module")
def corpus():
    stories = load_stories(emotions=EMOS)
    picked = [s for e in EMOS for s in [x for x in stories if x.emotion == e][:3]]
    neutral = [s.text for s in load_stories(emotions=["neutral"])[:6]]
    return picked, neutral


def _manual(model, picked, neutral, from_token, share, site="resid_post", layers=None):
    """The method written out in one go: one collect for everything, no batching tricks."""
    acts = collect(model, [s.text for s in picked], site, "all", layers=layers, batch_size=64,
                   progress=False)
    m = SD.token_means(acts[site], acts.lengths, from_token)
    c = torch.stack([m[[i for i, s in enumerate(picked) if s.emotion == e]].mean(0) for e in EMOS])
    u = SD.centre_over_emotions(c)
    ks = []
    if neutral:
        na = collect(model, neutral, site, "all", batch_size=64, progress=False)
        nm = SD.token_means(na[site], na.lengths, from_token)
        for j in range(u.shape[1]):
            U = SD.neutral_subspace(nm[:, j], share)
            ks.append(U.shape[1])
            u[:, j] = SD.project_out(u[:, j], U)
    return (u / u.norm(dim=-1, keepdim=True)).float(), ks, (nm if neutral else None)


def test_story_directions_end_to_end(tiny_llama, corpus, tmp_path):
    m = tiny_llama
    picked, neutral = corpus
    dirs = SD.story_directions(m, picked, sites=("resid_post", "resid_mid"), neutral=neutral,
                               batch_size=4, progress=False)  # 4: several length-sorted batches
    L, d = m.cfg.n_layers, m.cfg.d_model
    assert isinstance(dirs, EmotionDirections) and dirs.emotions == EMOS
    assert dirs.layers == list(range(L)) and dirs.sites == ["resid_post", "resid_mid"]
    v = dirs.tensor("resid_post")
    assert v.shape == (4, L, d) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4, L), atol=1e-5, rtol=0)
    want, ks, nm = _manual(m, picked, neutral, SD.DEFAULT_FROM_TOKEN, 0.5)
    torch.testing.assert_close(v, want, atol=1e-4, rtol=0)  # batching/padding change nothing
    meta = dirs.meta
    assert meta["method"] == "story_mean" and meta["from_token"] == 10
    assert meta["denoise_share"] == 0.5 and meta["n_neutral"] == 6
    assert meta["n_components_removed"]["resid_post"] == ks and all(k >= 1 for k in ks)
    assert meta["stories"] == {e: [s.id for s in picked if s.emotion == e] for e in EMOS}
    assert meta["n_stories"] == {e: 3 for e in EMOS}
    assert all(0 < x <= 1 for x in meta["neutral_variance_removed"]["resid_post"])
    for j in range(L):  # orthogonal to the removed neutral subspace
        U = SD.neutral_subspace(nm[:, j], 0.5)
        assert (v[:, j].double() @ U).abs().max() < 1e-4
    # it steers: a forward under steer(...) changes the logits
    b = tokenize(m, ["The morning was", "She opened the letter and"])
    clean = m(b.tokens, attention_mask=b.attention_mask)
    with steer(m, dirs, [1], 4.0, emotion="fear") as vecs:
        steered = m(b.tokens, attention_mask=b.attention_mask)
    torch.testing.assert_close(vecs[1], dirs.at("fear", 1))
    assert not torch.allclose(steered, clean)
    # save / load round trip (directions and their geometry)
    back = EmotionDirections.load(dirs.save(tmp_path / "dirs"))
    assert back.emotions == dirs.emotions and back.layers == dirs.layers and back.meta == dirs.meta
    assert all(torch.equal(back.vectors[s], dirs.vectors[s]) for s in dirs.sites)
    geo = SD.va_geometry(dirs)
    assert geo.exact and geo.n_permutations == 24 and geo.layers == list(range(L))
    gb = SD.VAGeometry.load(geo.save(tmp_path / "geo"))
    assert np.array_equal(gb.r_valence, geo.r_valence, equal_nan=True) and gb.meta == geo.meta


def test_story_directions_options(tiny_gemma, corpus):
    m = tiny_gemma
    picked, neutral = corpus
    stories = picked + [type(picked[0])(f"n{i}", "neutral", "third", "t", t) for i, t in enumerate(neutral)]
    # neutral=None takes the neutral stories; same as passing their texts
    auto = SD.story_directions(m, stories, layers=[0, 1], progress=False)
    given = SD.story_directions(m, picked, layers=[0, 1], neutral=neutral, progress=False)
    assert auto.layers == [0, 1] and auto.meta["neutral_source"] == "stories"
    torch.testing.assert_close(auto.tensor("resid_post"), given.tensor("resid_post"))
    # no denoising: neutral=[] and denoise_share=0 agree, nothing removed
    off = SD.story_directions(m, stories, layers=[0, 1], neutral=[], progress=False)
    zero = SD.story_directions(m, stories, layers=[0, 1], denoise_share=0.0, progress=False)
    torch.testing.assert_close(off.tensor("resid_post"), zero.tensor("resid_post"))
    assert off.meta["n_components_removed"]["resid_post"] == [0, 0] and off.meta["n_neutral"] == 0
    want, _, _ = _manual(m, picked, [], 10, 0.0, layers=[0, 1])
    torch.testing.assert_close(off.tensor("resid_post"), want, atol=1e-4, rtol=0)
    # from_token: a later start changes the vectors; past every story's end = last token only
    late = SD.story_directions(m, picked, layers=[0, 1], neutral=[], from_token=10_000, progress=False)
    assert late.meta["n_short"] == len(picked)
    assert not torch.allclose(late.tensor("resid_post"), off.tensor("resid_post"), atol=1e-3)
    last = collect(m, [s.text for s in picked], "resid_post", "last", layers=[0, 1], progress=False)
    c = torch.stack([last["resid_post"][[i for i, s in enumerate(picked) if s.emotion == e]].double().mean(0)
                     for e in EMOS])
    u = SD.centre_over_emotions(c)
    torch.testing.assert_close(late.tensor("resid_post"), (u / u.norm(dim=-1, keepdim=True)).float(),
                               atol=1e-4, rtol=0)
    # emotions= picks and orders
    two = SD.story_directions(m, picked, emotions=["calm", "anger"], neutral=[], layers=[2],
                             progress=False)
    assert two.layers == [2] and two.emotions == ["calm", "anger"] and two.meta["n_stories"] == {"calm": 3, "anger": 3}


def test_story_directions_errors(tiny_llama, corpus):
    picked, _ = corpus
    with pytest.raises(ValueError, match="no stories"):
        SD.story_directions(tiny_llama, picked, emotions=["anger", "love"], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        SD.story_directions(tiny_llama, picked[:3], progress=False)
    with pytest.raises(ValueError, match="neutral"):
        SD.story_directions(tiny_llama, picked, emotions=["anger", "neutral"], progress=False)
    with pytest.raises(ValueError, match="share"):
        SD.story_directions(tiny_llama, picked, denoise_share=1.5, progress=False)
    with pytest.raises(ValueError, match="vector site"):
        SD.story_directions(tiny_llama, picked, sites="z", progress=False)


def test_story_difference_vectors_match_a_loop_over_stories(tiny_llama, corpus):
    """Δμ at mlp_post and z from stories against one collect per story and plain means."""
    from emocircuits.activations import collect

    picked, _ = corpus
    emos = ["anger", "calm"]
    rows = [x for x in picked if x.emotion in emos]
    got = SD.story_difference_vectors(tiny_llama, rows, emos, from_token=2, batch_size=3, progress=False)
    per = {e: {"mlp_post": [], "z": []} for e in emos}
    for x in rows:
        a = collect(tiny_llama, [x.text], ("mlp_post", "z"), "all", progress=False)
        n = int(a.lengths[0])
        for site in ("mlp_post", "z"):
            per[x.emotion][site].append(a[site][0, :, 2:n].double().mean(1))
    for site, field in (("mlp_post", "mlp"), ("z", "z")):
        means = torch.stack([torch.stack(per[e][site]).mean(0) for e in emos])
        want = means - means.mean(0, keepdim=True)
        torch.testing.assert_close(getattr(got.difference, field).double(), want, atol=1e-5, rtol=1e-4)
        if site == "mlp_post":
            torch.testing.assert_close(got.mlp_means.double(), means, atol=1e-5, rtol=1e-4)
    assert got.n_stories == {e: sum(x.emotion == e for x in rows) for e in emos}
    assert got.difference.z.shape[2:] == (tiny_llama.cfg.n_heads, tiny_llama.cfg.d_head)
    with pytest.raises(ValueError, match="no stories"):
        SD.story_difference_vectors(tiny_llama, rows, ["anger", "love"], progress=False)
