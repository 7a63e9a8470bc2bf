"""Probes: planted structure, group-safe CV, parser, persistence indexing, malleability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emocircuits import probes as P
from emocircuits.models import hf_model_of
from emocircuits.prompts import encode

CLASSES = ("anger", "sadness", "happiness", "fear", "surprise", "disgust", "neutral")


def _planted(n_per=30, n_layers=6, d=24, signal_layers=(2, 4), seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    k = len(CLASSES)
    y = np.repeat(np.arange(k), n_per)
    n = len(y)
    x = torch.randn(n, n_layers, d, generator=g)
    for layer in signal_layers:
        mu = 2.0 * torch.randn(k, d, generator=g)
        x[:, layer] += mu[torch.from_numpy(y)]
    x = x * scale + offset
    groups = [f"g{i % 10}" for i in range(n)]
    labels = [CLASSES[i] for i in y]
    return x, labels, groups


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_probe_layers_recovers_planted_layers(kind):
    x, labels, groups = _planted(scale=1e3, offset=5e4)  # Gemma-like huge offset/norm
    split = ["test" if i % 3 == 0 else "train" for i in range(len(labels))]
    kw = [i % 4 == 0 for i in range(len(labels))]
    r = P.probe_layers(x, labels, groups, kind=kind, cv=5, split=split, has_keyword=kw,
                       progress=False)
    for layer in range(6):
        if layer in (2, 4):
            assert r.accuracy_mean[layer] > 0.9, (layer, r.accuracy_mean)
            assert r.test_accuracy[layer] > 0.85
            assert r.f1_mean[layer] > 0.85
        else:
            assert r.accuracy_mean[layer] < r.chance_uniform + 0.15, (layer, r.accuracy_mean)
            assert r.test_accuracy[layer] < r.chance_uniform + 0.2
    assert r.peak_layer in (2, 4)
    assert r.peak_fraction == pytest.approx((r.peak_layer + 1) / 6)
    assert r.chance_uniform == pytest.approx(1 / 7)
    assert r.chance_majority == pytest.approx(1 / 7)
    # keyword split accuracies are the OOF accuracy restricted to each subset
    oof_ok = r.oof_pred == np.array([CLASSES.index(c) for c in labels])[None]
    kwa = np.array(kw)
    np.testing.assert_allclose(r.accuracy_keyword, oof_ok[:, kwa].mean(1))
    np.testing.assert_allclose(r.accuracy_no_keyword, oof_ok[:, ~kwa].mean(1))
    np.testing.assert_allclose(r.accuracy_mean.mean(), oof_ok.mean(), atol=0.02)
    df = r.to_dataframe()
    assert list(df["layer"]) == list(range(6)) and "test_accuracy" in df
    d = json.loads(json.dumps(r.to_dict()))
    assert d["peak_layer"] == r.peak_layer
    assert r.onset_layer(0.95) == 2 and d["onset_layer_95"] == 2  # the first planted layer


def test_onset_layer_on_a_plateau():
    r = P.ProbeSweep(layers=[-1, 0, 1, 2, 3], classes=tuple("abcd"), kind="logreg", pool="last",
                     n_layers=4, accuracy_mean=np.array([0.25, 0.5, 0.94, 0.95, 0.96]),
                     accuracy_std=np.zeros(5), f1_mean=np.zeros(5), f1_std=np.zeros(5),
                     chance_majority=0.25, chance_uniform=0.25, n=10, n_folds=2, cv_kind="group")
    # level = 0.25 + 0.95 * (0.96 - 0.25) = 0.9245: layer 1 is the first at or above it
    assert r.peak_layer == 3 and r.onset_layer(0.95) == 1 and r.onset_layer(1.0) == 3
    with pytest.raises(ValueError, match="fraction"):
        r.onset_layer(0)


def test_probe_layers_embed_layer_name_and_pool():
    x, labels, groups = _planted(n_layers=3, signal_layers=(0,))
    r = P.probe_layers(x, labels, groups, layers=[-1, 0, 1], n_layers=2, progress=False)
    assert r.peak_layer == -1 and r.peak_fraction == 0.0
    # 4-d input with lengths: "last" pooling takes position length-1
    n = x.shape[0]
    lengths = torch.randint(2, 6, (n,))
    x4 = torch.randn(n, 3, 6, x.shape[-1])
    x4[torch.arange(n), :, lengths - 1] = x
    r2 = P.probe_layers(x4, labels, groups, lengths=lengths, pool="last", progress=False)
    np.testing.assert_allclose(r2.accuracy_mean, P.probe_layers(x, labels, groups, progress=False).accuracy_mean)


def test_pool_acts_matches_loop():
    x = torch.randn(5, 2, 7, 3)
    lengths = torch.tensor([1, 3, 7, 4, 2])
    m = P.pool_acts(x, lengths, "mean")
    for i in range(5):
        lo = min(1, int(lengths[i]) - 1)
        torch.testing.assert_close(m[i], x[i, :, lo:int(lengths[i])].mean(1))
    last = P.pool_acts(x, lengths, "last")
    for i in range(5):
        torch.testing.assert_close(last[i], x[i, :, int(lengths[i]) - 1])
    with pytest.raises(ValueError, match="pool"):
        P.pool_acts(x, lengths, "max")


def test_cv_never_splits_a_group():
    rng = np.random.default_rng(0)
    n = 300
    labels = [CLASSES[i] for i in rng.integers(0, 7, n)]
    groups = [f"topic{i}" for i in rng.integers(0, 13, n)]
    folds = P.cv_splits(labels, groups, cv=5, seed=3)
    seen = np.zeros(n, dtype=int)
    g = np.array(groups)
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
        assert len(np.intersect1d(tr, te)) == 0
        seen[te] += 1
    assert (seen == 1).all()
    with pytest.raises(ValueError, match="groups"):
        P.cv_splits(labels, [f"t{i % 3}" for i in range(n)], cv=5)
    with pytest.raises(ValueError, match="labels"):
        P.probe_layers(torch.randn(10, 2, 3), ["anger"] * 9, progress=False)


def test_parse_label_crafted_replies():
    c = CLASSES
    assert P.parse_label('{"emotion": "fear"}', c) == "fear"
    assert P.parse_label('Sure! ```json\n{"emotion": "Sadness"}\n```', c) == "sadness"
    assert P.parse_label('{"label": "disgust"} but maybe anger', c) == "disgust"
    assert P.parse_label('{"emotion": "joy"}', c) == "happiness"
    assert P.parse_label("The speaker seems angry, not sad.", c) == "anger"
    assert P.parse_label(" surprise\nText: next", c) == "surprise"
    assert P.parse_label('{"emotion": "bored"} I think it is neutral', c) == "neutral"
    assert P.parse_label("I cannot tell.", c) is None
    assert P.parse_label("{not json", c) is None
    assert P.parse_label("feared", c) is None  # whole words only


def test_zero_shot_runs_and_is_consistent(tiny_llama):
    utts = ["My manager took credit for my work.", "We won the cup!", "The bus came."]
    labels = ["anger", "happiness", "neutral"]
    r = P.zero_shot(tiny_llama, utts, CLASSES, labels, max_new_tokens=4, progress=False)
    assert len(r.replies) == 3 and 0.0 <= r.coverage <= 1.0
    np.testing.assert_allclose(r.constrained_probs.sum(1), 1.0, rtol=1e-5)
    assert r.constrained_predictions == [CLASSES[j] for j in r.constrained_probs.argmax(1)]
    assert r.accuracy == pytest.approx(np.mean([p == t for p, t in zip(r.predictions, labels, strict=True)]))
    # the constrained prompt ends right before the label's first token
    prompt = P.zero_shot_prompt(tiny_llama, utts[0], CLASSES, constrained=True)
    assert prompt.endswith('{"emotion": "')
    base = P.zero_shot_prompt(tiny_llama, utts[0], CLASSES, chat=False)
    assert base.startswith("Text: ") and base.endswith("):")


def test_persistence_positions_match_direct_forward(tiny):
    opens = ["I just lost my keys again.", "We are going to the beach!", "What a smell.",
             "The train is on time."]
    labels = ["anger", "happiness", "disgust", "neutral"]
    layer = 1
    x, lab, _ = _planted(n_per=4, n_layers=1, d=tiny.cfg.d_model, signal_layers=())
    probe = P.fit_probe(x[:, 0], lab, layer=layer, classes=CLASSES)
    r = P.persistence(tiny, opens, labels, max_new_tokens=6, layer=layer, probe=probe,
                      buckets=(0, 3, 6), cv=2, progress=False)
    assert r.hidden.shape == (4, 7, tiny.cfg.d_model)
    assert list(r.k) == list(range(7)) and (r.n_valid == 4).all()
    hf = hf_model_of(tiny)
    for i, o in enumerate(opens):
        prompt, end = P.wrap_utterance(tiny, o)
        ids = r.tokens[i]
        assert ids[:r.prompt_lengths[i]] == encode(tiny, prompt)
        assert len(ids) == r.prompt_lengths[i] + 6
        with torch.no_grad():
            hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
        for k in range(7):
            torch.testing.assert_close(r.hidden[i, k], hs[r.prompt_lengths[i] - 1 + k], atol=1e-4, rtol=1e-4)
    # transfer accuracy equals a brute-force loop over k
    y = np.array([CLASSES.index(c) for c in labels])
    for k in range(7):
        pred = probe.predict_proba(r.hidden[:, k]).argmax(1)
        assert r.transfer_accuracy[k] == pytest.approx((pred == y).mean())
    assert r.bucket_k == [0, 3, 6] and len(r.bucket_accuracy_mean) == 3
    assert r.to_dataframe().shape[0] == 7
    json.dumps(r.to_dict())


def test_wrap_utterance_points_at_utterance_end(tiny_llama):
    text = "The dog ate my homework"
    full, end = P.wrap_utterance(tiny_llama, text, "You are calm.")
    ids = encode(tiny_llama, full)
    assert tiny_llama.tokenizer.decode(ids[: len(ids) + end + 1]).endswith("homework")
    assert not tiny_llama.tokenizer.decode(ids[: len(ids) + end]).endswith("homework")
    full_b, end_b = P.wrap_utterance(tiny_llama, text, "You are calm.", chat=False)
    assert full_b == "You are calm. " + text and end_b == -1


def test_malleability_shapes(tiny_gemma):
    d = tiny_gemma.cfg.d_model
    x, lab, _ = _planted(n_per=5, n_layers=1, d=d, signal_layers=(0,))
    probe = P.fit_probe(x[:, 0], lab, layer=0, classes=CLASSES)
    utts = ["I got the job!", "My cat died.", "Someone keyed my car.", "It is Tuesday.", "Ew, mold."]
    r = P.malleability(tiny_gemma, probe, utts, chat=False, progress=False)
    assert r.names == ["none", "emotional", "calm"]
    assert r.mean.shape == (3, 7) and r.predicted_share.shape == (3, 7)
    for n in r.names:
        assert r.probs[n].shape == (5, 7)
    np.testing.assert_allclose(r.mean.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(r.shift()[0], 0.0)
    assert not np.allclose(r.probs["none"], r.probs["calm"])  # the system prompt changes the state
    df = r.to_dataframe()
    assert df.shape == (3, 14)
    json.dumps(r.to_dict())
    # the "none" probabilities equal the probe on a direct forward of the bare utterance
    hf = hf_model_of(tiny_gemma)
    with torch.no_grad():
        xs = torch.stack([hf(torch.tensor([encode(tiny_gemma, u)]), output_hidden_states=True)
                          .hidden_states[1][0, -1] for u in utts])
    np.testing.assert_allclose(r.probs["none"], probe.predict_proba(xs), atol=1e-4)


def test_torch_logreg_matches_sklearn():
    """Same objective (Σ CE + ||W||²/2C, unpenalised bias) -> same probabilities."""
    x, labels, _ = _planted(n_per=12, n_layers=1, d=16, signal_layers=(0,), scale=50.0, offset=300.0)
    xs = x[:, 0].numpy()
    for C in (0.05, 1.0):
        a = P.fit_probe(xs, labels, layer=0, C=C, backend="torch")
        b = P.fit_probe(xs, labels, layer=0, C=C, backend="sklearn")
        xt = xs[::3] + np.random.default_rng(0).normal(size=xs[::3].shape)
        np.testing.assert_allclose(a.predict_proba(xt), b.predict_proba(xt), atol=2e-3)


def test_mlp_probe_fits_nonlinear_xor():
    """The MLP separates an XOR pattern the linear probe cannot."""
    rng = np.random.default_rng(0)
    s = rng.choice([-1.0, 1.0], size=(400, 2))
    x = np.concatenate([s * 2 + rng.normal(scale=0.3, size=s.shape), rng.normal(size=(400, 4))], 1)
    y = ["a" if a * b > 0 else "b" for a, b in s]
    tr, te = slice(0, 300), slice(300, None)
    mlp = P.fit_probe(x[tr], y[tr], layer=0, kind="mlp")
    lin = P.fit_probe(x[tr], y[tr], layer=0, kind="logreg")
    yt = np.array(y[te])
    assert (np.array(mlp.predict(x[te])) == yt).mean() > 0.95
    assert (np.array(lin.predict(x[te])) == yt).mean() < 0.7


def test_batched_sweep_matches_sklearn_per_fit():
    """The batched torch sweep (all folds x layers in one optimisation) agrees with
    per-fold sklearn ``LogisticRegression`` fits."""
    x, labels, groups = _planted(n_per=20, n_layers=3, d=12, signal_layers=(1,), scale=30.0, offset=100.0)
    x[:, 2] += 0.4 * x[:, 1]  # a weaker signal layer
    a = P.probe_layers(x, labels, groups, C=0.05, progress=False)
    b = P.probe_layers(x, labels, groups, C=0.05, backend="sklearn", progress=False)
    agree = (a.oof_pred == b.oof_pred).mean(1)
    assert (agree[1:] > 0.95).all(), agree
    np.testing.assert_allclose(a.accuracy_mean, b.accuracy_mean, atol=0.04)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 7, 200), rng.integers(0, 6, 200)
    ref = f1_score(y, p, labels=list(range(7)), average="macro", zero_division=0)
    assert P._macro_f1(y, p, 7) == pytest.approx(ref)


@pytest.mark.integration
def test_smol_mid_layer_probe_beats_chance_and_embedding(smol):
    """SmolLM2 (70 utterances, 10 per class): the mid-layer probe is well above chance and
    above the embedding-layer probe (which sees only the last token's identity)."""
    from emocircuits.data import load_utterances

    u = load_utterances()
    rows = []
    for c in u.classes:  # 10 per class, spread over topic groups
        seen: dict[str, int] = {}
        ranked = []
        for i, r in enumerate(x for x in u if x.label == c):
            ranked.append((seen.get(r.group, 0), i, r))
            seen[r.group] = seen.get(r.group, 0) + 1
        rows += [r for *_, r in sorted(ranked, key=lambda t: t[:2])[:10]]
    assert len({r.group for r in rows}) >= 5
    ids = [encode(smol, r.text) for r in rows]
    layers = [-1, smol.cfg.n_layers // 2]
    acts = P.hidden_at(smol, ids, [[-1]] * len(ids), layers)[:, :, 0]
    r = P.probe_layers(acts, [x.label for x in rows], [x.group for x in rows], layers=layers,
                       n_layers=smol.cfg.n_layers, progress=False)
    assert r.accuracy_mean[1] > r.chance_uniform + 0.2, r.accuracy_mean
    assert r.accuracy_mean[1] > r.accuracy_mean[0] + 0.1, r.accuracy_mean
