"""Layer-wise emotion probes on labeled utterances, the zero-shot baseline and persistence."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[probes]``"""

    classes: tuple[str, ...] | None = None  # None: the run's emotions + neutral
    max_utterances: int | None = None  # None: every utterance (class balance kept when capped)
    cv: int = 5
    zero_shot_n: int = 40
    persistence_n: int = 12
    persistence_tokens: int = 16

    def __post_init__(self) -> None:
        if self.cv < 2:
            raise ValueError(f"probes.cv must be >= 2, got {self.cv}")
        if self.max_utterances is not None and self.max_utterances < 2:
            raise ValueError("probes.max_utterances must be >= 2")
        if min(self.zero_shot_n, self.persistence_n) < 0 or self.persistence_tokens < 1:
            raise ValueError("probes: zero_shot_n, persistence_n >= 0 and persistence_tokens >= 1")


@dataclass
class ProbesResult(Result):
    """The probe sweep over layers, the zero-shot baseline and persistence."""

    sweep: object  # ProbeSweep
    zero_shot: object | None = None  # ZeroShotResult
    persistence: object | None = None  # PersistenceResult

    def headline(self) -> dict:
        out = {"probe_peak_accuracy": float(self.sweep.accuracy_mean.max()),
               "probe_peak_layer": self.sweep.peak_layer, "probe_chance": self.sweep.chance_uniform}
        if self.zero_shot is not None:
            out["zero_shot_accuracy"] = self.zero_shot.accuracy
            out["zero_shot_constrained_accuracy"] = self.zero_shot.constrained_accuracy
        return out


def run(ctx: StageContext) -> ProbesResult:
    from .. import probes as PR
    from ..data import load_utterances
    from ..prompts import encode
    from ..viz import figures

    model, s = ctx.model, ctx.settings
    classes = list(s.classes) if s.classes is not None else [*ctx.config.emotions, "neutral"]
    utt = [u for u in load_utterances() if u.label in classes]
    if s.max_utterances is not None and len(utt) > s.max_utterances:  # every k-th row
        step = len(utt) / s.max_utterances
        utt = [utt[int(i * step)] for i in range(s.max_utterances)]
    wrapped = [PR.wrap_utterance(model, u.text) for u in utt]
    ids = [encode(model, w[0]) for w in wrapped]
    layers = [PR.EMBED_LAYER, *range(model.cfg.n_layers)]
    h = PR.hidden_at(model, ids, [[w[1]] for w in wrapped], layers, batch_size=common.batch_size(ctx),
                     progress=ctx.progress)[:, :, 0]
    sweep = PR.probe_layers(h, [u.label for u in utt], [u.group for u in utt], cv=s.cv, layers=layers,
                            n_layers=model.cfg.n_layers, split=[u.split for u in utt],
                            has_keyword=[u.has_keyword for u in utt], classes=classes,
                            progress=ctx.progress)
    test = [u for u in utt if u.split == "test"][: s.zero_shot_n]
    zs = (PR.zero_shot(model, [u.text for u in test], classes, [u.label for u in test],
                       progress=ctx.progress) if test else None)
    peak = sweep.peak_layer
    pers = None
    if s.persistence_n > 0 and peak != PR.EMBED_LAYER:
        probe = PR.fit_probe(h[:, layers.index(peak)], [u.label for u in utt], layer=peak, classes=classes)
        op = [u for u in utt if u.split == "test"][: s.persistence_n] or utt[: s.persistence_n]
        n_groups = len({u.group for u in op})
        pers = PR.persistence(model, [u.text for u in op], [u.label for u in op], s.persistence_tokens,
                              layer=peak, probe=probe, groups=[u.group for u in op], classes=classes,
                              cv=min(3, n_groups) if n_groups > 1 else 2, progress=ctx.progress)
    base = {}
    if zs is not None:
        base = {"zero-shot (free reply)": zs.accuracy, "zero-shot (constrained)": zs.constrained_accuracy}
    ctx.figure("probe accuracy per layer (−1 = embedding)", "probes.png", figures.probe_accuracy,
               {"probe (group CV)": sweep.accuracy_mean,
                **({"probe (fixed test split)": sweep.test_accuracy} if sweep.test_accuracy is not None else {})},
               layers=sweep.layers, chance=sweep.chance_uniform, baselines=base)
    ctx.table("probe summary", ["peak layer", "peak accuracy", "chance", "zero-shot", "zero-shot constrained"],
              [[peak, float(sweep.accuracy_mean.max()), sweep.chance_uniform,
                zs.accuracy if zs else None, zs.constrained_accuracy if zs else None]])
    return ProbesResult(sweep, zs, pers)


def plan(cfg) -> Plan:
    s = cfg.section("probes")
    n = s.max_utterances or 490
    return Plan(forward=n + s.persistence_n, generate=s.zero_shot_n + s.persistence_n,
                what="probes per layer; zero-shot; persistence")


STUDY = Study("probes", "Probes, zero-shot baseline, persistence", Config, run, plan,
              modules=("emocircuits.probes",), inputs=common.utterance_inputs)
