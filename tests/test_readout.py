from __future__ import annotations

import numpy as np
import torch

from emocircuits.emotions import emotion_set
from emocircuits.judges.readout import auc, emotion_readout, emotion_tokens, last_token_logits


def test_readout_equals_brute_force(tiny_llama):
    prompts = ["I feel", "Today at work I feel", "The news made me feel"]
    r = emotion_readout(tiny_llama, prompts)
    tok = tiny_llama.tokenizer
    for i, p in enumerate(prompts):
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            probs = torch.softmax(tiny_llama.original_model(ids).logits[0, -1].double(), -1)
        for j, e in enumerate(r.emotions):
            want = float(sum(probs[t] for t in r.tokens.token_ids[e]))
            assert abs(r.mass[i, j] - want) < 1e-6


def test_shared_first_tokens_reported(tiny_llama):
    es = emotion_set(("anger", "fear"), words={"anger": ("angry", "mad"), "fear": ("mad", "afraid")})
    toks = emotion_tokens(tiny_llama, es)
    mad = tiny_llama.tokenizer(" mad", add_special_tokens=False)["input_ids"][0]
    assert mad in toks.shared and set(toks.shared[mad]) == {"anger", "fear"}
    assert mad not in toks.token_ids["anger"] and mad not in toks.token_ids["fear"]


def test_last_token_logits_batched_equals_single(tiny_llama):
    ps = ["a", "a much longer prompt here", "mid one"]
    allb = last_token_logits(tiny_llama, ps, batch_size=3)
    for i, p in enumerate(ps):
        assert (last_token_logits(tiny_llama, [p])[0] - allb[i]).abs().max() < 1e-4


def test_auc():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
