"""Stage 01: "Always reply in {emotion}" generations on test, judged; the logit readout beside it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluate import AccuracyTable, MethodEvaluation
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[prompting]``"""

    fluency: bool = True  # perplexity / repetition of the instructed replies (unhooked model)
    n_examples: int = 12


@dataclass
class PromptingResult(Result):
    """Prompting accuracy (judge), readout accuracy on the instructed prompts (with and without
    the instruction keyword's own token), and the judged test texts."""

    evaluation: MethodEvaluation
    readout_instructed: AccuracyTable
    readout_no_keyword: AccuracyTable
    readout_target_share: dict = field(default_factory=dict)
    readout_neutral_target_share: dict = field(default_factory=dict)
    chance: float = 0.0

    @property
    def accuracy(self) -> AccuracyTable:
        return self.evaluation.accuracy

    def headline(self) -> dict:
        return {"prompting_accuracy": self.accuracy.overall,
                "readout_accuracy_instructed": self.readout_instructed.overall,
                "readout_accuracy_without_keyword_token": self.readout_no_keyword.overall}


def run(ctx: StageContext) -> PromptingResult:
    from ..elicitation import elicit, readout_accuracy
    from ..evaluate import evaluate_texts
    from ..prompts import emotion_prompts

    model, emos = ctx.model, ctx.config.emotions
    recs = common.records(ctx, "test")
    rows = elicit(model, recs, emos, out_path=ctx.path("generations.jsonl"),
                  gen_config=common.gen_config(ctx), progress=ctx.progress)
    prompts = emotion_prompts(model, recs, emos)
    by_key = {r["key"]: r["gen_text"] for r in rows}
    texts = [by_key[p.key] for p in prompts]
    ev = evaluate_texts("prompting", prompts, texts, [p.emotion for p in prompts], common.judge(ctx),
                        model=model if ctx.settings.fluency else None)
    step = max(1, len(ev.rows) // max(1, ctx.settings.n_examples))
    ev.examples = [{k: r.get(k) for k in ("emotion", "valence", "text", "match", "perplexity")}
                   for r in ev.rows[::step]]
    ro = readout_accuracy(model, recs, emos, progress=ctx.progress)
    out = PromptingResult(ev, ro.table, ro.table_no_keyword, dict(ro.target_share),
                          dict(ro.neutral_target_share), 1.0 / len(emos))
    row = lambda name, t: [name, t.overall, *[t.by_emotion.get(e) for e in emos], t.n]  # noqa: E731
    ctx.table("prompting (judge) and readout accuracy", ["method", "overall", *emos, "n"], [
        row("prompting (judge)", ev.accuracy), row("readout, instructed", ro.table),
        row("readout, keyword token removed", ro.table_no_keyword)])
    from ..viz import figures

    ctx.figure("prompting vs readout accuracy", "prompting.png", figures.method_comparison,
               {"prompting (judge)": ev.accuracy.overall, "readout": ro.table.overall,
                "readout w/o keyword": ro.table_no_keyword.overall},
               per_emotion={"prompting": ev.accuracy.by_emotion, "readout": ro.table.by_emotion})
    return out


def plan(cfg) -> Plan:
    n = common.n_prompts(cfg, "test")
    return Plan(forward=3 * n, generate=n, what="generate + judge instructed replies; readout")


STUDY = Study("prompting", "Prompt-based elicitation (stage 01)", Config, run, plan,
              modules=("emocircuits.elicitation",), inputs=common.sev_inputs("test"))
