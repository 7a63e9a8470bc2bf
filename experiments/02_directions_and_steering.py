"""Emotion directions (4 methods + reply-token directions), validity checks, keyword control,
a steering sweep on validation and steering evaluated on test.

    flock /tmp/ec_heavy.lock .venv/bin/python experiments/02_directions_and_steering.py \\
        --model smollm2-135m-instruct --out runs/directions

Sizes (defaults): directions from 16 train scenarios x 3 valences x 6 emotions (288 prompts);
sweep on 3 validation scenarios x 3 valences; test on 8 scenarios x 3 valences x 6 emotions,
max_new_tokens 30. A partial JSON is written after each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

import emocircuits as ec
from emocircuits import directions as D
from emocircuits import sites as S
from emocircuits.emotions import EKMAN6
from emocircuits.evaluate import accuracy_table, evaluate_texts, fluency
from emocircuits.generation import GenerationConfig, generate
from emocircuits.judges.offline import default_judge
from emocircuits.judges.readout import emotion_readout
from emocircuits.models import model_id
from emocircuits.prompts import emotion_prompts, neutral_prompts, tokenize
from emocircuits.steering import _with_prefix, paper_layers, steer, steering_sweep


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the starting point, sampled every 5 ms in a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.mib = (self.peak - self.base) / 2**20


def spread(ds, n):
    """n records spread over the dataset (so every theme is represented)."""
    step = max(1, len(ds) // n)
    return list(ds[::step])[:n]


def write(out: Path, obj) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, out)


@torch.no_grad()
def bench_collect(model, prompts, batch_size=16):
    """collect(last, resid_post all layers) vs run_with_cache of the full forward + slicing."""
    layers = list(range(model.cfg.n_layers))
    with PeakRSS() as a:
        acts = ec.collect(model, prompts, ["resid_post"], batch_size=batch_size, progress=False)
    names = [S.hook_name(model, "resid_post", layer) for layer in layers]
    outs = []
    with PeakRSS() as b:
        for s in range(0, len(prompts), batch_size):
            tb = tokenize(model, prompts[s:s + batch_size])
            _, cache = model.run_with_cache(tb.tokens, attention_mask=tb.attention_mask)
            outs.append(torch.stack([cache[n][:, -1] for n in names], 1).float().cpu())
            del cache
    ref = torch.cat(outs)
    return {"n_prompts": len(prompts), "batch_size": batch_size,
            "collect_s": a.seconds, "collect_peak_rss_mib": a.mib,
            "run_with_cache_s": b.seconds, "run_with_cache_peak_rss_mib": b.mib,
            "max_abs_diff": float((acts["resid_post"] - ref).abs().max())}


def method_agreement(ref: D.EmotionDirections, other: D.EmotionDirections, site="resid_post"):
    """Per layer, mean over emotions of cos(ref_e, other_e)."""
    a, b = ref.vectors[site], other.vectors[site]
    lay = [ref.layers.index(layer) for layer in other.layers]
    c = torch.nn.functional.cosine_similarity(a[:, lay].double(), b.double(), dim=-1)
    return c.mean(0).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/directions")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-reply", type=int, default=8, help="train scenarios for reply directions")
    ap.add_argument("--n-val", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--alphas", default="4,8,12")
    ap.add_argument("--bench", type=int, default=48, help="prompts for the collect benchmark")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out_dir = Path(args.out)
    out_json = out_dir / f"directions_{args.model.replace('/', '_')}.json"
    t_all = time.perf_counter()
    model = ec.load_model(args.model)
    chat = bool(getattr(model.tokenizer, "chat_template", None))
    emos = list(EKMAN6)
    res: dict = {"model": model_id(model), "n_layers": model.cfg.n_layers, "chat": chat,
                 "sizes": vars(args), "timing": {}}

    def stage(name, t0):
        res["timing"][name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {res['timing'][name]} s", flush=True)
        write(out_json, res)

    # 1. activations + directions ---------------------------------------------------------
    t0 = time.perf_counter()
    train = spread(ec.data.load_sev("builtin:train"), args.n_train)
    ep = emotion_prompts(model, train, emos, chat=chat)
    acts = ec.collect(model, ep, ["resid_mid", "resid_post"], batch_size=16)
    npr = neutral_prompts(model, train, chat=chat)
    nacts = ec.collect(model, npr, ["resid_mid", "resid_post"], batch_size=16)
    stage("collect", t0)
    t0 = time.perf_counter()
    ca = D.context_agnostic(acts, ep, emos)
    md = D.mean_difference(acts, ep, emos, nacts)
    pc = D.pca_directions(acts, ep, emos)
    pr = D.probe_directions(acts, ep, emos, sites="resid_post")
    for name, d in [("context_agnostic", ca), ("mean_difference", md), ("pca", pc), ("probe", pr)]:
        d.save(out_dir / f"{name}_{args.model.replace('/', '_')}.safetensors")
    mid = model.cfg.n_layers // 2
    res["directions"] = {
        "meta": {k: v for k, v in ca.meta.items() if k != "dropped"},
        "agreement_with_context_agnostic_resid_post": {
            "mean_difference": method_agreement(ca, md), "pca": method_agreement(ca, pc),
            "probe": method_agreement(ca, pr)},
        "cross_emotion_offdiag_mean_per_layer": [
            D.cosine_across_emotions(ca, "resid_post", layer).off_diagonal_mean() for layer in ca.layers],
        "cross_emotion_cosine_mid_layer": {"layer": mid, **D.cosine_across_emotions(ca, "resid_post", mid).to_dict()},
        "across_layers_anger": D.cosine_across_layers(ca, "anger").to_dict(),
    }
    summ = {}
    for e in emos:
        cm = D.cosine_across_layers(ca, e)
        adj = np.diag(cm.matrix, 1)
        summ[e] = {"offdiag_mean": cm.off_diagonal_mean(), "attn_to_mlp_same_layer": float(adj[::2].mean()),
                   "mlp_to_next_attn": float(adj[1::2].mean())}
    res["directions"]["across_layers_summary"] = summ
    stage("directions", t0)

    # 2. validity: decodability, keyword control --------------------------
    t0 = time.perf_counter()
    kc = D.keyword_control(model, train, emos, site="resid_post", n_folds=4, chat=chat, emotion_acts=acts)
    res["keyword_control"] = kc.to_dict()
    print(kc.format(), flush=True)
    res["decodability_resid_mid"] = D.nearest_centroid_accuracy(acts, ep, emos, "resid_mid", 4).to_dict()
    stage("keyword_control", t0)
    # 3. collect benchmark ----------------------------------------------------------------
    t0 = time.perf_counter()
    res["collect_benchmark"] = bench_collect(model, ep[: args.bench])
    print(res["collect_benchmark"], flush=True)
    stage("benchmark", t0)

    # 4. sweep on validation ----------------------------------------------------------------
    t0 = time.perf_counter()
    judge = default_judge(emos)
    val = spread(ec.data.load_sev("builtin:validation"), args.n_val)
    vp = neutral_prompts(model, val, chat=chat)
    pl = paper_layers(model)
    n = model.cfg.n_layers
    bands = [pl, list(range(n // 5, n // 5 + len(pl)))]
    alphas = [float(a) for a in args.alphas.split(",")]
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=min(5, args.max_new_tokens), repetition_penalty=1.05,
                            no_repeat_ngram_size=3)
    sw = steering_sweep(model, vp, ca, emos, bands, alphas, judge, gcfg)
    res["sweep"] = {"bands": bands, "alphas": alphas, "summary": sw.summary(),
                    "rows": [{k: v for k, v in r.items()} for r in sw.rows]}
    base_ppl = next(s["perplexity"] for s in sw.summary() if s["alpha"] == 0)
    try:
        best = sw.best("judge_accuracy", max_perplexity=3 * base_ppl, max_repeat=0.25)
    except ValueError:
        best = {"layers": f"{pl[0]}-{pl[-1]}", "alpha": 8.0, "note": "nothing passed the guard"}
    res["sweep"]["chosen"] = best
    res["sweep"]["guard"] = {"max_perplexity": 3 * base_ppl, "max_repeat": 0.25}
    print(sw.to_dataframe().drop(columns=["examples"], errors="ignore").to_string(), flush=True)
    stage("sweep", t0)

    # 5. test --------------------------------------------------------------------------------
    t0 = time.perf_counter()
    test = spread(ec.data.load_sev("builtin:test"), args.n_test)
    tp = neutral_prompts(model, test, chat=chat)
    if "-" in best["layers"]:
        lo, hi = (int(x) for x in best["layers"].split("-"))
        chosen_layers = list(range(lo, hi + 1))
    else:
        chosen_layers = [int(x) for x in best["layers"].split(",")]
    ro_texts = [_with_prefix(p.text, "I feel") for p in tp]
    settings = {"chosen": (chosen_layers, float(best["alpha"])), "paper_band_alpha8": (pl, 8.0)}
    res["test"] = {"n_prompts": len(tp), "settings": {k: {"layers": v[0], "alpha": v[1]} for k, v in settings.items()}}
    base = generate(model, tp, gcfg, progress=False)
    base_ro = emotion_readout(model, ro_texts, emos)
    rows_base = []
    for e in emos:
        ev = evaluate_texts("unsteered", tp, base.texts, [e] * len(tp), judge)
        rows_base += ev.rows
    res["test"]["unsteered"] = {"accuracy": accuracy_table(rows_base).to_dict(),
                                "fluency": fluency(model, tp, base.texts, generated_tokens=base.tokens).summary(),
                                "readout_share": {e: float(base_ro.share[:, k].mean()) for k, e in enumerate(emos)}}
    for sname, (layers, alpha) in settings.items():
        if sname == "paper_band_alpha8" and layers == chosen_layers and alpha == float(best["alpha"]):
            res["test"][sname] = "same as chosen"
            continue
        rows, texts_all, toks_all, prompts_all, ro_share, ro_top1 = [], [], [], [], {}, {}
        for e in emos:
            with steer(model, ca, layers, alpha, emotion=e):
                ro = emotion_readout(model, ro_texts, emos)
                g = generate(model, tp, gcfg, progress=False)
            k = emos.index(e)
            ro_share[e] = float(ro.share[:, k].mean())
            ro_top1[e] = float(np.mean([lab == e for lab in ro.labels]))
            ev = evaluate_texts(sname, tp, g.texts, [e] * len(tp), judge)
            rows += ev.rows
            texts_all += g.texts
            toks_all += g.tokens
            prompts_all += list(tp)
        flu = fluency(model, prompts_all, texts_all, generated_tokens=toks_all).summary()
        acc = accuracy_table(rows)
        print(acc.format(sname), flush=True)
        res["test"][sname] = {"accuracy": acc.to_dict(), "fluency": flu, "readout_share": ro_share,
                              "readout_top1": ro_top1,
                              "examples": [{"key": r["key"], "target": r["emotion"], "label": r["label"],
                                            "text": r["text"]} for r in rows[:: max(1, len(rows) // 12)]]}
    stage("test", t0)
    # 6. directions from the generated replies (last: the slowest per prompt)
    t0 = time.perf_counter()
    rd = D.reply_directions(model, train[: args.n_reply], emos, sites=("resid_post",), chat=chat,
                            config=GenerationConfig(max_new_tokens=24))
    rd.save(out_dir / f"reply_{args.model.replace('/', '_')}.safetensors")
    res["reply_directions"] = {"meta": {k: v for k, v in rd.meta.items() if k != "dropped"},
                               "cos_with_context_agnostic_per_layer": method_agreement(ca, rd)}
    stage("reply_directions", t0)

    res["timing"]["total"] = round(time.perf_counter() - t_all, 1)
    write(out_json, res)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
