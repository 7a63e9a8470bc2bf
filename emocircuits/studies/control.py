"""Valence–arousal directions (lstsq, contrastive) and controllability (r, MAE) on a target grid;
the method comparison: unsteered, vocabulary bias, steering, decaying-schedule steering and
circuit modulation, judged with the emotion-word rate and the fluency guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

METHODS = ("unsteered", "vocabulary_bias", "steering", "decaying_steering", "circuit")
Method = Literal["unsteered", "vocabulary_bias", "steering", "decaying_steering", "circuit"]


@dataclass(frozen=True)
class Config:
    """``[control]``"""

    # VA directions: lstsq (from the directions stage's emotion directions and Russell–Mehrabian
    # coordinates) and/or contrastive (from activations); every method × strength is gridded, the
    # first method at the first strength gives the headline numbers
    va_methods: tuple[Literal["lstsq", "contrastive"], ...] = ("lstsq",)
    strengths: tuple[float, ...] = (2.0,)  # VA steering strengths (× rms)
    levels: tuple[float, ...] = (-1.0, 0.0, 1.0)  # the grid is levels × levels (valence, arousal)
    n_scenarios: int = 2  # data.test scenarios (× 3 events) per grid target
    readout_prefix: str = "I feel"  # the readout's assistant prefix; "auto": "I feel" (chat) / "I felt" (base)
    va_n_scenarios: int | None = None  # data.train scenarios for the contrastive directions; None: data.n_train
    # the method comparison on data.test neutral prompts × the run's emotions
    methods: tuple[Method, ...] = ("vocabulary_bias",)
    # logit bias on the target emotion's words; with more than one value the strength is chosen
    # on data.validation by fluent accuracy (like steering's α and the circuit's λ)
    vocabulary_strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    ppl_guard: float = 3.0  # fluent: perplexity ≤ this × the unsteered texts' median
    max_repeat: float = 0.3  # fluent: repeated-3-gram rate below this
    steering_strength: float | None = None  # α of "steering"; None: the steering stage's chosen α (needs it)
    decay_alpha0: float = 12.0  # decaying schedule α_k = max(floor, α0·exp(−per_step·k)·γ^(emotion words))
    decay_per_step: float = 0.05
    decay_per_emotion_word: float = 0.5  # γ
    decay_floor: float = 2.0
    circuit_strength: float | None = None  # λ of "circuit"; None: the circuits stage's chosen λ

    def __post_init__(self) -> None:
        if len(self.levels) < 2 or self.n_scenarios < 1:
            raise ValueError("control: levels needs >= 2 values and n_scenarios >= 1")
        if not self.va_methods or len(set(self.va_methods)) != len(self.va_methods):
            raise ValueError(f"control.va_methods must list distinct methods, got {list(self.va_methods)}")
        if not self.strengths:
            raise ValueError("control.strengths is empty")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"control.methods has repeats: {list(self.methods)}")
        if self.va_n_scenarios is not None and self.va_n_scenarios < 1:
            raise ValueError("control.va_n_scenarios must be >= 1")
        if not self.vocabulary_strengths:
            raise ValueError("control.vocabulary_strengths is empty")
        if self.ppl_guard <= 1.0 or not 0.0 < self.max_repeat <= 1.0:
            raise ValueError("control: ppl_guard must be > 1 and max_repeat in (0, 1]")
        if not 0.0 <= self.decay_per_emotion_word <= 1.0 or self.decay_per_step < 0:
            raise ValueError("control: decay_per_emotion_word must be in [0, 1] and decay_per_step >= 0")


@dataclass
class ControlMethod(Result):
    """One method of the comparison: judged texts (accuracy, fluency) and emotion-word rates."""

    evaluation: object  # MethodEvaluation
    setting: dict
    emotion_word_rate: float  # target emotion's words / words
    any_emotion_word_rate: float  # any emotion's words / words
    alpha_schedule: dict = field(default_factory=dict)  # decaying steering: emotion -> α_k, first batch


@dataclass
class ControlResult(Result):
    """VA controllability per (direction method, strength), the cosine between the two VA
    direction sets, and the method comparison on test."""

    controllability: dict  # "lstsq@2" -> ControllabilityResult (the first is the headline one)
    methods: dict = field(default_factory=dict)  # method -> ControlMethod
    va_comparison: object | None = None  # VAComparison (lstsq vs contrastive), when both ran
    va_band_cosine: dict = field(default_factory=dict)  # axis -> mean cos over the steered layers
    notes: list[str] = field(default_factory=list)
    comparison: object | None = None  # MethodComparison: fluent accuracy with intervals, verdicts

    @property
    def main(self):
        return next(iter(self.controllability.values()))

    def headline(self) -> dict:
        out = {}
        for src in ("text", "readout"):
            if src == "readout" and self.main.readout_va is None:
                continue
            tag = "" if src == "text" else "readout_"
            for ax, sc in self.main.scores(src).items():
                out[f"va_{tag}{ax}_pearson_r"], out[f"va_{tag}{ax}_mae"] = sc.pearson_r, sc.mae
        out.update({f"va_cos_{ax}_lstsq_contrastive": v for ax, v in self.va_band_cosine.items()})
        for m, r in self.methods.items():
            out[f"control_{m}_accuracy"] = r.evaluation.accuracy.overall
            out[f"control_{m}_perplexity"] = r.evaluation.fluency.get("perplexity_geomean")
        if "vocabulary_bias" in self.methods:
            out["vocabulary_bias_accuracy"] = self.methods["vocabulary_bias"].evaluation.accuracy.overall
            out["vocabulary_bias_strength"] = self.methods["vocabulary_bias"].setting.get("strength")
        if self.comparison is not None:
            for r in self.comparison.table:
                out[f"control_{r['method']}_fluent_accuracy"] = r["fluent_accuracy"]
        return out


def _va_directions(ctx: StageContext, dirs, layers_steered):
    """The VA direction sets of ``control.va_methods`` and, with both, their cosine."""
    from .. import control as CT
    from ..activations import collect
    from ..emotions import NEUTRAL
    from ..prompts import emotion_prompts, neutral_prompts

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    out = {}
    if "lstsq" in s.va_methods:
        out["lstsq"] = CT.va_directions("lstsq", directions=dirs.vectors["resid_post"], emotions=emos,
                                        layers=dirs.layers)
    if "contrastive" in s.va_methods:
        recs = common.records(ctx, "train", s.va_n_scenarios)
        ep, npr = emotion_prompts(model, recs, [*emos, NEUTRAL]), neutral_prompts(model, recs)
        kw = {"batch_size": common.batch_size(ctx), "progress": ctx.progress}
        acts_e, acts_n = collect(model, ep, "resid_post", **kw), collect(model, npr, "resid_post", **kw)
        out["contrastive"] = CT.va_directions(
            "contrastive", neutral_acts=acts_n["resid_post"], neutral_prompts=npr,
            emotion_acts=acts_e["resid_post"], emotion_prompts=ep, layers=acts_e.layers["resid_post"])
    cmp, band = None, {}
    if len(out) == 2:
        cmp = CT.compare_va_directions(out["lstsq"], out["contrastive"])
        idx = [cmp.layers.index(x) for x in layers_steered if x in cmp.layers]
        if idx:
            band = {ax: float(cmp.cosine[i, idx].mean()) for i, ax in enumerate(CT.AXES)}
    return {m: out[m] for m in s.va_methods}, cmp, band


def _compare(ctx: StageContext, dirs, notes: list[str]) -> dict:
    """The method comparison (``control.methods``) on data.test neutral prompts."""
    from .. import control as CT
    from ..evaluate import evaluate_intervention
    from ..judges.readout import emotion_tokens
    from ..prompts import neutral_prompts
    from ..steering import paper_layers, steer

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    if not s.methods:
        return {}
    st, circ = ctx.upstream("steering"), ctx.upstream("circuits")
    band, site, alpha = list(paper_layers(model)), "resid_post", s.steering_strength
    if st is not None:
        from ..steering import band_name
        from .steering import bands

        chosen = st.chosen
        band = next((b for b in bands(model, ctx.config.section("steering").layer_bands)
                     if band_name(b) == chosen["layers"]), band)
        site = chosen.get("site", site)
        alpha = float(chosen["strength"]) if alpha is None else alpha
    prompts = neutral_prompts(model, common.records(ctx, "test"))
    judge, gen = common.judge(ctx), common.gen_config(ctx)
    out = {}
    for m in s.methods:
        procs, schedules, setting = None, {}, {}
        if m == "unsteered":
            make = lambda e: None  # noqa: E731
        elif m == "vocabulary_bias":
            tok = dict(emotion_tokens(model, emos).token_ids)  # the readout's token set

            def biased(a, tok=tok):
                return lambda target: [CT.VocabularyBias(tok, target, a)]
            make = lambda e: None  # noqa: E731
            a, setting = _vocabulary_strength(ctx, biased, judge, gen)
            procs = biased(a)
        elif m == "steering":
            if alpha is None:
                notes.append("steering: not compared; control.steering_strength is unset and no steering "
                             "stage ran")
                continue
            make = lambda e, a=alpha: steer(model, dirs, band, a, emotion=e, site=site)  # noqa: E731
            setting = {"strength": alpha, "layers": band, "site": site}
        elif m == "decaying_steering":
            def make(e, schedules=schedules):
                sch = CT.DecayingSchedule.for_model(model, s.decay_alpha0, s.decay_per_step,
                                                    s.decay_per_emotion_word, s.decay_floor, emotions=[e])
                schedules[e] = sch
                return steer(model, dirs, band, sch, emotion=e, site=site)
            procs = lambda e, schedules=schedules: [schedules[e].observer]  # noqa: E731
            setting = {"alpha0": s.decay_alpha0, "decay_per_step": s.decay_per_step,
                       "decay_per_emotion_word": s.decay_per_emotion_word, "floor": s.decay_floor,
                       "layers": band, "site": site}
        else:  # circuit
            missing = [e for e in emos if circ is None or e not in circ.circuits]
            if missing:
                notes.append("circuit: not compared; " + ("no circuits stage ran" if circ is None
                                                          else f"no circuits for {missing}"))
                continue
            from ..circuits import modulate

            lam = float(circ.chosen["lambda"]) if s.circuit_strength is None else s.circuit_strength
            make = lambda e, lam=lam: modulate(model, circ.circuits[e], lam)  # noqa: E731
            setting = {"strength": lam}
        def compute(make=make, procs=procs, m=m):
            return evaluate_intervention(model, prompts, emos, make, judge, gen, method=m, logits_processors=procs)
        # resumable per method, except schedules whose α history is read from this run's objects
        ev = compute() if m == "decaying_steering" else ctx.checkpoint(f"test/{m}", compute)
        texts, targets = [r["text"] for r in ev.rows], [r["emotion"] for r in ev.rows]
        hist: dict[str, list[float]] = {}
        for e, sch in schedules.items():  # α_k of the first batch (k restarts at 0 with each batch)
            hist[e] = []
            for i, (k, a, _) in enumerate(sch.history):
                if i > 0 and k == 0:
                    break
                hist[e].append(float(a))
        out[m] = ControlMethod(ev, setting, common.mean(CT.emotion_word_rate(texts, targets)),
                               common.mean(CT.any_emotion_word_rate(texts, emos)), hist)
    return out


def _vocabulary_strength(ctx: StageContext, biased, judge, gen) -> tuple[float, dict]:
    """The vocabulary bias strength: the only value of ``control.vocabulary_strengths``, or the
    one with the best validation fluent accuracy (``evaluate.choose_setting``), with the grid."""
    from ..evaluate import choose_setting, evaluate_intervention
    from ..prompts import neutral_prompts
    from .steering import summary_row

    s, emos, model = ctx.settings, ctx.config.emotions, ctx.model
    grid_values = [float(a) for a in s.vocabulary_strengths]
    if len(grid_values) == 1:
        return grid_values[0], {"strength": grid_values[0], "chosen_on": "fixed (one value)"}
    val = neutral_prompts(model, common.records(ctx, "validation"))
    st = ctx.upstream("steering")  # same prompts, decoding and judge: reuse its unsteered texts
    base = (st.validation_unsteered if st is not None and st.validation_unsteered is not None
            else evaluate_intervention(model, val, emos, lambda e: None, judge, gen, method="none"))
    grid = {a: ctx.checkpoint(f"validation/vocabulary_bias {a:g}", lambda a=a: evaluate_intervention(
        model, val, emos, lambda e: None, judge, gen, method=f"vocabulary_bias {a:g}", logits_processors=biased(a)))
        for a in grid_values}
    a, ok = choose_setting(grid, base, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    rows = [summary_row("none", base, base, s.ppl_guard, s.max_repeat, strength=0.0)]
    rows += [summary_row(f"bias={x:g}", ev, base, s.ppl_guard, s.max_repeat, strength=x) for x, ev in grid.items()]
    return a, {"strength": a, "chosen_on": "validation", "passes_fluency_guard": ok, "grid": rows}


def _comparison(ctx: StageContext, methods: dict, judge, gen):
    """Fluent accuracy with 95 % intervals over scenarios for the compared methods, and the
    verdicts of circuit (or steering) against the others; the fluency reference is the
    unsteered model's texts (from ``methods``, the steering stage, or generated here)."""
    from ..evaluate import compare_methods, evaluate_intervention
    from ..prompts import neutral_prompts

    s, emos = ctx.settings, ctx.config.emotions
    evals = {("none" if m == "unsteered" else m): c.evaluation for m, c in methods.items()}
    if "none" not in evals:
        st = ctx.upstream("steering")
        evals = {"none": (st.test_unsteered if st is not None else evaluate_intervention(
            ctx.model, neutral_prompts(ctx.model, common.records(ctx, "test")), emos, lambda e: None,
            judge, gen, method="none")), **evals}
    focus = "circuit" if "circuit" in evals else "steering" if "steering" in evals else "vocabulary_bias"
    against = [m for m in ("vocabulary_bias", "steering", "decaying_steering", "circuit") if m != focus]
    return compare_methods(evals, focus=focus, against=against, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)


def run(ctx: StageContext) -> ControlResult:
    from .. import control as CT
    from ..judges import default_judge
    from ..models import is_chat_model
    from ..prompts import neutral_prompts
    from ..steering import paper_layers
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    dirs = ctx.upstream("directions").directions
    layers = list(paper_layers(model))
    vas, cmp, band_cos = _va_directions(ctx, dirs, layers)
    recs = common.records(ctx, "test", s.n_scenarios)
    prompts = neutral_prompts(model, recs)
    prefix = s.readout_prefix if s.readout_prefix != "auto" else ("I feel" if is_chat_model(model) else "I felt")
    ro = neutral_prompts(model, recs, assistant_prefix=prefix)
    levels = list(s.levels)
    va_judge = default_judge(CT.VA_EMOTIONS, prefer=ctx.config.judge.prefer)  # + neutral: the origin
    grid = {}
    for name, va in vas.items():
        for a in s.strengths:
            grid[f"{name}@{a:g}"] = CT.controllability(
                model, prompts, va, CT.default_grid(levels), a, layers, readout_prompts=ro,
                judge_va=lambda texts: CT.va_of_texts(texts, va_judge), gen_config=common.gen_config(ctx),
                progress=ctx.progress)
    notes: list[str] = []
    methods = _compare(ctx, dirs, notes)
    comparison = (_comparison(ctx, methods, common.judge(ctx), common.gen_config(ctx))
                  if any(m != "unsteered" for m in methods) else None)
    res = ControlResult(grid, methods, cmp, band_cos, notes, comparison)

    rows = []
    for key, r in grid.items():
        for src in ("text", "readout"):
            if src == "readout" and r.readout_va is None:
                continue
            rows += [[key, f"{src} · {ax}", sc.pearson_r, sc.mae, sc.spearman, sc.monotonic_fraction]
                     for ax, sc in r.scores(src).items()]
    ctx.table("valence–arousal controllability (target vs measured)",
              ["directions @ strength", "measure · axis", "Pearson r", "MAE", "Spearman", "monotonic"], rows)
    if band_cos:
        ctx.table("cos(lstsq, contrastive) VA directions, mean over the steered layers", ["valence", "arousal"],
                  [[band_cos["valence"], band_cos["arousal"]]])
    if comparison is not None:
        pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
        ctx.table("fluent accuracy on the test set, 95 % intervals over scenarios",
                  ["method", "fluent accuracy %", "95 % interval", "raw accuracy %", "perplexity (median)",
                   "rep3", "n", "scenarios"],
                  [[r["method"], pct(r["fluent_accuracy"]), f"[{pct(r['fluent_low'])}, {pct(r['fluent_high'])}]",
                    pct(r["accuracy"]), r["perplexity_median"], r["repeated_3gram"], r["n"], r["n_scenarios"]]
                   for r in comparison.table])
        if comparison.verdicts:
            ctx.table("verdicts (paired by scenario, event and target; sign-flip permutation p)", ["verdict"],
                      [[v] for v in comparison.verdicts])
    if res.methods:
        ctx.table("method comparison on the test set", ["method", "judge", *emos, "emotion-word rate",
                                                        "any emotion word", "perplexity", "rep3", "n"],
                  [[m, c.evaluation.accuracy.overall, *[c.evaluation.accuracy.by_emotion.get(e) for e in emos],
                    c.emotion_word_rate, c.any_emotion_word_rate, c.evaluation.fluency.get("perplexity_geomean"),
                    c.evaluation.fluency.get("repeated_3gram_rate_mean"), c.evaluation.accuracy.n]
                   for m, c in res.methods.items()])
        vb = res.methods.get("vocabulary_bias")
        if vb is not None and vb.setting.get("grid"):
            ctx.table("vocabulary bias strength on validation", ["setting", "fluent", "judge", "readout",
                                                                 "perplexity", "rep3", "n"],
                      [[r["setting"], r["fluent_accuracy"], r["judge_accuracy"], r["readout_accuracy"],
                        r["perplexity"], r["repeated_3gram"], r["n"]] for r in vb.setting["grid"]])
        ctx.figure("method comparison (judge accuracy)", "methods.png", figures.method_comparison,
                   {m: c.evaluation.accuracy.overall for m, c in res.methods.items()},
                   per_emotion={m: c.evaluation.accuracy.by_emotion for m, c in res.methods.items()})
    main = res.main
    # valence in [-1, 1] on both axes (sweep_curves' 0–1 range hid negative valences); no finite
    # value: the figure is omitted and ctx.figure notes why
    ctx.figure("valence–arousal: target vs measured (text judge solid, readout dotted)", "va.png",
               figures.va_control, main.targets, main.text_va, readout=main.readout_va,
               title=f"valence–arousal control ({next(iter(grid))}): target vs measured")
    return res


def plan(cfg) -> Plan:
    s = cfg.section("control")
    n = 3 * s.n_scenarios
    g = len(s.levels) ** 2 * n * len(s.va_methods) * len(s.strengths)
    fwd = 2 * g
    if "contrastive" in s.va_methods:
        n_va = s.va_n_scenarios or common.n_scenarios(cfg, "train")
        fwd += 3 * n_va * (len(cfg.emotions) + 2)
    nt = common.n_prompts(cfg, "test")
    cmp = sum(nt // len(cfg.emotions) if m == "unsteered" else nt for m in s.methods)
    if s.methods and "unsteered" not in s.methods:
        cmp += nt // len(cfg.emotions)  # the fluency reference (reused from the steering stage when it ran)
    if "vocabulary_bias" in s.methods and len(s.vocabulary_strengths) > 1:
        nv = common.n_prompts(cfg, "validation")
        cmp += nv * len(s.vocabulary_strengths) + nv // len(cfg.emotions)
    what = f"VA grid controllability ({', '.join(s.va_methods)})"
    if s.methods:
        what += "; " + ", ".join(s.methods)
    return Plan(generate=g + cmp, forward=fwd - 2 * g, eval_forward=2 * g + common.text_forwards(cfg) * cmp, what=what)


STUDY = Study("control", "Valence–arousal control and the method comparison", Config, run, plan, version=2,
              requires=("directions",), optional=("circuits", "steering"), modules=("emocircuits.control",),
              inputs=common.sev_inputs("train", "test"))
