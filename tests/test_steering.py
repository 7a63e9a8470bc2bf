"""Steering adds exactly α·scale·v at the chosen positions and nowhere else; hooks are cleaned up."""

from __future__ import annotations

import pytest
import torch

from emocircuits import sites as S
from emocircuits.directions import EmotionDirections
from emocircuits.generation import GenerationConfig, generate, is_decoding
from emocircuits.prompts import tokenize
from emocircuits.steering import (
    PAPER_STEERING,
    SweepResult,
    paper_layers,
    steer,
    steering_sweep,
    steering_vectors,
)

PROMPTS = ["The cat sat on the mat and", "Hello there, how are", "One two three four five six seven"]


def _dirs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.n_layers, model.cfg.d_model, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def _run_capture(model, layer, ctx_factory, gen=False, site="resid_post"):
    """Record the value at (site, layer) before and after the steering hook, for every call."""
    pre, post, phase = [], [], []
    name = S.hook_name(model, site, layer)

    def cap_pre(x, hook):  # noqa: ARG001
        pre.append(x.detach().clone())
        phase.append(is_decoding(model))
        return x

    def cap_post(x, hook):  # noqa: ARG001
        post.append(x.detach().clone())
        return x

    with model.hooks(fwd_hooks=[(name, cap_pre)]):
        with ctx_factory():
            with model.hooks(fwd_hooks=[(name, cap_post)]):
                if gen:
                    generate(model, PROMPTS, GenerationConfig(max_new_tokens=4), progress=False)
                else:
                    b = tokenize(model, PROMPTS)
                    model(b.tokens, attention_mask=b.attention_mask)
    return pre, post, phase


def _expected_add(pre, v, alpha, scale):
    h = pre.double()
    if scale == "rms":
        return alpha * torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-12) * v.double()
    return (alpha * v.double()).expand_as(h)  # "none" (old name "unit")


@pytest.mark.parametrize("scale", ["rms", "none", "unit"])
@pytest.mark.parametrize("positions", ["last", "all", "index"])
def test_prefill_adds_exactly_at_positions(tiny, scale, positions):
    v = _dirs(tiny)
    layer = 1
    pos = torch.tensor([-3, -1]) if positions == "index" else positions
    pre, post, _ = _run_capture(tiny, layer, lambda: steer(tiny, v, [layer], 3.0, scale=scale, positions=pos))
    assert len(pre) == 1
    diff = post[0].double() - pre[0].double()
    exp = _expected_add(pre[0], v[layer], 3.0, scale)
    mask = torch.zeros(pre[0].shape[:2], dtype=torch.bool)
    if positions == "last":
        mask[:, -1] = True
    elif positions == "all":
        mask[:] = True
    else:
        mask[:, [-3, -1]] = True
    assert torch.allclose(diff[mask], exp[mask], atol=1e-5)
    assert diff[~mask].abs().max() == 0 if (~mask).any() else True
    # the first steered layer's input is the clean run's (nothing upstream changed)
    b = tokenize(tiny, PROMPTS)
    _, cache = tiny.run_with_cache(b.tokens, attention_mask=b.attention_mask,
                                   names_filter=[S.hook_name(tiny, "resid_post", layer)])
    assert torch.allclose(cache[S.hook_name(tiny, "resid_post", layer)], pre[0], atol=1e-6)


@pytest.mark.parametrize("positions", ["last", "all", "generated", "index"])
def test_generate_steers_the_right_calls(tiny_llama, positions):
    m = tiny_llama
    v = _dirs(m, 1)
    layer = 2
    pos = torch.tensor([-2]) if positions == "index" else positions
    pre, post, phase = _run_capture(m, layer, lambda: steer(m, v, [layer], 2.0, scale="rms", positions=pos), gen=True)
    assert len(pre) >= 2 and phase[0] is False and all(phase[1:])
    for a, b, dec in zip(pre, post, phase, strict=True):
        diff = b.double() - a.double()
        exp = _expected_add(a, v[layer], 2.0, "rms")
        mask = torch.zeros(a.shape[:2], dtype=torch.bool)
        if positions == "all":
            mask[:] = True
        elif positions == "last":
            mask[:, -1] = True
        elif positions == "generated":
            mask[:, -1] = dec
        elif not dec:
            mask[:, -2] = True
        assert torch.allclose(diff[mask], exp[mask], atol=1e-5)
        assert (diff[~mask] == 0).all()


def test_alpha_schedule_sees_steps(tiny_llama):
    m = tiny_llama
    v = _dirs(m, 2)
    seen = []

    def alpha(step):
        seen.append(step)
        return 1.0 / (1 + step)

    pre, post, phase = _run_capture(m, 0, lambda: steer(m, v, [0], alpha, scale="rms"), gen=True)
    n_calls = len(pre)
    assert seen == list(range(n_calls))
    for k, (a, b) in enumerate(zip(pre, post, strict=True)):
        exp = _expected_add(a[:, -1:], v[0], 1.0 / (1 + k), "rms")
        assert torch.allclose((b - a)[:, -1:].double(), exp, atol=1e-5)
    # a second forward restarts at step 0
    seen.clear()
    with steer(m, v, [0], alpha, scale="rms"):
        b = tokenize(m, PROMPTS)
        m(b.tokens, attention_mask=b.attention_mask)
    assert seen == [0]


def test_hooks_removed_on_exception_and_output_restored(tiny_llama):
    m = tiny_llama
    b = tokenize(m, PROMPTS)
    clean = m(b.tokens, attention_mask=b.attention_mask)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(m, _dirs(m), [0, 1], 8.0, scale="rms"):
            steered = m(b.tokens, attention_mask=b.attention_mask)
            assert not torch.allclose(steered, clean)
            raise RuntimeError("boom")
    after = m(b.tokens, attention_mask=b.attention_mask)
    assert torch.equal(after, clean)


def test_emotion_directions_and_mixtures(tiny_llama):
    m = tiny_llama
    L, d = m.cfg.n_layers, m.cfg.d_model
    vec = torch.randn(2, L, d)
    dirs = EmotionDirections(["anger", "fear"], list(range(L)), {"resid_post": vec})
    one = steering_vectors(m, dirs, [1, 2], emotion="fear")
    assert torch.equal(one[2], vec[1, 2])
    mix = steering_vectors(m, dirs, [1], emotion=[("anger", 0.5), ("fear", 2.0)])
    assert torch.allclose(mix[1], 0.5 * vec[0, 1] + 2.0 * vec[1, 1], atol=1e-6)
    mix2 = steering_vectors(m, dirs, [1], emotion={"anger": 0.5, "fear": 2.0})
    assert torch.allclose(mix[1], mix2[1])
    with pytest.raises(ValueError, match="emotion="):
        steering_vectors(m, dirs, [1])
    with pytest.raises(KeyError, match="joy"):
        steering_vectors(m, dirs, [1], emotion="joy")


def test_errors(tiny_llama):
    m = tiny_llama
    v = _dirs(m)
    with pytest.raises(ValueError, match="d_model mismatch"):
        steering_vectors(m, torch.randn(m.cfg.n_layers, m.cfg.d_model + 1), [0])
    with pytest.raises(S.UnknownSiteError, match="resid_bogus"):
        steering_vectors(m, v, [0], site="resid_bogus")
    with pytest.raises(ValueError, match="z"):
        steering_vectors(m, v, [0], site="z")
    bad = v.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        with steer(m, bad, [1]):
            pass
    with pytest.raises(IndexError, match="out of range"):
        with steer(m, v, [m.cfg.n_layers]):
            pass
    with pytest.raises(ValueError, match="positions"):
        with steer(m, v, [0], positions="first"):
            pass
    with pytest.raises(ValueError, match="scale"):
        with steer(m, v, [0], scale="l2"):
            pass
    with pytest.raises(ValueError, match="rows"):
        steering_vectors(m, v[:2], [0])


def test_paper_layers_and_defaults(tiny_llama):
    assert paper_layers(28) == list(range(11, 21))
    assert paper_layers(30) == list(range(12, 23))
    assert len(paper_layers(3)) >= 1
    v = _dirs(tiny_llama)
    with steer(tiny_llama, v, **PAPER_STEERING) as vecs:
        assert list(vecs) == paper_layers(tiny_llama)
    with pytest.raises(TypeError):
        PAPER_STEERING["strength"] = 1.0  # read-only


def test_sweep_rows_and_best(tiny_llama):
    m = tiny_llama
    L, d = m.cfg.n_layers, m.cfg.d_model
    dirs = EmotionDirections(["anger", "fear"], list(range(L)), {"resid_post": torch.randn(2, L, d)})

    class Judge:
        name = "len"

        def judge(self, texts, targets):
            import numpy as np

            from emocircuits.judges.base import JudgeResult

            return JudgeResult(("anger", "fear"), list(targets), np.zeros((len(texts), 2)),
                               [len(t) % 2 == 0 for t in texts])

    res = steering_sweep(m, PROMPTS[:2], dirs, ["anger", "fear"], [[0], [1, 2]], [0.0, 4.0], Judge(),
                         GenerationConfig(max_new_tokens=3), progress=False)
    assert isinstance(res, SweepResult)
    df = res.to_dataframe()
    assert len(df) == 2 + 2 * 2 * 2
    assert set(df["layers"]) == {"none", "0", "1-2"}
    assert df["perplexity"].notna().all()
    best = res.best("readout_share")
    assert best["alpha"] != 0
    assert res.to_dict()["summary"]
    # α = 0 steering equals the unsteered baseline
    base = df[df["layers"] == "none"].set_index("emotion")["readout_share"]
    zero = df[(df["layers"] == "0") & (df["alpha"] == 0.0)].set_index("emotion")["readout_share"]
    assert (base - zero).abs().max() < 1e-6
    with pytest.raises(ValueError, match="no setting"):
        res.best("readout_share", max_perplexity=-1)


@pytest.mark.integration
def test_smol_paper_steering_raises_target_readout(smol):
    """Directions from 2 train scenarios; paper steering toward anger raises anger's next-token
    share at the reply start (prompt + "I feel") on held-out test prompts. (Not every emotion:
    on SmolLM2 the paper's α = 8 over 11 layers breaks the text and happiness's share *falls*.)"""
    from emocircuits import collect
    from emocircuits.data import load_sev
    from emocircuits.directions import context_agnostic, cosine_across_emotions
    from emocircuits.judges.readout import emotion_readout
    from emocircuits.prompts import emotion_prompts, neutral_prompts

    emos = ["anger", "sadness", "happiness", "fear", "surprise", "disgust"]
    train = load_sev("builtin:train")[:2]
    ep = emotion_prompts(smol, train, emos)
    dirs = context_agnostic(collect(smol, ep, ["resid_post"], progress=False), ep, emos)
    assert cosine_across_emotions(dirs, "resid_post", 15).off_diagonal_mean() == pytest.approx(-0.2, abs=0.05)
    tp = [p.text + "I feel" for p in neutral_prompts(smol, load_sev("builtin:test")[:2])]
    base = emotion_readout(smol, tp, emos).share
    for e in ("anger",):
        with steer(smol, dirs, emotion=e, **PAPER_STEERING):
            s = emotion_readout(smol, tp, emos).share
        k = emos.index(e)
        assert s[:, k].mean() > base[:, k].mean() + 0.05, (e, s[:, k].mean(), base[:, k].mean())
