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
