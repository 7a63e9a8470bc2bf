"""Measure the foundation: load times, RSS, HF-vs-bridge logit diffs, forward and generation
speed with and without a hook, and the readout AUC on the paper's SEV data (when
``shared/data/sev_reference/sev.jsonl`` is next to the checkout).

    flock /tmp/ec_heavy.lock .venv/bin/python benchmarks/bench_foundation.py --out benchmarks/out/foundation.json

Real models only (SmolLM2-135M-Instruct, Gemma-3-270M); ``--skip-cold`` skips the cold load
into a fresh cache. Prints the measurements as one JSON document and writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import emocircuits as ec
from emocircuits import sites
from emocircuits.judges.readout import auc, emotion_readout
from emocircuits.prompts import tokenize

REF = Path(__file__).resolve().parents[2] / "shared/data/sev_reference/sev.jsonl"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def max_logit_diff(model, texts) -> float:
    b = tokenize(model, texts)
    with torch.no_grad():
        ref = model.original_model(b.tokens, attention_mask=b.attention_mask).logits
        got = model(b.tokens, attention_mask=b.attention_mask)
    m = b.attention_mask.bool()
    return float((ref[m] - got[m]).abs().max())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "foundation.json"))
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--auc-scenarios", type=int, default=160)
    args = ap.parse_args(argv)
    res: dict = {"threads": torch.get_num_threads()}
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as d:
            os.environ["EMOCIRCUITS_CACHE"] = d
            t = time.perf_counter()
            ec.load_model("smollm2-135m-instruct")
            res["smollm2_cold_load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            ec.load_model("smollm2-135m-instruct")
            res["smollm2_warm_load_s_fresh_cache"] = time.perf_counter() - t
        del os.environ["EMOCIRCUITS_CACHE"]
    t = time.perf_counter()
    model = ec.load_model("smollm2-135m-instruct")
    res["smollm2_warm_load_s"] = time.perf_counter() - t
    test = ec.data.load_sev("builtin:test")
    prompts = ec.data.emotion_prompts(model, test[:1], ["anger", "happiness"])
    res["smollm2_max_abs_logit_diff_hf_vs_bridge"] = max_logit_diff(model, [p.text for p in prompts])
    # forward: batch 16 x ~70 tokens
    ps = ec.data.emotion_prompts(model, test[:3], ec.EKMAN6)[:16]
    b = tokenize(model, ps)
    res["forward_batch"] = list(b.tokens.shape)
    with torch.no_grad():
        model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1)
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1)
            ts.append(time.perf_counter() - t)
    res["forward_batch16_s"] = float(np.median(ts))
    # generation ms/token with and without a hook (a steering-like add at resid_post, 10 layers)
    gp = ps[:8]
    cfg = ec.GenerationConfig(max_new_tokens=24, min_new_tokens=24, batch_size=8)
    out = ec.generate(model, gp, cfg, progress=False)
    res["gen_no_hook_ms_per_token"] = 1000 * out.seconds / out.n_tokens
    v = torch.randn(model.cfg.d_model)
    v = v / v.norm()

    def add(x, hook):
        return x + 0.5 * v

    hooks = [(sites.hook_name(model, "resid_post", layer), add) for layer in range(10, 20)]
    with model.hooks(fwd_hooks=hooks):
        out2 = ec.generate(model, gp, cfg, progress=False)
    res["gen_with_hook_ms_per_token"] = 1000 * out2.seconds / out2.n_tokens
    res["gen_tokens_per_run"] = out.n_tokens
    # readout AUC on the paper's SEV (positive vs negative events, neutral prompt, "I feel")
    if REF.exists():
        recs = ec.data.load_sev(str(REF))[: args.auc_scenarios]
        np_ = ec.data.neutral_prompts(model, recs, valences=("positive", "negative"),
                                      assistant_prefix="I feel")
        t = time.perf_counter()
        r = emotion_readout(model, np_, batch_size=32)
        res["readout_seconds"] = time.perf_counter() - t
        vs = r.valence_score()
        val = np.array([p.valence for p in np_])
        res["readout_auc_pos_vs_neg_events_sev_reference"] = auc(vs[val == "positive"],
                                                                 vs[val == "negative"])
        res["readout_auc_n_prompts"] = len(np_)
    res["smollm2_peak_rss_mb"] = rss_mb()
    # Gemma-3-270M
    try:
        t = time.perf_counter()
        g = ec.load_model("gemma-3-270m")
        res["gemma_load_s"] = time.perf_counter() - t
        res["gemma_max_abs_logit_diff_hf_vs_bridge"] = max_logit_diff(
            g, ["The bus left without me this morning, and I felt", "My sister called. I felt"])
    except Exception as e:  # noqa: BLE001
        res["gemma_error"] = repr(e)
    res["peak_rss_mb"] = rss_mb()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
