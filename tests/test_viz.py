"""Figures (non-blank PNGs from synthetic data), offline circuitsvis views, the HTML report."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from emocircuits.viz import circuitsvis_views as V
from emocircuits.viz import figures as F
from emocircuits.viz.report import build_report, flatten

EMOS = ["anger", "sadness", "happiness", "fear"]


def _nonblank(p):
    assert p.exists() and p.stat().st_size > 2000
    assert not F.png_is_blank(p)
    with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_cosine_matches_float64_loop(rng):
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(3, 7))
    ref = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
    np.testing.assert_allclose(F.cosine(a, b), ref, atol=1e-12)
    np.testing.assert_allclose(F.cosine(torch.tensor(a)), F.cosine(a, a), atol=1e-6)


def test_pca_2d_matches_sklearn(rng):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    ours = F.pca_2d(x)
    ref = PCA(2).fit_transform(StandardScaler().fit_transform(x))
    for j in range(2):  # equal up to the sign of each component
        assert min(np.abs(ours[:, j] - ref[:, j]).max(), np.abs(ours[:, j] + ref[:, j]).max()) < 1e-8


def test_every_figure_is_a_nonblank_png(tmp_path, rng):
    v = {s: torch.randn(len(EMOS), 5, 16) for s in ("resid_mid", "resid_post")}
    outs = [
        F.cosine_heatmap(rng.uniform(-1, 1, (6, 6)), tmp_path / "h.png", xlabels=list("abcdef"),
                         ylabels=list("abcdef"), title="t"),
        F.direction_similarity(v, EMOS, tmp_path / "ds.png"),
        F.direction_similarity(v, EMOS, tmp_path / "ds1.png", emotion="fear"),
        F.emotion_similarity(v["resid_post"][:, 2], EMOS, tmp_path / "es.png"),
        F.sublayer_influence({e: {"attn": rng.normal(size=5), "mlp": rng.normal(size=5)}
                              for e in EMOS}, tmp_path / "si.png"),
        F.probe_accuracy({"probe": rng.uniform(size=5), "zero-shot": rng.uniform(size=5)},
                         tmp_path / "pa.png", chance=0.25, baselines={"bag of words": 0.5}),
        F.sweep_curves([0, 2, 4, 8], {"judge": [0.1, 0.3, 0.5, 0.6]}, tmp_path / "sw.png",
                       perplexity={"ppl": [5, 6, 9, 30]}, xlabel="α"),
        F.method_comparison({"prompting": 0.9, "steering": 0.6, "circuit": 0.8}, tmp_path / "mc.png",
                            controls={"random circuit": 0.2},
                            per_emotion={"circuit": dict(zip(EMOS, [0.8, 0.7, 0.9, 0.6], strict=True))}),
        F.pca_clusters({3: rng.normal(size=(24, 10)), 4: rng.normal(size=(24, 10))},
                       [EMOS[i % 4] for i in range(24)], tmp_path / "pca.png"),
        F.circuit_graph({"anger": {"heads": [(0, 1), (3, 2)], "neurons": [(1, 5), (1, 7), (4, 0)]},
                         "fear": {"heads": [(3, 2)], "neurons": [(2, 9)]}}, 5, tmp_path / "cg.png",
                        n_heads=4),
    ]
    for p in outs:
        _nonblank(p)
    assert not list(tmp_path.glob("*.tmp"))


def test_blank_detector_detects_blank(tmp_path):
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    assert F.png_is_blank(tmp_path / "blank.png")


def test_figure_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="layer out of range"):
        F.circuit_graph({"anger": {"heads": [(9, 0)]}}, 5, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        F.cosine_heatmap(np.zeros(3), tmp_path / "x.png")
    with pytest.raises(ValueError, match=".png"):
        F.cosine_heatmap(np.zeros((2, 2)), tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="3 values"):
        F.sweep_curves([1, 2], {"a": [1, 2, 3]}, tmp_path / "x.png")


# ----------------------------------------------------------------------------- views

PROMPT = "The meeting was moved again and nobody told me."


def _external_refs(html: str) -> list[str]:
    return re.findall(r"""<(?:script|link|img|iframe)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?//""",
                      html, flags=re.I)


def test_attention_patterns_equal_manual_softmax(tiny_llama):
    """The pattern hook equals softmax(QKᵀ/√d + causal mask) from the model's own q and k."""
    from emocircuits.prompts import tokenize

    model = tiny_llama
    toks, pats = V.attention_patterns(model, PROMPT, [(1, 0), (1, 3), (0, 2)])
    n = len(toks)
    assert pats.shape == (3, n, n)
    np.testing.assert_allclose(pats.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(pats, 1), 0)  # causal
    store = {}
    b = tokenize(model, [PROMPT])

    def grab(name):
        def h(x, hook):  # noqa: ARG001
            store[name] = x.detach()
            return x
        return h

    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_rot_q", grab("q")),
                                ("blocks.1.attn.hook_rot_k", grab("k"))]):
        model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=2)
    q, k = store["q"][0].double(), store["k"][0].double()  # [pos, head, d] (kv heads expanded?)
    if q.shape[1] != model.cfg.n_heads:  # [head, pos, d] layout
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    for j, h in enumerate([0, 3]):
        s = q[:, h] @ k[:, h].T / np.sqrt(q.shape[-1])
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        np.testing.assert_allclose(pats[j], torch.softmax(s, -1).numpy(), atol=1e-4)


def test_neuron_activations_equal_collect(tiny_llama):
    from emocircuits.activations import collect

    toks, acts = V.neuron_activations(tiny_llama, PROMPT, [(2, 5), (0, 3), (2, 7)])
    ref = collect(tiny_llama, [PROMPT], ["mlp_post"], position="all", progress=False)
    n = len(toks)
    g = ref["mlp_post"][0]  # [layer, pos, d_mlp]
    np.testing.assert_allclose(acts[:, 0], g[2, :n, 5].numpy(), atol=1e-5)
    np.testing.assert_allclose(acts[:, 1], g[0, :n, 3].numpy(), atol=1e-5)
    np.testing.assert_allclose(acts[:, 2], g[2, :n, 7].numpy(), atol=1e-5)


def test_views_bad_input(tiny_llama):
    with pytest.raises(IndexError, match="head index 99"):
        V.attention_view(tiny_llama, PROMPT, [(0, 99)])
    with pytest.raises(IndexError, match="out of range"):
        V.neuron_view(tiny_llama, PROMPT, [(7, 0)])
    with pytest.raises(ValueError, match="no heads"):
        V.attention_view(tiny_llama, PROMPT, [])


def test_views_html_is_offline(tiny_llama, tmp_path):
    views = [V.attention_view(tiny_llama, PROMPT, [(0, 1), (2, 3)]),
             V.neuron_view(tiny_llama, PROMPT, [(1, 4)])]
    page = V.standalone_html(views)
    assert _external_refs(page) == []
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page
    if V.bundle_path() is not None:
        assert page.count("var CircuitsVis=") == 1  # the bundle, inlined once
        assert "CircuitsVis.render(" in page and "AttentionHeads" in page
    out = V.write_html(views, tmp_path / "v.html")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and _external_refs(text) == []


def test_static_fallback_when_no_bundle(tiny_llama, monkeypatch):
    monkeypatch.setattr(V, "bundle_path", lambda: None)
    v = V.attention_view(tiny_llama, PROMPT, [(0, 1)])
    assert not v.needs_bundle and "<table" in v.html
    n = V.neuron_view(tiny_llama, PROMPT, [(0, 1)])
    assert not n.needs_bundle and "<span" in n.html
    assert "<script" not in V.standalone_html([v, n])


# ----------------------------------------------------------------------------- report


def _fake_run(tmp_path):
    fig = F.sweep_curves([0, 1], {"a": [0.2, 0.4]}, tmp_path / "stages" / "s-1" / "figures" / "a.png")
    doc = {"meta": {"model": "fake", "config": {"run": {"model": "fake"}}},
           "stages": {"steering": {
               "title": "Steering (stage 03)", "status": "done", "seconds": 1.5, "cached": False,
               "results": {"test_accuracy": {"overall": 0.5, "by_emotion": {"anger": 1.0}}},
               "figures": [{"title": "sweep", "path": "stages/s-1/figures/a.png"}],
               "tables": [{"title": "acc", "columns": ["m", "x"], "rows": [["steer", 0.5]]}],
               "views": []}}}
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return fig


def test_report_embeds_figures_and_is_offline(tmp_path):
    _fake_run(tmp_path)
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 1
    assert "Steering (stage 03)" in page and "test_accuracy.by_emotion.anger" in page
    assert _external_refs(page) == []
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)


def test_flatten():
    rows = dict(flatten({"a": {"b": [1, 2], "c": 3.5}, "d": list(range(40))}))
    assert rows == {"a.b[0]": 1, "a.b[1]": 2, "a.c": 3.5, "d": "[40 values]"}


def test_report_tables_are_escaped_dataframes():
    from emocircuits.viz.report import table_html

    t = table_html(["a<b", "n"], [["x&y", 0.123456], [None, True], ["short"]], "T & U")
    assert t.startswith("<h3>T &amp; U</h3>") and '<table class="dataframe data">' in t
    assert "<th>a&lt;b</th>" in t and "<td>x&amp;y</td>" in t and "<td>0.1235</td>" in t
    assert "<td>–</td>" in t and "<td>yes</td>" in t and "x&y" not in t
    body = t[t.index("<tbody>"):]
    assert body.count("<tr>") == 3 and body.count("<td") == 6  # the short row padded
