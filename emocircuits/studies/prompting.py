"""Stage 01: "Always reply in {emotion}" generations on test, judged; the logit readout beside it.

Switches (``[prompting]``): ``elicit`` (generate + judge), ``readout`` (readout accuracy on the
instructed prompts, with the keyword-token control), ``neutral_readout`` (the per-item readout
on neutral prompts: share per emotion, argmax, P(pos) − P(neg) by event valence and its AUC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..evaluate import AccuracyTable, MethodEvaluation
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[prompting]``"""

    elicit: bool = True  # generate the instructed replies on test and judge them
    fluency: bool = True  # perplexity / repetition of the instructed replies (unhooked model)
    n_examples: int = 12
    readout: bool = True  # readout accuracy on the instructed prompts (+ keyword token removed)
    neutral_readout: bool = False  # the readout on neutral prompts, per item
    readout_prefix: str | None = None  # None: "I feel" after a chat template, "I felt" plain

    def __post_init__(self) -> None:
        if not (self.elicit or self.readout or self.neutral_readout):
            raise ValueError("prompting: elicit, readout and neutral_readout are all off; nothing to do")


@dataclass
class PromptingResult(Result):
    """Prompting accuracy (judge) with the judge's confusion and the generation cost; readout
    accuracy on the instructed prompts (with and without the instruction keyword's own token)
    and the no-instruction reference; the per-item neutral readout. Parts switched off are None."""

    evaluation: MethodEvaluation | None
    readout_instructed: AccuracyTable | None
    readout_no_keyword: AccuracyTable | None
    readout_target_share: dict = field(default_factory=dict)
    readout_neutral_target_share: dict = field(default_factory=dict)
    chance: float = 0.0
    judge_confusion: dict = field(default_factory=dict)  # target -> {label read: count}
    elicitation_timing: dict = field(default_factory=dict)
    readout_neutral_labels: dict = field(default_factory=dict)  # valence -> emotion -> argmax fraction
    readout_prefix: str | None = None
    neutral_readout: object | None = None  # NeutralReadout

    @property
    def accuracy(self) -> AccuracyTable | None:
        return self.evaluation.accuracy if self.evaluation is not None else None

    def headline(self) -> dict:
        out = {}
        if self.evaluation is not None:
            out["prompting_accuracy"] = self.evaluation.accuracy.overall
        if self.readout_instructed is not None:
            out["readout_accuracy_instructed"] = self.readout_instructed.overall
            out["readout_accuracy_without_keyword_token"] = self.readout_no_keyword.overall
        if self.neutral_readout is not None:
            out["neutral_readout_valence_auc"] = self.neutral_readout.valence_auc
        return out


def run(ctx: StageContext) -> PromptingResult:
    """Every evaluation here (generation, fluency, readouts) in ``generation.dtype``, as for the
    other methods (``evaluate_intervention``)."""
    from ..models import compute_dtype

    with compute_dtype(ctx.model, ctx.config.generation.dtype):
        return _run(ctx)


def _run(ctx: StageContext) -> PromptingResult:
    from ..elicitation import (
        elicit,
        elicitation_timing,
        judge_confusion,
        neutral_readout,
        readout_accuracy,
    )
    from ..evaluate import evaluate_texts
    from ..prompts import emotion_prompts

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    recs = common.records(ctx, "test")
    bs = common.batch_size(ctx)
    out = PromptingResult(None, None, None, chance=1.0 / len(emos), readout_prefix=s.readout_prefix)
    if s.elicit:
        rows = elicit(model, recs, emos, out_path=ctx.path("generations.jsonl"),
                      gen_config=common.gen_config(ctx), batch_size=bs, progress=ctx.progress)
        prompts = emotion_prompts(model, recs, emos)
        by_key = {r["key"]: r["gen_text"] for r in rows}
        texts = [by_key[p.key] for p in prompts]
        ev = evaluate_texts("prompting", prompts, texts, [p.emotion for p in prompts],
                            common.judge(ctx), model=model if s.fluency else None)
        step = max(1, len(ev.rows) // max(1, s.n_examples))
        ev.examples = [{k: r.get(k) for k in ("emotion", "valence", "text", "match", "perplexity")}
                       for r in ev.rows[::step]]
        out.evaluation = ev
        out.judge_confusion = judge_confusion(ev.rows)
        out.elicitation_timing = elicitation_timing(rows)
    if s.readout:
        ro = readout_accuracy(model, recs, emos, assistant_prefix=s.readout_prefix, batch_size=bs,
                              progress=ctx.progress)
        out.readout_instructed, out.readout_no_keyword = ro.table, ro.table_no_keyword
        out.readout_target_share = dict(ro.target_share)
        out.readout_neutral_target_share = dict(ro.neutral_target_share)
        out.readout_neutral_labels = dict(ro.neutral_labels)
        out.readout_prefix = ro.assistant_prefix
    if s.neutral_readout:
        nr = neutral_readout(model, recs, emos, assistant_prefix=s.readout_prefix, batch_size=bs,
                             progress=ctx.progress)
        out.neutral_readout = nr
        ctx.table(f"readout on neutral prompts + {nr.assistant_prefix!r}: share of each emotion's words",
                  ["item", "valence", *emos, "argmax", "P(pos) - P(neg)"],
                  [[it["skeleton_id"], it["valence"], *row, lab, v] for it, row, lab, v in
                   zip(nr.items, nr.share.tolist(), nr.labels, nr.valence_score.tolist(), strict=True)])
        ctx.table("readout on neutral prompts: mean P(pos words) - P(neg words) by event valence",
                  ["valence", "mean", *[f"argmax {e}" for e in emos]],
                  [[v, m, *[nr.label_fraction[v][e] for e in emos]]
                   for v, m in nr.valence_score_mean.items()])
    _report(ctx, out, emos)
    return out


def _report(ctx: StageContext, out: PromptingResult, emos) -> None:
    row = lambda name, t: [name, t.overall, *[t.by_emotion.get(e) for e in emos], t.n]  # noqa: E731
    tables = [(name, t) for name, t in (("prompting (judge)", out.accuracy),
                                        ("readout, instructed", out.readout_instructed),
                                        ("readout, keyword token removed", out.readout_no_keyword))
              if t is not None]
    if tables:
        ctx.table("prompting (judge) and readout accuracy", ["method", "overall", *emos, "n"],
                  [row(n, t) for n, t in tables])
    if out.judge_confusion:
        labels = sorted({lab for c in out.judge_confusion.values() for lab in c})
        ctx.table("what the judge read for each instruction (counts)", ["instructed", *labels],
                  [[e, *[c.get(lab, 0) for lab in labels]] for e, c in out.judge_confusion.items()])
    if out.accuracy is not None and out.readout_instructed is not None:
        from ..viz import figures

        ctx.figure("prompting vs readout accuracy", "prompting.png", figures.method_comparison,
                   {"prompting (judge)": out.accuracy.overall, "readout": out.readout_instructed.overall,
                    "readout w/o keyword": out.readout_no_keyword.overall},
                   per_emotion={"prompting": out.accuracy.by_emotion,
                                "readout": out.readout_instructed.by_emotion})


def plan(cfg) -> Plan:
    s = cfg.section("prompting")
    n = common.n_prompts(cfg, "test")
    n_neutral = common.n_prompts(cfg, "test", per_emotion=False)
    fwd = ((common.text_forwards(cfg) - 1) * n if s.elicit and s.fluency else 0) + ((n + n_neutral) if s.readout else 0) \
        + (n_neutral if s.neutral_readout else 0)
    what = [w for w, on in (("generate + judge instructed replies", s.elicit),
                            ("readout (instructed, keyword removed)", s.readout),
                            ("readout on neutral prompts", s.neutral_readout)) if on]
    return Plan(eval_forward=fwd, generate=n if s.elicit else 0, what="; ".join(what))


STUDY = Study("prompting", "Prompt-based elicitation (stage 01)", Config, run, plan, version=2,
              modules=("emocircuits.elicitation",), inputs=common.sev_inputs("test"))
