"""Emotion probes across layers, zero-shot baseline, persistence, malleability, SEV check.

    flock /tmp/ec_heavy.lock .venv/bin/python experiments/07_probes.py --model smollm2-135m-instruct
    flock /tmp/ec_heavy.lock .venv/bin/python experiments/07_probes.py --model gemma-3-270m

Stages (each writes the JSON again, so partial results survive):

1. one batched forward over all 490 utterances (raw text, BOS + utterance, no template)
   collecting the last-token state at the embedding (resid_pre 0, "layer -1") and
   resid_post of every layer; logreg and MLP sweeps with StratifiedGroupKFold by topic
   group, fixed-split test scores, keyword / no-keyword accuracy; optionally mean-pooled.
2. zero-shot prompting (free JSON reply + constrained first-token logits) on the test
   split, next to the probes' train -> test accuracy.
3. persistence: ``--per-class`` test-split openings per class, ``--tokens`` generated tokens;
   the train-split probe at the peak layer applied at every k, and per-position probes.
4. malleability: the train-split probe on test-split utterances under three system prompts.
5. SEV: on neutral prompts (+ "I feel") of builtin:test, the probe's P(happiness) −
   P(negative) vs the logit readout's valence score: AUC positive-vs-negative, correlation.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import emocircuits as ec
from emocircuits import probes as P
from emocircuits.emotions import valence_score
from emocircuits.judges.readout import auc, emotion_readout
from emocircuits.models import is_chat_model, model_id
from emocircuits.prompts import encode


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def per_class(u, m: int) -> list:
    """``m`` rows of each class (classes in ``u.classes`` order), spread over topic groups:
    the first row of every group, then the second, ..."""
    out = []
    for c in u.classes:
        rank: dict[str, int] = {}
        keyed = []
        for i, r in enumerate(x for x in u if x.label == c):
            keyed.append((rank.get(r.group, 0), i, r))
            rank[r.group] = rank.get(r.group, 0) + 1
        out += [r for _, _, r in sorted(keyed, key=lambda t: t[:2])[:m]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/probes")
    ap.add_argument("--kinds", default="logreg,mlp")
    ap.add_argument("--mean-pool", action="store_true", help="also the mean-pooled logreg sweep")
    ap.add_argument("--per-class", type=int, default=6, help="persistence openings per class")
    ap.add_argument("--tokens", type=int, default=128, help="persistence: generated tokens")
    ap.add_argument("--zs-per-class", type=int, default=0,
                    help="zero-shot rows per class of the test split (0 = all)")
    ap.add_argument("--mall-per-class", type=int, default=10, help="malleability rows per class")
    ap.add_argument("--sev-n", type=int, default=20, help="SEV scenarios of builtin:test (x3 valences)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--skip", default="", help="comma list of stages to skip: zs,persist,mall,sev")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    if args.model.startswith("tiny-"):  # pipeline smoke test without a real model
        from emocircuits.models import tiny_model

        model = tiny_model(args.model.split("-")[1])
    else:
        model = ec.load_model(args.model)
    L = model.cfg.n_layers
    res: dict = {"model": model_id(model), "n_layers": L, "d_model": model.cfg.d_model,
                 "chat": is_chat_model(model), "seconds": {"load": time.perf_counter() - t}}
    out = Path(args.out) / f"{model_id(model)}.json"
    prev = json.loads(out.read_text()) if out.exists() else {}  # stages skipped now keep their results

    def save(obj: dict) -> None:  # merged over the previous run's stages
        write_json(out, {**prev, **obj, "seconds": {**prev.get("seconds", {}), **obj.get("seconds", {})}})
    print(f"loaded {args.model} in {res['seconds']['load']:.1f}s; {L} layers")

    # ------------------------------------------------------------------ 1. sweeps
    u = ec.data.load_utterances()
    classes = u.classes
    t = time.perf_counter()
    ids = [encode(model, x) for x in u.texts]
    layers = [P.EMBED_LAYER, *range(L)]
    acts = P.hidden_at(model, ids, [[-1]] * len(ids), layers, batch_size=args.batch,
                       progress=True)[:, :, 0]  # [n, L+1, d]
    res["seconds"]["collect_last"] = time.perf_counter() - t
    print(f"collected {tuple(acts.shape)} in {res['seconds']['collect_last']:.1f}s")
    kw = [x.has_keyword for x in u]
    sweeps = {}
    for kind in args.kinds.split(","):
        sw = P.probe_layers(acts, u.labels, u.groups, kind=kind, layers=layers, n_layers=L,
                            split=u.splits, has_keyword=kw, classes=classes)
        sweeps[f"{kind}_last"] = sw
        print(f"{kind}: peak layer {sw.peak_layer} ({sw.peak_fraction:.2f} depth), 95 % onset layer "
              f"{sw.onset_layer(0.95)}; cv acc "
              f"{sw.accuracy_mean.max():.3f}; emb {sw.accuracy_mean[0]:.3f}; {sw.seconds:.1f}s")
    if args.mean_pool:
        t = time.perf_counter()
        pooled = []
        for s in range(0, len(u), 64):
            a = ec.collect(model, u.texts[s:s + 64], "resid_post", position="all",
                           batch_size=args.batch, progress=False)
            pooled.append(P.pool_acts(a["resid_post"], a.lengths, "mean"))
        pooled = torch.cat(pooled)
        res["seconds"]["collect_all"] = time.perf_counter() - t
        sw = P.probe_layers(pooled, u.labels, u.groups, kind="logreg", pool="mean",
                            n_layers=L, split=u.splits, has_keyword=kw, classes=classes)
        sweeps["logreg_mean"] = sw
        print(f"logreg mean-pool: peak {sw.peak_layer} acc {sw.accuracy_mean.max():.3f}")
    res["sweeps"] = {k: v.to_dict() for k, v in sweeps.items()}
    save(res)
    main_sw = sweeps.get("logreg_last") or next(iter(sweeps.values()))
    peak = main_sw.peak_layer
    for name, sw in sweeps.items():
        print(f"\n{name}\n{sw.to_dataframe().round(3).to_string(index=False)}")

    # the probe used below: logreg trained on the train split at the peak layer
    tr = np.array(u.splits) == "train"
    probe = P.fit_probe(acts[tr, layers.index(peak)], np.array(u.labels)[tr], layer=peak,
                        classes=classes)
    test_u = u.filter("test")

    # ------------------------------------------------------------------ 2. zero-shot
    if "zs" not in skip:
        zs_rows = per_class(test_u, args.zs_per_class) if args.zs_per_class else list(test_u)
        zs = P.zero_shot(model, [x.text for x in zs_rows], classes, [x.label for x in zs_rows],
                         batch_size=args.batch)
        te = np.array(u.splits) == "test"
        res["zero_shot"] = {**zs.to_dict(),
                            "probe_test_accuracy_peak": float(main_sw.test_accuracy[layers.index(peak)]),
                            "probe_test_accuracy_best": float(main_sw.test_accuracy.max()),
                            "n_test": int(te.sum()), "n_zero_shot": len(zs_rows)}
        print(f"zero-shot: acc {zs.accuracy:.3f} coverage {zs.coverage:.2f} constrained "
              f"{zs.constrained_accuracy:.3f}; probe test acc at peak "
              f"{res['zero_shot']['probe_test_accuracy_peak']:.3f} ({zs.seconds:.0f}s)")
        save(res)

    # ------------------------------------------------------------------ 3. persistence
    if "persist" not in skip:
        opens = per_class(u.filter("test"), args.per_class)
        pr = P.persistence(model, [o.text for o in opens], [o.label for o in opens],
                           max_new_tokens=args.tokens, layer=peak, probe=probe,
                           groups=[o.group for o in opens], classes=classes,
                           batch_size=max(args.batch, len(opens)), keep_hidden=False)
        res["persistence"] = {**pr.to_dict(), "n_openings": len(opens),
                              "probe": "logreg, train split, raw-text last token, peak layer"}
        tk = pr.transfer_accuracy
        print(f"persistence (layer {peak}, n={len(opens)}): reference {pr.reference_accuracy:.3f}; "
              + " ".join(f"k={k}:{tk[k]:.2f}" for k in (0, 1, 4, 16, 32, 64, 96, 128) if k < len(tk)))
        print("  per-position CV: " + " ".join(
            f"k={k}:{a:.2f}" for k, a in zip(pr.bucket_k, pr.bucket_accuracy_mean, strict=True)))
        save(res)

    # the in-context probe: same layer, trained on the train split wrapped the way the
    # malleability prompts wrap it (chat: the user message with no system prompt; base: the
    # raw text), read at the utterance's last token — no raw-text -> chat distribution shift
    probe_ctx = probe
    if is_chat_model(model) and ("mall" not in skip or "sev" not in skip):
        t = time.perf_counter()
        tr_rows = [x for x in u if x.split == "train"]
        wrapped = [P.wrap_utterance(model, x.text, None) for x in tr_rows]
        xw = P.probe_inputs(model, probe, [w[0] for w in wrapped], positions=[w[1] for w in wrapped],
                            batch_size=args.batch)
        probe_ctx = P.fit_probe(xw, np.array([x.label for x in tr_rows]), layer=peak, classes=classes)
        res["seconds"]["in_context_probe"] = time.perf_counter() - t

    # ------------------------------------------------------------------ 4. malleability
    if "mall" not in skip:
        rows = per_class(test_u, args.mall_per_class)
        y = np.array([classes.index(x.label) for x in rows])
        res["malleability"] = {}
        for pname, pr_ in (("raw_text_probe", probe), ("in_context_probe", probe_ctx)):
            if pname == "in_context_probe" and pr_ is probe:
                continue
            ml = P.malleability(model, pr_, [x.text for x in rows], batch_size=args.batch)
            res["malleability"][pname] = {**ml.to_dict(), "n": len(rows), "accuracy": {
                n: float((ml.probs[n].argmax(1) == y).mean()) for n in ml.names}}
            print(f"malleability, {pname} (mean probe probabilities; shift vs none); accuracy "
                  + str({k: round(v, 3) for k, v in res["malleability"][pname]["accuracy"].items()}))
            print(ml.to_dataframe().round(3).to_string())
        save(res)

    # ------------------------------------------------------------------ 5. SEV
    if "sev" not in skip:
        recs = ec.data.load_sev("builtin:test")[: args.sev_n]
        prompts = ec.data.neutral_prompts(model, recs, assistant_prefix="I feel")
        t = time.perf_counter()
        ro = emotion_readout(model, prompts, batch_size=args.batch)
        rv = ro.valence_score()
        xs = P.probe_inputs(model, probe, prompts, batch_size=args.batch)
        pp = probe.predict_proba(xs)
        pv = valence_score(pp, classes)
        pv_ctx = valence_score(probe_ctx.predict_proba(xs), classes)
        val = np.array([p.valence for p in prompts])
        pos, neg = val == "positive", val == "negative"
        from scipy.stats import pearsonr, spearmanr

        res["sev"] = {
            "n_scenarios": len(recs), "n_prompts": len(prompts), "prefix": "I feel",
            "auc_readout": auc(rv[pos], rv[neg]), "auc_probe": auc(pv[pos], pv[neg]),
            "auc_in_context_probe": auc(pv_ctx[pos], pv_ctx[neg]),
            "pearson_in_context_probe": float(pearsonr(rv, pv_ctx)[0]),
            "pearson": float(pearsonr(rv, pv)[0]), "spearman": float(spearmanr(rv, pv)[0]),
            "mean_probe_probs": {v: [float(x) for x in pp[val == v].mean(0)]
                                 for v in ("positive", "neutral", "negative")},
            "mean_probe_valence": {v: float(pv[val == v].mean()) for v in ("positive", "neutral", "negative")},
            "mean_readout_valence": {v: float(rv[val == v].mean()) for v in ("positive", "neutral", "negative")},
            "seconds": time.perf_counter() - t,
        }
        s = res["sev"]
        print(f"SEV ({len(prompts)} prompts): AUC readout {s['auc_readout']:.3f} probe "
              f"{s['auc_probe']:.3f} (in-context probe {s['auc_in_context_probe']:.3f}); pearson "
              f"{s['pearson']:.3f} spearman {s['spearman']:.3f}")
        print("  probe valence by event:", {k: round(v, 3) for k, v in s["mean_probe_valence"].items()})
        save(res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
