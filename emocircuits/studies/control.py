"""Valence–arousal directions and controllability (r, MAE); the vocabulary-bias baseline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..evaluate import MethodEvaluation
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[control]``"""

    va_method: Literal["lstsq", "contrastive"] = "lstsq"
    levels: tuple[float, ...] = (-1.0, 0.0, 1.0)
    n_scenarios: int = 2
    strength: float = 2.0  # VA steering strength (× rms)
    vocabulary_strength: float = 4.0  # logit bias on the target emotion's words

    def __post_init__(self) -> None:
        if len(self.levels) < 2 or self.n_scenarios < 1:
            raise ValueError("control: levels needs >= 2 values and n_scenarios >= 1")


@dataclass
class ControlResult(Result):
    """VA controllability on a target grid and the vocabulary-bias baseline on test."""

    controllability: object  # ControllabilityResult
    vocabulary_bias: MethodEvaluation
    vocabulary_strength: float
    mean_target_word_rate: float | None = None
    examples: list[str] = field(default_factory=list)

    def headline(self) -> dict:
        t = self.controllability.scores("text")
        return {"va_valence_pearson_r": t["valence"].pearson_r, "va_valence_mae": t["valence"].mae,
                "va_arousal_pearson_r": t["arousal"].pearson_r, "va_arousal_mae": t["arousal"].mae,
                "vocabulary_bias_accuracy": self.vocabulary_bias.accuracy.overall}


def run(ctx: StageContext) -> ControlResult:
    from .. import control as CT
    from ..evaluate import evaluate_texts
    from ..generation import generate
    from ..prompts import neutral_prompts
    from ..steering import paper_layers
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    dirs = ctx.upstream("directions").directions
    va = CT.va_directions(s.va_method, directions=dirs.vectors["resid_post"], emotions=emos,
                          layers=dirs.layers)
    recs = common.records(ctx, "test", s.n_scenarios)
    prompts = neutral_prompts(model, recs)
    ro = neutral_prompts(model, recs, assistant_prefix="I feel")
    levels = list(s.levels)
    res = CT.controllability(model, prompts, va, CT.default_grid(levels), s.strength, paper_layers(model),
                             readout_prompts=ro, config=common.gen_config(ctx), progress=ctx.progress)
    txt = res.scores("text")
    rows = [[f"text judge · {ax}", sc.pearson_r, sc.mae, sc.spearman] for ax, sc in txt.items()]
    if res.readout_va is not None:
        rows += [[f"readout · {ax}", sc.pearson_r, sc.mae, sc.spearman] for ax, sc in res.scores("readout").items()]
    ctx.table("valence–arousal controllability (target vs measured)",
              ["measure · axis", "Pearson r", "MAE", "Spearman"], rows)
    test = neutral_prompts(model, common.records(ctx, "test"))
    allp = [p for _ in emos for p in test]
    targets = [e for e in emos for _ in test]
    proc = CT.VocabularyBias.for_prompts(model, allp, targets, s.vocabulary_strength, emotions=emos)
    g = generate(model, allp, common.gen_config(ctx), progress=False, logits_processors=[proc])
    ev = evaluate_texts("vocabulary bias", allp, g.texts, targets, common.judge(ctx), model=model,
                        generated_tokens=g.tokens)
    rate = CT.emotion_word_rate(g.texts, targets)
    out = ControlResult(res, ev, s.vocabulary_strength, common.mean(rate),
                        [r["text"] for r in ev.rows[:: max(1, len(ev.rows) // 6)]])
    ctx.table("vocabulary-bias baseline (judge accuracy)", ["method", "overall", *emos, "n"],
              [[f"vocabulary bias +{s.vocabulary_strength}", ev.accuracy.overall,
                *[ev.accuracy.by_emotion.get(e) for e in emos], ev.accuracy.n]])
    ctx.figure("valence–arousal: target vs measured (text judge)", "va.png", figures.sweep_curves,
               levels, {f"valence (arousal={a:+.1f})": [float(res.text_va.mean(1)[k, 0])
                                                       for k, tg in enumerate(res.targets) if tg[1] == a]
                        for a in levels},
               xlabel="target valence", title="measured valence vs target")
    return out


def plan(cfg) -> Plan:
    s = cfg.section("control")
    n = 3 * s.n_scenarios
    g = len(s.levels) ** 2 * n
    v = common.n_prompts(cfg, "test")
    return Plan(generate=g + v, forward=2 * g + v, what="VA grid controllability; vocabulary-bias baseline")


STUDY = Study("control", "Valence–arousal control and vocabulary bias", Config, run, plan,
              requires=("directions",), modules=("emocircuits.control",), inputs=common.sev_inputs("test"))
