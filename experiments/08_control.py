"""Continuous valence–arousal control and the emotion-vocabulary baseline (emocircuits.control).

    flock /tmp/ec_heavy.lock .venv/bin/python experiments/08_control.py \\
        --model smollm2-135m-instruct --out runs/control/smollm2-135m-instruct

1. Emotion directions (resid_post, last prompt token, group-centred, EKMAN6) from
   ``--n-train`` builtin:train scenarios × 3 events (emotion prompts for EKMAN6 + neutral,
   plus the neutral-instruction prompts); VA directions by ``lstsq`` and ``contrastive``,
   and their per-layer cosine.
2. Controllability on a 3×3 grid of (valence, arousal) targets over ``--n-control`` neutral
   builtin:test prompts: text VA (judge distribution projected on Russell–Mehrabian VA) and
   readout VA (prompt + "I feel"), Pearson r / MAE / Spearman / monotonic fraction per axis.
3. Method comparison on ``--n-test`` builtin:test scenarios × 3 events × EKMAN6 targets:
   unsteered, vocabulary bias, steering (α constant), decaying-schedule steering, and circuit
   modulation when ``--circuits DIR`` holds ``{emotion}.json`` circuits. Judge accuracy,
   emotion-word rate, perplexity (unsteered model) and repeated-3-gram rate.

Writes ``<out>/results.json`` (atomically).
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
from emocircuits import control as C
from emocircuits.activations import collect
from emocircuits.directions import context_agnostic
from emocircuits.evaluate import evaluate_texts
from emocircuits.generation import GenerationConfig, generate
from emocircuits.judges import default_judge
from emocircuits.models import is_chat_model, model_id
from emocircuits.prompts import emotion_prompts, neutral_prompts
from emocircuits.steering import paper_layers, steer


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="or tiny-llama / tiny-gemma")
    ap.add_argument("--out", default=None, help="default runs/control/<model>/")
    ap.add_argument("--n-train", type=int, default=10, help="train scenarios for the directions")
    ap.add_argument("--n-control", type=int, default=6, help="neutral test prompts per grid point")
    ap.add_argument("--n-test", type=int, default=4, help="test scenarios (×3 events ×6 emotions)")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--va-strength", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--alpha", type=float, default=8.0, help="constant steering α (paper: 8)")
    ap.add_argument("--bias", type=float, default=4.0, help="vocabulary-bias logit strength")
    ap.add_argument("--decay", type=float, nargs=4, default=[12.0, 0.05, 0.5, 2.0],
                    metavar=("ALPHA0", "PER_STEP", "GAMMA", "FLOOR"))
    ap.add_argument("--circuits", default="runs/circuits/circuits",
                    help="folder with {emotion}.json EmotionCircuits (06_circuits.py output); "
                         "circuit modulation is skipped when they are missing")
    ap.add_argument("--circuit-strength", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    t_all = time.perf_counter()
    if args.model.startswith("tiny-"):  # smoke test of the script on a random tiny model
        from emocircuits.models import tiny_model
        model = tiny_model(args.model.split("-", 1)[1])
    else:
        model = ec.load_model(args.model)
    name = model_id(model)
    out = Path(args.out or f"runs/control/{Path(args.model).name}") / "results.json"
    chat = is_chat_model(model)
    prefix = "I feel" if chat else "I felt"
    layers = paper_layers(model)
    emo7 = ec.EKMAN6 + ("neutral",)
    res: dict = {"model": name, "chat": chat, "layers": layers, "args": vars(args)}
    timing: dict = {}
    judge = default_judge(ec.EKMAN6)
    res["judge"] = judge.name
    print(f"{name}: steering layers {layers}, judge {judge.name}")

    # ---------------------------------------------------------------- 1. directions
    t = time.perf_counter()
    train = ec.data.load_sev("builtin:train")[: args.n_train]
    ep = emotion_prompts(model, train, emo7)
    npr = neutral_prompts(model, train)
    acts_e = collect(model, ep, "resid_post", progress=False)
    acts_n = collect(model, npr, "resid_post", progress=False)
    dirs = context_agnostic(acts_e, ep, ec.EKMAN6, sites="resid_post")
    D = dirs.vectors["resid_post"]
    va_l = C.va_directions("lstsq", directions=D, emotions=ec.EKMAN6, layers=dirs.layers)
    va_c = C.va_directions("contrastive", neutral_acts=acts_n["resid_post"], neutral_prompts=npr,
                           emotion_acts=acts_e["resid_post"], emotion_prompts=ep, layers=dirs.layers)
    cmp = C.compare_va_directions(va_l, va_c)
    timing["directions_s"] = time.perf_counter() - t
    res["directions"] = {"n_emotion_prompts": len(ep), "n_neutral_prompts": len(npr),
                         "comparison": cmp.to_dict(),
                         "band_mean": {"valence_cos": float(cmp.cosine[0, layers].mean()),
                                       "arousal_cos": float(cmp.cosine[1, layers].mean())}}
    print(f"directions ({len(ep)}+{len(npr)} prompts, {timing['directions_s']:.0f}s): "
          f"cos(lstsq, contrastive) over band: valence {res['directions']['band_mean']['valence_cos']:.3f}, "
          f"arousal {res['directions']['band_mean']['arousal_cos']:.3f}")

    # ---------------------------------------------------------------- 2. controllability
    test = ec.data.load_sev("builtin:test")
    ctrl_recs = test[: (args.n_control + 2) // 3]
    cp = neutral_prompts(model, ctrl_recs)[: args.n_control]
    cp_ro = neutral_prompts(model, ctrl_recs, assistant_prefix=prefix)[: args.n_control]
    grid = C.default_grid((-1.0, 0.0, 1.0))
    gcfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=min(5, args.max_new_tokens),
                            batch_size=16)
    res["controllability"] = {}
    va_judge = default_judge(emo7)
    res["va_judge"] = va_judge.name
    for label, va in (("lstsq", va_l), ("contrastive", va_c)):
        for a in args.va_strength:
            t = time.perf_counter()
            r = C.controllability(model, cp, va, grid, strength=a, layers=layers, readout_prompts=cp_ro,
                                  judge_va=lambda texts: C.va_of_texts(texts, va_judge), config=gcfg,
                                  progress=False)
            d = r.to_dict()
            d["seconds"] = time.perf_counter() - t
            d["examples"] = {f"{tv:+.0f},{ta:+.0f}": txt[:2] for (tv, ta), txt in zip(r.targets, r.texts, strict=False)
                             if (tv, ta) in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 0))}
            key = f"{label}@{a:g}"
            res["controllability"][key] = d
            ts, rs = d["text_scores"], d["readout_scores"]
            print(f"controllability {key} ({d['seconds']:.0f}s): "
                  + " | ".join(f"{src} {ax}: r={s[ax]['pearson_r']:+.2f} MAE={s[ax]['mae']:.2f} "
                               f"rho={s[ax]['spearman']:+.2f} mono={s[ax]['monotonic_fraction']:.2f}"
                               for src, s in (("text", ts), ("readout", rs)) for ax in ("valence", "arousal")))
            write_json(out, res)

    # ---------------------------------------------------------------- 3. method comparison
    trecs = test[: args.n_test]
    tp = neutral_prompts(model, trecs)
    a0, per_step, gamma, floor = args.decay
    circuits = {}
    if args.circuits:
        from emocircuits.circuits import EmotionCircuit
        for e in ec.EKMAN6:
            f = Path(args.circuits) / f"{e}.json"
            if f.exists():
                c = EmotionCircuit.load(f)
                if c.n_layers == model.cfg.n_layers:
                    circuits[e] = c
    methods = ["unsteered", "vocab_bias", "steer", "steer_decaying"]
    if len(circuits) == len(ec.EKMAN6):
        methods.append("circuit")
    else:
        res["circuit_note"] = ("circuit modulation not run: no saved circuits for all six emotions "
                               f"(--circuits {args.circuits!r})")
    res["methods"] = {}
    base = None
    for m in methods:
        t = time.perf_counter()
        texts, toks, prompts_all, targets, sched_hist = [], [], [], [], {}
        for e in ec.EKMAN6:
            if m == "unsteered":
                if base is None:
                    base = generate(model, tp, gcfg, progress=False)
                g = base
            elif m == "vocab_bias":
                proc = C.VocabularyBias(C.emotion_word_token_ids(model), e, args.bias)
                g = generate(model, tp, gcfg, progress=False, logits_processors=[proc])
            elif m == "steer":
                with steer(model, dirs, layers, args.alpha, emotion=e):
                    g = generate(model, tp, gcfg, progress=False)
            elif m == "steer_decaying":
                sch = C.DecayingSchedule.for_model(model, a0, per_step, gamma, floor, emotions=[e])
                with steer(model, dirs, layers, sch, emotion=e):
                    g = generate(model, tp, gcfg, progress=False, logits_processors=[sch.observer])
                sched_hist[e] = [round(x[1], 3) for x in sch.history[:args.max_new_tokens]]
            else:
                from emocircuits.circuits import modulate
                with modulate(model, circuits[e], args.circuit_strength):
                    g = generate(model, tp, gcfg, progress=False)
            texts += g.texts
            toks += g.tokens
            prompts_all += tp
            targets += [e] * len(tp)
        ev = evaluate_texts(m, prompts_all, texts, targets, judge, model=model, generated_tokens=toks)
        ewr = C.emotion_word_rate(texts, targets)
        any_ewr = [sum(C.emotion_word_rate([x], [e2])[0] for e2 in ec.EKMAN6) for x in texts]
        d = {"judge_accuracy": ev.accuracy.overall, "by_emotion": ev.accuracy.by_emotion,
             "emotion_word_rate": float(np.mean(ewr)), "any_emotion_word_rate": float(np.mean(any_ewr)),
             **ev.fluency, "n": len(texts), "seconds": time.perf_counter() - t,
             "examples": {e: texts[i * len(tp)] for i, e in enumerate(ec.EKMAN6)}}
        if sched_hist:
            d["alpha_schedule_first_batch"] = sched_hist
        res["methods"][m] = d
        print(f"{m:<15} acc {100 * d['judge_accuracy']:5.1f}%  word-rate {d['emotion_word_rate']:.3f}  "
              f"ppl {d['perplexity_geomean']:.2f}  rep3 {d['repeated_ngram_rate']:.3f}  ({d['seconds']:.0f}s, n={d['n']})")
        write_json(out, res)
    timing["total_s"] = time.perf_counter() - t_all
    res["timing"] = timing
    res["sizes"] = {"train_scenarios": len(train), "control_prompts": len(cp), "grid": grid,
                    "test_prompts_per_emotion": len(tp), "max_new_tokens": args.max_new_tokens}
    write_json(out, res)
    print(f"wrote {out} ({timing['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
