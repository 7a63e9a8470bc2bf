"""Tests for emocircuits.control: VA directions, VA measurement, continuous control,
vocabulary bias and the decaying schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emocircuits import control as C
from emocircuits.emotions import EKMAN6, VA_COORDINATES
from emocircuits.generation import GenerationConfig, generate
from emocircuits.judges.base import JudgeResult
from emocircuits.prompts import Prompt
from emocircuits.sites import hook_name

EMO7 = EKMAN6 + ("neutral",)


# ------------------------------------------------------------------ VA map / directions


def _planted(n_layer=3, d=32, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.tensor([VA_COORDINATES[e] for e in EMO7], dtype=torch.float64)
    W = torch.randn(n_layer, 2, d, generator=g, dtype=torch.float64)
    b = torch.randn(n_layer, d, generator=g, dtype=torch.float64)  # intercept (mean direction)
    D = torch.einsum("ek,lkd->eld", V, W) + b + noise * torch.randn(len(EMO7), n_layer, d, generator=g,
                                                                    dtype=torch.float64)
    return V, W, D


def test_va_map_recovers_planted_map():
    V, W, D = _planted()
    What = C.va_map(D.float(), V)
    assert What.shape == (3, 2, 32)
    torch.testing.assert_close(What.double(), W, atol=2e-2, rtol=0)
    # reference: normal equations on centred data, numpy float64, layer by layer
    Vc = (V - V.mean(0)).numpy()
    for lyr in range(3):
        Dc = (D[:, lyr] - D[:, lyr].mean(0)).numpy()
        ref = np.linalg.solve(Vc.T @ Vc, Vc.T @ Dc)
        np.testing.assert_allclose(What[lyr].numpy(), ref, atol=1e-4)


def test_va_directions_lstsq_units_and_signs():
    V, W, D = _planted(noise=1e-4)
    va = C.va_directions("lstsq", directions=D.float(), emotions=EMO7, layers=[4, 5, 6])
    assert va.vectors.shape == (2, 3, 32) and va.layers == [4, 5, 6]
    torch.testing.assert_close(va.vectors.norm(dim=-1), torch.ones(2, 3))
    truth = W.movedim(1, 0) / W.movedim(1, 0).norm(dim=-1, keepdim=True)
    cos = (va.vectors.double() * truth).sum(-1)
    assert (cos > 0.999).all(), cos
    # the planted coordinates come back: project D_c on W⁺ and compare with V_c
    Wl = C.va_map(D.float(), V)[0].double()
    Dc = D[:, 0] - D[:, 0].mean(0)
    V_back = Dc @ torch.linalg.pinv(Wl)
    torch.testing.assert_close(V_back, V - V.mean(0), atol=1e-3, rtol=0)


def test_va_directions_errors():
    D = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match="directions"):
        C.va_directions("lstsq")
    with pytest.raises(ValueError, match="emotions"):
        C.va_directions("lstsq", directions=D, emotions=EMO7)
    with pytest.raises(KeyError, match="VA coordinates"):
        C.va_directions("lstsq", directions=D, emotions=("a", "b", "c", "d", "e", "f"))
    with pytest.raises(ValueError, match="method"):
        C.va_directions("pca", directions=D)
    with pytest.raises(ValueError, match="collinear"):
        C.va_map(D, torch.tensor([[float(i), 2.0 * i] for i in range(6)]))


def test_va_directions_contrastive_recovers_planted():
    g = torch.Generator().manual_seed(3)
    L, d = 2, 24
    val_dir = torch.randn(L, d, generator=g)
    ar_dir = torch.randn(L, d, generator=g)
    arousal_of = {"anger": 1.0, "fear": 1.0, "surprise": 1.0, "sadness": -1.0, "neutral": -1.0,
                  "happiness": 0.3, "disgust": 0.5}
    neutral, n_acts, emo, e_acts = [], [], [], []
    for s in range(10):
        ctx = 5 * torch.randn(L, d, generator=g)  # large scenario-specific offset
        for v, sign in (("positive", 1.0), ("neutral", 0.0), ("negative", -1.0)):
            neutral.append(Prompt("x", None, f"s{s}", v))
            n_acts.append(ctx + sign * val_dir + 0.05 * torch.randn(L, d, generator=g))
            for e, a in arousal_of.items():
                emo.append(Prompt("x", e, f"s{s}", v))
                e_acts.append(ctx + sign * val_dir + a * ar_dir + 0.05 * torch.randn(L, d, generator=g))
    va = C.va_directions("contrastive", neutral_acts=torch.stack(n_acts), neutral_prompts=neutral,
                         emotion_acts=torch.stack(e_acts), emotion_prompts=emo)
    cos_v = torch.nn.functional.cosine_similarity(va.valence, val_dir, dim=-1)
    cos_a = torch.nn.functional.cosine_similarity(va.arousal, ar_dir, dim=-1)
    assert (cos_v > 0.99).all() and (cos_a > 0.99).all(), (cos_v, cos_a)
    assert va.meta["low_arousal"] == ["sadness", "neutral"]
    cmp = C.compare_va_directions(va, C.VADirections(-va.vectors, [0, 1], "neg"))
    torch.testing.assert_close(cmp.cosine, -torch.ones(2, 2))


def test_va_directions_save_load(tmp_path):
    va = C.VADirections(torch.randn(2, 3, 8), [2, 5, 7], "lstsq", meta={"emotions": list(EKMAN6)})
    va.save(tmp_path / "va")
    back = C.VADirections.load(tmp_path / "va.json")
    assert torch.equal(back.vectors, va.vectors) and back.layers == [2, 5, 7]
    assert back.method == "lstsq" and back.meta == va.meta
    with pytest.raises(FileNotFoundError, match="missing"):
        C.VADirections.load(tmp_path / "nope")


# ------------------------------------------------------------------ VA measurement


class _FakeJudge:
    name = "fake"
    names = EMO7

    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=float)

    def judge(self, texts, targets):
        n = len(texts)
        return JudgeResult(EMO7, [None] * n, self.scores[:n], [False] * n)


def test_va_of_texts_on_crafted_distributions():
    onehot_h = np.eye(7)[2]
    mix = np.zeros(7)
    mix[0], mix[1] = 0.5, 0.5                          # anger/sadness
    neutral = np.eye(7)[6]
    uniform = np.full(7, 1 / 7)
    unnorm = 3 * np.eye(7)[3]                          # fear, mass 3 (renormalised)
    j = _FakeJudge([onehot_h, mix, neutral, uniform, unnorm])
    out = C.va_of_texts(["a", "b", "c", "d", "e"], judge=j)
    exp = [
        VA_COORDINATES["happiness"],
        ((-0.51 - 0.63) / 2, (0.59 - 0.27) / 2),
        (0.0, 0.0),
        tuple(np.mean([VA_COORDINATES[e] for e in EMO7], axis=0)),
        VA_COORDINATES["fear"],
    ]
    np.testing.assert_allclose(out, np.array(exp), atol=1e-12)
    with pytest.raises(TypeError):
        C.va_of_texts("one string", judge=j)


def test_va_of_texts_default_judge_orders_texts():
    va = C.va_of_texts(["I am so happy and delighted, what a wonderful day!",
                        "I feel so sad and heartbroken, I miss her.",
                        "The meeting is at 3 pm in room B."])
    assert va[0, 0] > 0.3 > -0.3 > va[1, 0]            # valence: happy > sad
    assert abs(va[2, 0]) < abs(va[0, 0]) and abs(va[2, 0]) < abs(va[1, 0])


def test_axis_scores_linear_and_reversed():
    grid = C.default_grid((-1, 0, 1))
    rng = np.random.default_rng(0)
    t = np.array(grid)
    measured = 0.4 * t[:, None, :] + 0.01 * rng.standard_normal((len(grid), 4, 2))
    s = C.axis_scores(grid, measured, 0)
    assert s.pearson_r > 0.99 and s.spearman > 0.9 and s.monotonic_fraction == 1.0
    assert s.line_spearman == pytest.approx(1.0)
    assert s.mae == pytest.approx(np.abs(0.6 * t[:, 0]).mean(), abs=0.02)
    r = C.axis_scores(grid, -measured, 1)
    assert r.pearson_r < -0.99 and r.monotonic_fraction == 0.0
    assert C.spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    assert C.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_emotion_word_rate():
    r = C.emotion_word_rate(["I am so happy, truly happy!", "", "angry? no"],
                            ["happiness", "anger", "happiness"])
    assert r == [pytest.approx(2 / 6), 0.0, 0.0]


# ------------------------------------------------------------------ vocabulary bias


def test_emotion_word_token_ids_checked_against_tokenizer(tiny_llama):
    tok = tiny_llama.tokenizer
    ids = C.emotion_word_token_ids(tiny_llama)
    happy = tok(" happy", add_special_tokens=False)["input_ids"]
    assert len(happy) == 1 and happy[0] in ids["happiness"]
    s_tok = tok("sad", add_special_tokens=False)["input_ids"][0]   # "s" + "ad": a fragment
    assert tok.decode([s_tok]).strip() != "sad" and s_tok not in ids["sadness"]
    flat = [t for v in ids.values() for t in v]
    assert len(flat) == len(set(flat))                               # no shared tokens
    for e, v in ids.items():
        for t in v:
            piece = tok.decode([t]).strip().lower()
            assert any(w.startswith(piece) for w in C.EMOTION_WORDS[e]), (e, piece)


def test_vocabulary_bias_changes_exactly_the_chosen_ids():
    token_ids = {"anger": (3, 17, 40), "sadness": (5, 6), "happiness": (49,)}
    logits = torch.randn(3, 50)
    proc = C.VocabularyBias(token_ids, ["anger", "sadness", "anger"], strength=2.5)
    out = proc(0, [[1], [1], [1]], logits.clone())
    for i, e in enumerate(["anger", "sadness", "anger"]):
        sel = torch.zeros(50, dtype=torch.bool)
        sel[list(token_ids[e])] = True
        assert torch.equal(out[i, ~sel], logits[i, ~sel])
        assert torch.equal(out[i, sel], logits[i, sel] + 2.5)
        torch.testing.assert_close(out[i, sel] - logits[i, sel], torch.full((int(sel.sum()),), 2.5))
    single = C.VocabularyBias(token_ids, "happiness", strength=-1.0)(0, [[1], [2]], logits[:2])
    assert torch.equal((single != logits[:2]).nonzero()[:, 1], torch.tensor([49, 49]))
    with pytest.raises(KeyError, match="fear"):
        C.VocabularyBias(token_ids, "fear")
    with pytest.raises(ValueError, match="batch of 2"):
        proc(0, [[1], [1]], logits[:2])


def test_vocabulary_bias_per_prompt_targets_survive_generate_reordering(tiny_llama):
    prompts = ["Tell me a long story about the old harbour town and its people", "Hi",
               "What happened at the market today?", "Why?", "Hi"]
    targets = ["anger", "happiness", "fear", "sadness", "disgust"]
    proc = C.VocabularyBias.for_prompts(tiny_llama, prompts, targets, strength=1e4)
    gen = generate(tiny_llama, prompts, GenerationConfig(max_new_tokens=4, batch_size=3),
                   progress=False, logits_processors=[proc])
    for toks, e in zip(gen.tokens, targets, strict=False):
        assert len(toks) == 4 and set(toks) <= set(proc.token_ids[e]), (e, toks)
    again = generate(tiny_llama, prompts, GenerationConfig(max_new_tokens=4, batch_size=8),
                     progress=False, logits_processors=[proc])   # reused, one batch
    assert again.tokens == gen.tokens


# ------------------------------------------------------------------ decaying schedule


def test_decaying_schedule_follows_formula():
    ids = {7, 9}
    sch = C.DecayingSchedule(6.0, decay_per_step=0.1, decay_per_emotion_word=0.5, floor=0.5, token_ids=ids)
    assert sch(0) == 6.0
    rows = [[1, 2], [1, 2, 3]]
    sch.observer(0, rows, torch.zeros(2, 10))
    new = [[7, 4], [9, 7], [3, 3], [9, 9], [7, 7]]
    for k, (a, b) in enumerate(new, start=1):
        rows[0].append(a)
        rows[1].append(b)
        m0 = sum(t in ids for t in rows[0][2:])
        m1 = sum(t in ids for t in rows[1][3:])
        exp = [max(0.5, 6.0 * math.exp(-0.1 * k) * 0.5 ** m) for m in (m0, m1)]
        np.testing.assert_allclose(sch.per_row(k), exp, rtol=1e-12)
        assert sch(k) == pytest.approx(np.mean(exp), rel=1e-12)
    assert sch.value(50, 10) == 0.5                     # floor
    assert sch(0) == 6.0 and sch.counts(0).tolist() == [0.0]  # reset for the next batch
    with pytest.raises(ValueError, match="γ"):
        C.DecayingSchedule(1.0, decay_per_emotion_word=1.5)


def test_decaying_schedule_counts_live_tokens_in_generate(tiny_llama):
    prompts = ["The weather today", "My friend said that", "Once upon a time"]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=8)
    plain = generate(tiny_llama, prompts, cfg, progress=False)
    ids = {t for toks in plain.tokens for t in toks[1:4]}
    sch = C.DecayingSchedule(0.0, token_ids=ids)         # α ≡ 0: outputs unchanged
    from emocircuits.steering import steer
    v = torch.randn(tiny_llama.cfg.d_model)
    with steer(tiny_llama, v, layers=[1], strength=sch, scale="rms"):
        gen = generate(tiny_llama, prompts, cfg, progress=False, logits_processors=[sch.observer])
    assert gen.tokens == plain.tokens
    ks = [k for k, _, _ in sch.history]
    assert ks == list(range(len(ks))) and len(ks) == 6
    for k, _, m in sch.history:
        brute = np.mean([sum(t in ids for t in toks[:k]) for toks in plain.tokens])
        assert m == pytest.approx(brute), (k, m, brute)


# ------------------------------------------------------------------ continuous control


def _va_dirs(model, layers=(0, 1, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(2, len(layers), model.cfg.d_model, generator=g)
    return C.VADirections(v / v.norm(dim=-1, keepdim=True), list(layers), "test")


def test_va_steer_matches_manual_hook(tiny):
    model = tiny
    va = _va_dirs(model)
    toks = model.to_tokens(["The cat sat on the mat"], prepend_bos=True)
    base = model(toks)
    target, alpha, layers = (0.5, -1.0), 3.0, [0, 2]

    def manual(layer):
        i = va.layers.index(layer)
        vec = target[0] * va.vectors[0, i] + target[1] * va.vectors[1, i]

        def hook(x, hook):
            x = x.clone()
            h = x[:, -1].double()
            rms = torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-12)
            x[:, -1] = (h + alpha * rms * vec.double()).to(x.dtype)
            return x
        return hook

    with model.hooks(fwd_hooks=[(hook_name(model, "resid_post", lyr), manual(lyr)) for lyr in layers]):
        ref = model(toks)
    with C.va_steer(model, va, target, alpha, layers):
        out = model(toks)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out - base).abs().max() > 1e-3
    with C.va_steer(model, va, (0.0, 0.0), alpha, layers):
        torch.testing.assert_close(model(toks), base)
    with pytest.raises(ValueError, match="outside"):
        with C.va_steer(model, va, (2.0, 0.0)):
            pass
    with pytest.raises(IndexError, match="no layer 7"):
        with C.va_steer(model, va, (1.0, 0.0), layers=[7]):
            pass


def test_controllability_shapes_and_scores(tiny_llama):
    va = _va_dirs(tiny_llama)
    prompts = ["Hello there", "How was your day?"]

    def judge_va(texts):  # deterministic stand-in: length-based VA
        return np.array([[len(t) % 3 - 1.0, len(t) % 2] for t in texts], dtype=float)

    grid = [(-1.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    res = C.controllability(tiny_llama, prompts, va, grid, strength=4.0, judge_va=judge_va,
                            readout_prompts=[p + " I feel" for p in prompts], progress=False,
                            max_new_tokens=3)
    assert res.text_va.shape == (3, 2, 2) and res.readout_va.shape == (3, 2, 2)
    assert len(res.texts) == 3 and all(len(t) == 2 for t in res.texts)
    d = res.to_dict()
    assert set(d["text_scores"]) == {"valence", "arousal"} and "readout_scores" in d
    # the readout VA is a convex combination of the published coordinates
    coords = np.array([VA_COORDINATES[e] for e in EMO7])
    assert (res.readout_va[..., 0] >= coords[:, 0].min() - 1e-9).all()
    assert (res.readout_va[..., 0] <= coords[:, 0].max() + 1e-9).all()
    # (0, 0)-free grid: different targets steer differently
    assert not np.allclose(res.readout_va[0], res.readout_va[1])


# ------------------------------------------------------------------ integration (SmolLM2)


@pytest.mark.integration
def test_vocabulary_bias_and_readout_va_on_smol(smol):
    from emocircuits.data import load_sev
    from emocircuits.prompts import neutral_prompts

    recs = load_sev("builtin:test")[:4]
    pos = neutral_prompts(smol, recs, valences=("positive",), assistant_prefix="I feel")
    neg = neutral_prompts(smol, recs, valences=("negative",), assistant_prefix="I feel")
    va_pos, va_neg = C.readout_va(smol, pos), C.readout_va(smol, neg)
    assert va_pos[:, 0].mean() > va_neg[:, 0].mean()        # positive events read as more pleasant
    prompts = neutral_prompts(smol, recs[:2], valences=("neutral",))
    cfg = GenerationConfig(max_new_tokens=12)
    plain = generate(smol, prompts, cfg, progress=False)
    proc = C.VocabularyBias(C.emotion_word_token_ids(smol), "happiness", strength=8.0)
    biased = generate(smol, prompts, cfg, progress=False, logits_processors=[proc])
    rate = np.mean(C.emotion_word_rate(biased.texts, "happiness"))
    assert rate > np.mean(C.emotion_word_rate(plain.texts, "happiness")) and rate > 0


def test_correlations_match_a_float64_reference_with_ties_and_constants():
    """pearson/spearman (scipy) against numpy: corrcoef and tie-averaged ranks by hand."""
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, 40).astype(float), rng.normal(size=40)  # many ties in x

    def ranks(v):
        return np.array([np.mean(np.nonzero(np.sort(v) == a)[0]) for a in v])

    assert C.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert C.spearman(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], abs=1e-12)
    assert np.isnan(C.pearson([1, 1, 1], [1, 2, 3])) and np.isnan(C.spearman([1, 2, 3], [5, 5, 5]))
