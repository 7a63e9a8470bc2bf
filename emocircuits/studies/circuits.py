"""Stages 05–07: Δμ, σ, sublayer influence, allocation and circuits; modulation strength λ
chosen on validation under the fluency guard; on test the circuit against random circuits of
the same per-layer sizes, the unmodulated model, prompting and steering (the method comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..evaluate import MethodEvaluation
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common
from .steering import READOUT_PREFIX, summary_row


@dataclass(frozen=True)
class Config:
    """``[circuits]``"""

    n_influence_scenarios: int = 2  # neutral train scenarios (× 3 valences) for the influence
    influence_alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)  # doses of the influence probe
    budget_per_sublayer: int = 10  # the paper's B (units per sublayer on average)
    # budgets tried on validation together with the lambdas (None: budget_per_sublayer only)
    budgets: tuple[int, ...] | None = None
    # head scores: the exact closed-form ablation score, attribution patching, or the components stage's
    score_source: Literal["closed_form", "attribution", "components"] = "closed_form"
    lambdas: tuple[float, ...] = (1.0, 2.0, 4.0)  # modulation strengths tried on validation
    ppl_guard: float = 3.0
    max_repeat: float = 0.3
    random_controls: int = 5  # random circuits of the same per-layer sizes generated on test
    readout: bool = True
    faithfulness: bool = False
    faithfulness_scenarios: int = 2  # test scenarios for faithfulness
    faithfulness_random: int = 3
    n_examples: int = 12

    def __post_init__(self) -> None:
        if self.n_influence_scenarios < 1 or self.budget_per_sublayer < 1:
            raise ValueError("circuits: n_influence_scenarios and budget_per_sublayer must be >= 1")
        if not self.lambdas or not self.influence_alphas:
            raise ValueError("circuits: lambdas and influence_alphas must not be empty")
        if self.random_controls < 0:
            raise ValueError("circuits.random_controls must be >= 0")
        if self.budgets is not None and (not self.budgets or min(self.budgets) < 1):
            raise ValueError("circuits.budgets must list positive integers")


@dataclass
class CircuitsResult(Result):
    """The circuits, the validation grid and choice of λ, and every method's test evaluation."""

    circuits: dict  # emotion -> EmotionCircuit
    difference_vectors: object  # DifferenceVectors
    influence: object  # InfluenceResult
    sigma: object  # [2, layer] tensor
    summary: dict  # sizes, Jaccard
    grid: list[dict]
    chosen: dict
    evaluations: dict  # method -> MethodEvaluation (test)
    score_source: str = ""
    faithfulness: dict = field(default_factory=dict)
    comparison: object | None = None  # MethodComparison: fluent accuracy, intervals, verdicts

    def random_mean(self) -> float | None:
        return common.mean(v.accuracy.overall for k, v in self.evaluations.items()
                           if k.startswith("random circuit"))

    def headline(self) -> dict:
        out = {"circuit_modulation_accuracy": self.evaluations["circuit"].accuracy.overall,
               "random_circuit_accuracy": self.random_mean(),
               "circuit_perplexity": self.evaluations["circuit"].fluency.get("perplexity_geomean")}
        if self.comparison is not None:
            for row in self.comparison.table:
                name = row["method"].replace(" ", "_")
                out[f"fluent_accuracy_{name}"] = row["fluent_accuracy"]
            for i, v in enumerate(self.comparison.verdicts):
                out[f"verdict_{i + 1}"] = v
        return out


def run(ctx: StageContext) -> CircuitsResult:
    """The stage, with the run's shared last-token collection of the train prompts active."""
    from ..prompts import emotion_prompts

    prompts = common.accepted(ctx, emotion_prompts(ctx.model, common.records(ctx, "train"), ctx.config.emotions),
                              "circuits")
    with common.shared_train_activations(ctx, prompts):
        return _run(ctx)


def _run(ctx: StageContext) -> CircuitsResult:
    import torch

    from .. import circuits as C
    from .. import sites as S
    from ..activations import collect
    from ..evaluate import choose_setting, passes_fluency_guard
    from ..prompts import emotion_prompts, neutral_prompts
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    dirs = ctx.upstream("directions").directions
    if dirs.layers != list(range(model.cfg.n_layers)):
        raise ValueError("circuits need directions at every layer")
    bs = common.batch_size(ctx)
    train = common.records(ctx, "train")
    prompts = common.accepted(ctx, emotion_prompts(model, train, emos), "circuits")
    acts = collect(model, prompts, ("mlp_post", "z", "resid_post", "resid_mid"), "last",
                   batch_size=bs, progress=ctx.progress)
    dv = C.difference_vectors_from_acts(acts["mlp_post"], acts["z"], prompts, emos)
    sigma = C.sigma_from_acts(acts["resid_post"], acts["resid_mid"])
    v_mid, v_post = dirs.vectors["resid_mid"], dirs.vectors["resid_post"]
    infl_recs = common.records(ctx, "train", s.n_influence_scenarios)
    infl_prompts = common.accepted(ctx, neutral_prompts(model, infl_recs), "circuits.n_influence_scenarios")
    from ..run.plan import INFLUENCE_BATCH, INFLUENCE_MAX_ROWS

    # its own batch: one-token rows on repeated caches run fastest at ~8 prompts × 192 rows here
    infl = ctx.checkpoint("influence", lambda: C.sublayer_influence(
        model, infl_prompts, v_mid, v_post, sigma, alphas=tuple(s.influence_alphas), emotions=emos,
        batch_size=min(bs, INFLUENCE_BATCH), max_rows=INFLUENCE_MAX_ROWS, progress=ctx.progress))
    comp = ctx.upstream("components")
    if s.score_source == "components":
        if comp is None:
            raise ValueError("circuits.score_source = 'components' needs the components stage")
        nscores, hscores = comp.neurons.C_mean, comp.heads_attribution.mean
        source = "components stage (C_mean; head attribution patching, same-layer readout)"
    else:
        from .. import components as K

        n = model.cfg.n_layers
        W_out = torch.stack([S.W_out(model, L).detach().float().cpu() for L in range(n)])
        labels = [p.emotion for p in prompts]
        nscores = torch.stack([K.neuron_scores_from_acts(
            acts["mlp_post"][[j for j, lab in enumerate(labels) if lab == e]], W_out, v_post[i])
            for i, e in enumerate(emos)])
        if s.score_source == "closed_form":  # the paper's exact zero-ablation score, one forward
            hscores = K.head_ablation_importance_closed_form(model, prompts, None, v_mid, emos,
                                                             batch_size=bs, progress=ctx.progress).mean
            source = "C_mean from activations; heads: exact zero-ablation score (closed form, ln2 readout)"
        else:  # "attribution": first-order estimate, one forward + backward
            hscores = K.head_attribution(model, prompts, None, emos, readout="same_layer",
                                         directions_mid=v_mid, batch_size=bs, progress=ctx.progress).mean
            source = "C_mean from activations; heads: attribution patching (same-layer readout)"
    budgets = list(s.budgets) if s.budgets is not None else [s.budget_per_sublayer]
    by_budget = {b: {e: C.assemble_circuit(e, infl.influence[i], nscores[i], hscores[i], dv.mlp[i],
                                           dv.z[i], budget_per_sublayer=b) for i, e in enumerate(emos)}
                 for b in budgets}

    evaluate = common.evaluator(ctx, emos, readout=s.readout, n_examples=s.n_examples)  # resumable per method

    def modulated(cs, lam):
        return lambda e: C.modulate(model, cs[e], lam)

    # (budget, λ) on validation by fluent accuracy
    settings = [(b, float(x)) for b in budgets for x in s.lambdas]
    rows, ok, (budget, lam) = [], None, settings[0]
    if len(settings) > 1:
        val = common.records(ctx, "validation")
        steered = ctx.upstream("steering")  # same prompts, decoding and judge: reuse its baseline
        base = (steered.validation_unsteered if steered is not None and steered.validation_unsteered
                is not None else evaluate(val, lambda e: None, "none", "validation"))
        ref = base.fluency["perplexity_geomean"]
        rows.append(summary_row("none", base, base, s.ppl_guard, s.max_repeat, strength=0.0, passes_guard=True))
        grid = {}
        for b, x in settings:
            name = f"B={b} λ={x}" if len(budgets) > 1 else f"λ={x}"
            ev = evaluate(val, modulated(by_budget[b], x), f"circuit {name}", "validation")
            grid[(b, x)] = ev
            rows.append(summary_row(name, ev, base, s.ppl_guard, s.max_repeat, strength=x, budget=b,
                                    passes_guard=passes_fluency_guard(
                ev, ref, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)))
        (budget, lam), ok = choose_setting(grid, base, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    circuits = by_budget[budget]
    chosen = {"lambda": lam, "passes_fluency_guard": ok, "swept": len(settings) > 1,
              "chosen_on": "validation", "budget_per_sublayer": budget,
              "heads_per_circuit": {e: c.n_heads for e, c in circuits.items()},
              "neurons_per_circuit": {e: c.n_neurons for e, c in circuits.items()}}
    # test: the circuit, random circuits of the same sizes, and the other methods
    test = common.records(ctx, "test")
    evals: dict[str, MethodEvaluation] = {}
    steer_res, prompt_res = ctx.upstream("steering"), ctx.upstream("prompting")
    evals["none"] = (steer_res.test_unsteered if steer_res is not None
                     else evaluate(test, lambda e: None, "none", "test"))
    if prompt_res is not None and prompt_res.evaluation is not None:  # prompting.elicit = false
        evals["prompting"] = prompt_res.evaluation
    if steer_res is not None:
        evals["steering"] = steer_res.test
    evals["circuit"] = evaluate(test, modulated(circuits, lam), "circuit", "test")
    for r in range(s.random_controls):
        rc = {e: C.random_circuit(circuits[e], dv.mlp[i], dv.z[i], seed=r) for i, e in enumerate(emos)}
        evals[f"random circuit {r}"] = evaluate(test, modulated(rc, lam), f"random circuit {r}", "test")
    faith = {}
    if s.faithfulness:
        frecs = common.records(ctx, "test", s.faithfulness_scenarios)
        fneu = neutral_prompts(model, frecs, assistant_prefix=READOUT_PREFIX)
        for i, e in enumerate(emos):
            finst = emotion_prompts(model, frecs, [e], assistant_prefix=READOUT_PREFIX)
            faith[e] = C.faithfulness(model, circuits[e], fneu, finst, e, v_ref=infl.v_ref[i],
                                      mlp_delta=dv.mlp[i], z_delta=dv.z[i], emotions=emos,
                                      n_random=s.faithfulness_random, batch_size=bs).to_dict()
    from ..evaluate import compare_methods

    comparison = compare_methods(evals, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    res = CircuitsResult(circuits, dv, infl, sigma, C.circuits_summary(circuits), rows, chosen, evals,
                         source, faith, comparison)
    pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
    ctx.table("the answer: fluent accuracy on the test set, 95 % intervals over scenarios",
              ["method", "fluent accuracy %", "95 % interval", "raw accuracy %", "readout %",
               "perplexity (median)", "rep3", "n", "scenarios"],
              [[r["method"], pct(r["fluent_accuracy"]), f"[{pct(r['fluent_low'])}, {pct(r['fluent_high'])}]",
                pct(r["accuracy"]), pct(r["readout_accuracy"]), r["perplexity_median"], r["repeated_3gram"],
                r["n"], r["n_scenarios"]] for r in comparison.table])
    ctx.table("verdicts (paired by scenario, event and target; sign-flip permutation p)", ["verdict"],
              [[v] for v in comparison.verdicts])
    ctx.table("method comparison on the test set", ["method", "judge", "readout", "perplexity", "rep3",
                                                    *emos, "n"],
              [[m, v.accuracy.overall, (v.readout or {}).get("overall"), v.fluency.get("perplexity_geomean"),
                v.fluency.get("repeated_3gram_rate_mean"), *[v.accuracy.by_emotion.get(e) for e in emos],
                v.accuracy.n] for m, v in evals.items()])
    if rows:
        ctx.table("λ on validation", ["setting", "fluent", "judge", "readout", "perplexity", "rep3", "passes guard"],
                  [[r["setting"], r["fluent_accuracy"], r["judge_accuracy"], r["readout_accuracy"], r["perplexity"],
                    r["repeated_3gram"], r["passes_guard"]] for r in rows])
    acc = {m: v.accuracy.overall for m, v in evals.items() if not m.startswith("random")}
    ctx.figure("method comparison with the random-circuit control", "methods.png",
               figures.method_comparison, acc, controls={"random circuit": res.random_mean() or 0.0},
               per_emotion={m: evals[m].accuracy.by_emotion for m in acc})
    ctx.figure("sublayer influence I(L, p) (mean over α)", "influence.png", figures.sublayer_influence,
               {e: {"mlp": infl.mean(i)[0], "attn": infl.mean(i)[1]} for i, e in enumerate(emos)})
    ctx.figure("circuit graph", "circuit_graph.png", figures.circuit_graph,
               {e: {"heads": sorted(c.head_set()), "neurons": sorted(c.neuron_set())}
                for e, c in circuits.items()}, model.cfg.n_layers, n_heads=model.cfg.n_heads)
    return res


def top_components(res: CircuitsResult, k: int = 4) -> dict:
    """A few (layer, head) and (layer, neuron) of the first circuit, deepest first."""
    c0 = next(iter(res.circuits.values()))
    h = [(L, ids[0]) for L, ids in enumerate(c0.heads) if ids]
    n = [(L, ids[0]) for L, ids in enumerate(c0.neurons) if ids]
    return {"heads": h[::-1][:k], "neurons": n[::-1][:k]}


def influence_seconds(cfg, n_scenarios: int) -> float:
    """The estimated seconds of ``sublayer_influence`` on ``n_scenarios`` neutral scenarios (× 3
    events): per prompt one prefix forward (batch 8), then one last-token row per (emotion, α,
    sublayer) resumed at its layer, on average half the blocks."""
    from ..run.plan import INFLUENCE_ROW_SECONDS, SECONDS_PER_PROMPT_FORWARD

    s = cfg.section("circuits")
    n_layers = {"smollm2-135m-instruct": 30, "gemma-3-270m": 18}.get(cfg.model, 24)
    depth = sum((n_layers - L) / n_layers for L in range(n_layers))
    rows = len(cfg.emotions) * len(s.influence_alphas) * 2 * depth
    return 3 * n_scenarios * (SECONDS_PER_PROMPT_FORWARD + rows * INFLUENCE_ROW_SECONDS)


def plan(cfg) -> Plan:
    s = cfg.section("circuits")
    nt = common.n_prompts(cfg, "test")
    e = len(cfg.emotions)
    # the unmodified model's texts come from the steering stage when it runs
    reuse = cfg.run.stages is None or "steering" in cfg.run.stages
    n_gen = nt * (1 + s.random_controls) + (0 if reuse else nt / e)
    n_set = len(s.lambdas) * (len(s.budgets) if s.budgets is not None else 1)
    if n_set > 1:
        nv = common.n_prompts(cfg, "validation")
        n_gen += nv * n_set + (0 if reuse else nv / e)
    infl_s = influence_seconds(cfg, s.n_influence_scenarios)
    own = 0 if cfg.run.share_activations else common.n_prompts(cfg, "train")  # Δμ, σ: the shared collection
    return Plan(forward=own, work_seconds=infl_s, generate=n_gen, eval_forward=common.text_forwards(cfg) * n_gen,
                what="Δμ, σ, influence, allocation; λ on validation; circuit vs random circuits on test")


STUDY = Study("circuits", "Circuits and modulation (stages 05–07)", Config, run, plan, version=4,
              requires=("directions",), optional=("components", "prompting", "steering"),
              modules=("emocircuits.circuits",), inputs=common.sev_inputs("train", "validation", "test"))
