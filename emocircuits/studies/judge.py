"""Judge agreement: the run's offline judge against the labels of the builtin utterance set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[judge_agreement]``"""

    split: Literal["train", "validation", "test"] = "test"


@dataclass
class JudgeAgreement(Result):
    """Top-1 agreement of the offline judge with the utterance labels (n utterances; the
    judge abstained on ``n_abstained`` of them, counted as misses)."""

    judge: str
    accuracy: float | None
    by_emotion: dict[str, float | None]
    without_keyword: float | None
    n: int
    chance: float
    n_abstained: int = 0

    def headline(self) -> dict:
        return {"judge_accuracy_on_builtin_utterance_labels": self.accuracy}


def run(ctx: StageContext) -> JudgeAgreement:
    from ..data import load_utterances

    emos = ctx.config.emotions
    utt = [u for u in load_utterances(split=ctx.settings.split) if u.label in emos]
    judge = common.judge(ctx)
    name = getattr(judge, "name", type(judge).__name__)
    if not utt:
        return JudgeAgreement(name, None, {e: None for e in emos}, None, 0, 1.0 / len(emos))
    res = judge.judge([u.text for u in utt], [u.label for u in utt])
    per = {}
    for e in emos:
        m = [ok for u, ok in zip(utt, res.match, strict=True) if u.label == e]
        per[e] = sum(m) / len(m) if m else None
    kw = [ok for u, ok in zip(utt, res.match, strict=True) if not u.has_keyword]
    n_abst = sum(r is not None for r in (getattr(res, "abstained", None) or []))
    out = JudgeAgreement(name, float(res.accuracy), per, (sum(kw) / len(kw)) if kw else None,
                         len(utt), 1.0 / len(emos), n_abst)
    ctx.table("offline judge vs builtin utterance labels",
              ["judge", "overall", *emos, "n", "abstained"],
              [[name, out.accuracy, *[per[e] for e in emos], len(utt), n_abst]])
    return out


STUDY = Study("judge_agreement", "Judge agreement", Config, run,
              plan=lambda cfg: Plan(what="offline judge vs builtin utterance labels (no model)"),
              modules=("emocircuits.judges",), inputs=common.utterance_inputs)
