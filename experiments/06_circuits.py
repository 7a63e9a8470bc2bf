"""Emotion circuits end to end and the method comparison (PAPER_METHOD.md §6, §10 A8/A13/A17/A19).

    flock /tmp/ec_heavy.lock .venv/bin/python experiments/06_circuits.py --model smollm2-135m-instruct \\
        --out runs/circuits

Stages (each timed): (1) last-token activations of emotion-instructed prompts on a
``builtin:train`` subset -> unit directions (resid_mid/resid_post), Δμ (mlp_post, z), σ,
neuron scores C_mean = mean g·(W_out v) and head scores (the drop of <resid_mid, v_mid> when the
head is zeroed, exact from z); (2) sublayer influence on neutral train prompts (all emotions at
once, A17); (3) allocation + selection -> one ``EmotionCircuit`` per emotion; (4) faithfulness;
(5) λ (circuit) and α (steering) chosen on a few ``builtin:validation`` scenarios; (6) on
``builtin:test`` neutral prompts: no intervention, prompting, steering, circuit modulation and a
random circuit of the same per-layer sizes, judged by ``default_judge()`` and by the logit
readout (assistant prefix "I feel"), with the fluency guard computed without hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import emocircuits as ec
from emocircuits import circuits as C
from emocircuits import sites as S
from emocircuits.directions import group_centered_means
from emocircuits.emotions import EKMAN6
from emocircuits.evaluate import accuracy_table, evaluate_texts
from emocircuits.generation import GenerationConfig, generate
from emocircuits.judges import default_judge
from emocircuits.judges.readout import emotion_readout
from emocircuits.prompts import emotion_prompts, neutral_prompts
from emocircuits.steering import paper_layers, steer

PREFIX = "I feel"


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                print(f"[{name}] ...", flush=True)

            def __exit__(self, *a):
                timer.times[name] = round(time.perf_counter() - self.t, 1)
                print(f"[{name}] {timer.times[name]} s", flush=True)
        return _T()


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def parse_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def build_stage1(model, train, emotions, batch_size):
    prompts = emotion_prompts(model, train, emotions)
    acts = ec.collect(model, prompts, ("resid_mid", "resid_post", "mlp_post", "z"), "last",
                      batch_size=batch_size)
    groups = [p.group for p in prompts]
    labels = [p.emotion for p in prompts]
    v_mid, info = group_centered_means(acts["resid_mid"], groups, labels, emotions, normalize=True)
    v_post, _ = group_centered_means(acts["resid_post"], groups, labels, emotions, normalize=True)
    dv = C.difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, emotions)
    sigma = C.sigma_from_acts(acts["resid_post"], acts["resid_mid"])
    n_layers = model.cfg.n_layers
    W_out = torch.stack([S.W_out(model, L) for L in range(n_layers)]).detach().cpu()
    W_O = torch.stack([S.W_O(model, L) for L in range(n_layers)]).detach().cpu()
    nscores, hscores = [], []
    for i, e in enumerate(emotions):
        rows = [j for j, lab in enumerate(labels) if lab == e]
        nscores.append(C.neuron_scores_from_acts(acts["mlp_post"][rows], W_out, v_post[i]))
        hscores.append(C.head_scores_from_acts(acts["z"][rows], W_O, v_mid[i]))
    return dict(v_mid=v_mid, v_post=v_post, dv=dv, sigma=sigma, nscores=torch.stack(nscores),
                hscores=torch.stack(hscores), groups=info.describe(), n_prompts=len(prompts))


def gen_texts(model, prompts, cfg, ctx=None):
    with ctx if ctx is not None else nullcontext():
        return generate(model, prompts, cfg, progress=False)


def readout_labels(model, prompts_prefixed, emotions, ctx=None):
    with ctx if ctx is not None else nullcontext():
        r = emotion_readout(model, prompts_prefixed, emotions)
    return r


def per_emotion_generation(model, neutral, neutral_pref, emotions, make_ctx, cfg, judge, *, fluency: bool,
                           method: str):
    """Generate for every emotion under make_ctx(e); return (evaluation dict, readout accuracy)."""
    all_prompts, all_texts, all_targets, all_tokens, ro_rows = [], [], [], [], []
    shared = None
    for e in emotions:
        ctx = make_ctx(e)
        if ctx is None:  # no intervention: the same texts for every target, generated once
            shared = shared or gen_texts(model, neutral, cfg)
            res = shared
        else:
            res = gen_texts(model, neutral, cfg, ctx)
        all_prompts += list(neutral)
        all_texts += res.texts
        all_tokens += res.tokens
        all_targets += [e] * len(neutral)
        r = readout_labels(model, neutral_pref, emotions, make_ctx(e))
        j = r.emotions.index(e)
        for p, lab, m in zip(neutral_pref, r.labels, r.mass[:, j], strict=True):
            ro_rows.append({"emotion": e, "valence": p.valence, "match": lab == e, "mass": float(m)})
    ev = evaluate_texts(method, all_prompts, all_texts, all_targets, judge,
                        model=model if fluency else None, generated_tokens=all_tokens if fluency else None)
    rep = float(np.mean([ec.evaluate.repeated_ngram_rate(t, 3) for t in all_tokens]))
    ro = accuracy_table(ro_rows)
    out = ev.to_dict()
    out["readout"] = ro.to_dict()
    out["readout"]["mean_target_mass"] = float(np.mean([r["mass"] for r in ro_rows]))
    out["repeated_3gram_rate"] = rep
    out["examples"] = [{"emotion": r["emotion"], "valence": r["valence"], "text": r["text"], "match": r["match"]}
                       for r in ev.rows[:: max(1, len(ev.rows) // 12)]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="runs/circuits")
    ap.add_argument("--train-n", type=int, default=8, help="builtin:train scenarios for directions/Δμ/scores")
    ap.add_argument("--influence-n", type=int, default=2, help="train scenarios (x3 valences) for influence")
    ap.add_argument("--val-n", type=int, default=2, help="builtin:validation scenarios for λ/α")
    ap.add_argument("--test-n", type=int, default=6, help="builtin:test scenarios")
    ap.add_argument("--faith-n", type=int, default=3, help="test scenarios for faithfulness")
    ap.add_argument("--alphas-influence", default="0.1,0.3,0.5,0.7")
    ap.add_argument("--lambdas", default="1,2,4", help="circuit strengths tried on validation")
    ap.add_argument("--steer-alphas", default="4,8", help="steering α tried on validation")
    ap.add_argument("--budget-per-sublayer", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--no-fluency", action="store_true")
    ap.add_argument("--ppl-guard", type=float, default=3.0,
                    help="λ/α must keep perplexity <= this x the unmodulated model's on validation")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "circuits").mkdir(parents=True, exist_ok=True)
    timer = Timer()
    torch.set_grad_enabled(False)
    emotions = list(EKMAN6)
    results: dict = {"args": vars(args), "emotions": emotions}

    with timer("load"):
        if args.model.startswith("tiny-"):  # smoke tests without a real model: tiny-llama / tiny-gemma
            model = ec.models.tiny_model(args.model.split("-", 1)[1], n_layers=4)
        else:
            model = ec.load_model(args.model)
    n_layers = model.cfg.n_layers
    train = ec.data.load_sev("builtin:train")[: args.train_n]
    val = ec.data.load_sev("builtin:validation")[: args.val_n]
    test = ec.data.load_sev("builtin:test")[: args.test_n]
    results["sizes"] = {"train_prompts": len(train) * 18, "influence_prompts": args.influence_n * 3,
                        "val_prompts_per_emotion": len(val) * 3, "test_prompts_per_emotion": len(test) * 3,
                        "n_layers": n_layers, "d_mlp": model.cfg.d_mlp, "n_heads": model.cfg.n_heads}

    with timer("1_activations_directions_dmu_scores"):
        st = build_stage1(model, train, emotions, args.batch_size)
    results["stage1"] = {"groups": st["groups"], "sigma": st["sigma"].tolist(),
                         "dmu_mlp_norm": st["dv"].mlp.norm(dim=-1).tolist(),
                         "dmu_z_norm": st["dv"].z.flatten(2).norm(dim=-1).tolist()}

    with timer("2_influence"):
        neutral_train = neutral_prompts(model, ec.data.load_sev("builtin:train")[: args.influence_n])
        infl = C.sublayer_influence(model, neutral_train, st["v_mid"], st["v_post"], st["sigma"],
                                    alphas=parse_floats(args.alphas_influence), emotions=emotions,
                                    batch_size=args.batch_size, max_rows=256)
    results["influence"] = infl.to_dict()
    results["times_s"] = timer.times
    atomic_json(out / "results.json", results)

    with timer("3_assemble"):
        circuits = {}
        for i, e in enumerate(emotions):
            c = C.assemble_circuit(
                e, infl.influence[i], st["nscores"][i], st["hscores"][i], st["dv"].mlp[i], st["dv"].z[i],
                budget_per_sublayer=args.budget_per_sublayer,
                meta={"model": args.model, "train_scenarios": args.train_n, "influence_prompts": len(neutral_train)})
            c.save(out / "circuits" / e)
            circuits[e] = c
        summ = C.circuits_summary(circuits)
    results["circuits"] = summ
    results["times_s"] = timer.times
    atomic_json(out / "results.json", results)
    print("circuit sizes:", {e: (c.n_neurons, c.n_heads) for e, c in circuits.items()},
          "mean Jaccard:", summ["mean_jaccard"])

    with timer("4_faithfulness"):
        faith = {}
        frecs = ec.data.load_sev("builtin:test")[: args.faith_n]
        fneu = neutral_prompts(model, frecs, assistant_prefix=PREFIX)
        for i, e in enumerate(emotions):
            finst = emotion_prompts(model, frecs, [e], assistant_prefix=PREFIX)
            f = C.faithfulness(model, circuits[e], fneu, finst, e, v_ref=infl.v_ref[i], mlp_delta=st["dv"].mlp[i],
                               z_delta=st["dv"].z[i], emotions=emotions, n_random=args.random_seeds)
            faith[e] = f.to_dict()
            print(f"  {e}: ratio_s={f.ratio_s:.3f} ratio_mass={f.ratio_mass:.3f} "
                  f"abl_s={f.ablation_s['circuit_ablated']:.3f} vs rand {np.mean(f.ablation_s['random_ablated']):.3f}"
                  f" (instr {f.s['instructed']:.3f}, neutral {f.s['neutral']:.3f})", flush=True)
    results["faithfulness"] = faith
    results["times_s"] = timer.times
    atomic_json(out / "results.json", results)

    judge = default_judge(emotions)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=min(10, args.max_new_tokens),
                           repetition_penalty=1.1, no_repeat_ngram_size=3, batch_size=args.batch_size)
    steer_dirs = st["v_post"]  # [layer, d] per emotion, indexed by model layer
    band = paper_layers(model)

    def circuit_ctx(lam):
        return lambda e: C.modulate(model, circuits[e], lam)

    def steer_ctx(alpha):
        return lambda e: steer(model, steer_dirs[emotions.index(e)], layers=band, alpha=alpha)

    with timer("5_validation"):
        vneu = neutral_prompts(model, val)
        vpref = neutral_prompts(model, val, assistant_prefix=PREFIX)
        grid = {}
        # the unmodulated model's own perplexity on its own text: the fluency guard's reference
        base = per_emotion_generation(model, vneu, vpref, emotions, lambda e: None, cfg, judge,
                                      fluency=True, method="none")
        base_ppl = base["fluency"]["perplexity_geomean"]
        print(f"  none: judge {base['accuracy']['overall']:.3f} ppl {base_ppl:.2f}", flush=True)
        for lam in parse_floats(args.lambdas):
            r = per_emotion_generation(model, vneu, vpref, emotions, circuit_ctx(lam), cfg, judge,
                                       fluency=True, method=f"circuit_l{lam}")
            grid[f"circuit:{lam}"] = r
            print(f"  circuit λ={lam}: judge {r['accuracy']['overall']:.3f} readout {r['readout']['overall']:.3f}"
                  f" rep3 {r['repeated_3gram_rate']:.3f} ppl {r['fluency']['perplexity_geomean']:.2f}", flush=True)
        for a in parse_floats(args.steer_alphas):
            r = per_emotion_generation(model, vneu, vpref, emotions, steer_ctx(a), cfg, judge,
                                       fluency=True, method=f"steer_a{a}")
            grid[f"steer:{a}"] = r
            print(f"  steer α={a}: judge {r['accuracy']['overall']:.3f} readout {r['readout']['overall']:.3f}"
                  f" rep3 {r['repeated_3gram_rate']:.3f} ppl {r['fluency']['perplexity_geomean']:.2f}", flush=True)

        def fluent(v) -> bool:
            return (v["repeated_3gram_rate"] < 0.3
                    and v["fluency"]["perplexity_geomean"] <= args.ppl_guard * base_ppl)

        def pick(kind):
            # judge accuracy, then readout, among the settings that pass the fluency guard
            # (perplexity <= ppl_guard x the unmodulated model's, repeated-3-gram rate < 0.3);
            # when none passes, the least disfluent one, flagged in results.json
            cands = [(k, v) for k, v in grid.items() if k.startswith(kind)]
            ok = [kv for kv in cands if fluent(kv[1])]
            if ok:
                k, _ = max(ok, key=lambda kv: (kv[1]["accuracy"]["overall"], kv[1]["readout"]["overall"]))
            else:
                k, _ = min(cands, key=lambda kv: kv[1]["fluency"]["perplexity_geomean"])
            return float(k.split(":")[1]), bool(ok)
        (lam, lam_ok), (alpha, alpha_ok) = pick("circuit"), pick("steer")
    results["validation"] = {k: {"judge": v["accuracy"]["overall"], "readout": v["readout"]["overall"],
                                 "rep3": v["repeated_3gram_rate"], "ppl": v["fluency"]["perplexity_geomean"],
                                 "passes_fluency_guard": fluent(v)} for k, v in grid.items()}
    results["validation"]["none"] = {"judge": base["accuracy"]["overall"], "readout": base["readout"]["overall"],
                                     "rep3": base["repeated_3gram_rate"], "ppl": base_ppl}
    results["chosen"] = {"lambda": lam, "steer_alpha": alpha, "steer_layers": band,
                         "lambda_passes_guard": lam_ok, "alpha_passes_guard": alpha_ok,
                         "ppl_guard": args.ppl_guard}
    print("chosen λ", lam, "α", alpha, flush=True)
    results["times_s"] = timer.times
    atomic_json(out / "results.json", results)

    with timer("6_test"):
        tneu = neutral_prompts(model, test)
        tpref = neutral_prompts(model, test, assistant_prefix=PREFIX)
        flu = not args.no_fluency
        table = {}
        # no intervention: the same neutral text judged against every target (the judge's floor)
        table["none"] = per_emotion_generation(model, tneu, tpref, emotions, lambda e: None, cfg, judge,
                                               fluency=flu, method="none")
        # prompting: the emotion-instructed prompt
        inst = emotion_prompts(model, test, emotions)
        inst_pref = emotion_prompts(model, test, emotions, assistant_prefix=PREFIX)
        g = generate(model, inst, cfg, progress=False)
        ev = evaluate_texts("prompting", inst, g.texts, [p.emotion for p in inst], judge,
                            model=model if flu else None, generated_tokens=g.tokens if flu else None)
        r = emotion_readout(model, inst_pref, emotions)
        ro_rows = [{"emotion": p.emotion, "valence": p.valence, "match": lab == p.emotion,
                    "mass": float(r.mass[k, r.emotions.index(p.emotion)])}
                   for k, (p, lab) in enumerate(zip(inst_pref, r.labels, strict=True))]
        d = ev.to_dict()
        d["readout"] = accuracy_table(ro_rows).to_dict()
        d["readout"]["mean_target_mass"] = float(np.mean([x["mass"] for x in ro_rows]))
        d["repeated_3gram_rate"] = float(np.mean([ec.evaluate.repeated_ngram_rate(t, 3) for t in g.tokens]))
        d["examples"] = [{"emotion": x["emotion"], "valence": x["valence"], "text": x["text"], "match": x["match"]}
                         for x in ev.rows[:: max(1, len(ev.rows) // 12)]]
        table["prompting"] = d
        table["steering"] = per_emotion_generation(model, tneu, tpref, emotions, steer_ctx(alpha), cfg, judge,
                                                   fluency=flu, method="steering")
        table["circuit"] = per_emotion_generation(model, tneu, tpref, emotions, circuit_ctx(lam), cfg, judge,
                                                  fluency=flu, method="circuit")
        rand = {e: C.random_circuit(circuits[e], st["dv"].mlp[i], st["dv"].z[i], seed=0)
                for i, e in enumerate(emotions)}
        table["random_circuit"] = per_emotion_generation(
            model, tneu, tpref, emotions, lambda e: C.modulate(model, rand[e], lam), cfg, judge,
            fluency=flu, method="random_circuit")
    results["test"] = table
    results["times_s"] = timer.times
    atomic_json(out / "results.json", results)

    print(f"\nTEST ({len(test)} scenarios x 3 valences x {len(emotions)} emotions; max_new_tokens "
          f"{args.max_new_tokens}; λ={lam}, steering α={alpha} at layers {band[0]}-{band[-1]})")
    head = f"{'method':<16}{'judge':>8}{'readout':>9}{'mass':>9}{'ppl':>9}{'rep3':>7}  " + " ".join(
        f"{e[:5]:>6}" for e in emotions)
    print(head)
    for m, v in table.items():
        ppl = v.get("fluency", {}).get("perplexity_geomean", float("nan"))
        print(f"{m:<16}{100 * v['accuracy']['overall']:>7.1f}%{100 * v['readout']['overall']:>8.1f}%"
              f"{v['readout']['mean_target_mass']:>9.4f} {ppl:>8.2f}{v['repeated_3gram_rate']:>7.3f}  "
              + " ".join(f"{100 * v['accuracy']['by_emotion'][e]:>5.0f}%" for e in emotions))
    print("times (s):", timer.times)
    print("wrote", out / "results.json")


if __name__ == "__main__":
    main()
