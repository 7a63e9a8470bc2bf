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
