from __future__ import annotations

import math

import torch

from emocircuits.evaluate import accuracy_table, fluency, repeated_ngram_rate
from emocircuits.prompts import encode


def test_accuracy_table():
    rows = [{"emotion": "anger", "valence": "positive", "match": True},
            {"emotion": "anger", "valence": "negative", "match": False},
            {"emotion": "fear", "valence": "negative", "match": True}]
    t = accuracy_table(rows)
    assert math.isclose(t.overall, 2 / 3) and t.by_emotion == {"anger": 0.5, "fear": 1.0}
    assert t.by_valence == {"positive": 1.0, "negative": 0.5}
    assert t.by_emotion_valence["anger/negative"] == 0.0


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 1, 2, 3], 3) == 1 - 3 / 4
    assert repeated_ngram_rate([1, 2], 3) == 0.0


def test_fluency_perplexity_matches_loop(tiny_llama):
    prompts, texts = ["Hello there", "A longer prompt here"], [" my friend", " and more words"]
    f = fluency(tiny_llama, prompts, texts)
    for p, t, got in zip(prompts, texts, f.perplexity, strict=False):
        pid = encode(tiny_llama, p)
        gid = tiny_llama.tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pid + gid])
        with torch.no_grad():
            lp = torch.log_softmax(tiny_llama.original_model(ids).logits[0].double(), -1)
        nll = -sum(lp[len(pid) - 1 + k, g] for k, g in enumerate(gid)) / len(gid)
        assert abs(got - math.exp(float(nll))) / got < 1e-4


def test_fluency_dedupes_and_unembeds_only_the_continuation(tiny):
    """Mixed prompt and continuation lengths (one empty), duplicates scored once: every
    perplexity equals the batch-1 HF computation with full logits."""
    prompts = ["Hello there", "A much longer prompt goes right here", "Hello there", "Short", "Hi"]
    texts = [" my friend", " ok", " my friend", " a rather long continuation of words indeed", ""]
    calls = []
    handle = tiny.blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        f = fluency(tiny, prompts, texts, batch_size=2)
    finally:
        handle.remove()
    assert len(calls) == 2  # 4 distinct pairs in batches of 2
    assert f.perplexity[0] == f.perplexity[2] and math.isnan(f.perplexity[4])
    for p, t, got in list(zip(prompts, texts, f.perplexity, strict=True))[:4]:
        pid = encode(tiny, p)
        gid = tiny.tokenizer(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(tiny.original_model(torch.tensor([pid + gid])).logits[0].double(), -1)
        nll = -sum(lp[len(pid) - 1 + k, g] for k, g in enumerate(gid)) / len(gid)
        assert abs(got - math.exp(float(nll))) / got < 1e-4
