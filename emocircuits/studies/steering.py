"""Stage 03: steering with the emotion directions; (layer band, α) chosen on validation under
the fluency guard, the chosen setting and the unsteered model evaluated on test.

``layer_bands``: ``"paper"`` (the paper's band scaled to depth), ``"paper+early"`` (that band
and one of the same width starting at depth/5), or explicit bands. ``reference_strength``: also
evaluate the paper band at this α on test (a fixed reference beside the chosen setting)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..evaluate import MethodEvaluation
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

READOUT_PREFIX = "I feel"


@dataclass(frozen=True)
class Config:
    """``[steering]``: ``strengths`` are α in units of the residual rms at each steered position."""

    layer_bands: Literal["paper", "paper+early"] | tuple[tuple[int, ...], ...] = "paper"
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    site: Literal["resid_post", "resid_mid", "resid_pre"] = "resid_post"
    ppl_guard: float = 3.0  # perplexity ≤ this × the unsteered model's (validation)
    max_repeat: float = 0.3  # repeated-3-gram rate below this
    readout: bool = True  # the logit readout ("I feel") beside the judge
    n_examples: int = 12
    reference_strength: float | None = None  # also on test: the paper band at this α

    def __post_init__(self) -> None:
        if not self.strengths:
            raise ValueError("steering.strengths is empty")
        if self.ppl_guard <= 1.0:
            raise ValueError(f"steering.ppl_guard must be > 1, got {self.ppl_guard}")


@dataclass
class SteeringResult(Result):
    """The validation grid (one summary row per setting), the choice, and test evaluations."""

    grid: list[dict]
    chosen: dict
    test: MethodEvaluation
    test_unsteered: MethodEvaluation
    validation_unsteered_perplexity: float | None = None
    examples: list[dict] = field(default_factory=list)
    test_reference: MethodEvaluation | None = None  # the paper band at reference_strength
    reference: dict | None = None  # its setting ({"layers", "strength", "same_as_chosen"})
    validation_unsteered: MethodEvaluation | None = None  # the guard's reference (reused by circuits)

    def headline(self) -> dict:
        out = {"steering_accuracy": self.test.accuracy.overall,
               "no_intervention_accuracy": self.test_unsteered.accuracy.overall,
               "steering_perplexity": self.test.fluency.get("perplexity_geomean")}
        if self.reference is not None:
            ref = self.test if self.reference.get("same_as_chosen") else self.test_reference
            out["steering_reference_accuracy"] = ref.accuracy.overall if ref is not None else None
        return out


def bands(model, spec) -> list[list[int]]:
    from ..steering import paper_layers

    if spec in ("paper", "paper+early"):
        pl = list(paper_layers(model))
        if spec == "paper":
            return [pl]
        n = model.cfg.n_layers
        start = min(n // 5, n - len(pl))
        early = list(range(start, start + len(pl)))
        return [pl] if early == pl else [pl, early]
    return [common.check_layers(b, model.cfg.n_layers, "steering.layer_bands") for b in spec]


def summary_row(name: str, ev: MethodEvaluation, base: MethodEvaluation | None = None,
                max_ratio: float = 3.0, max_repeat: float = 0.3, **extra) -> dict:
    """One validation-grid row; ``fluent_accuracy`` when the unmodified model's ``base`` is given."""
    from ..evaluate import fluent_accuracy, reference_perplexity

    fl = (fluent_accuracy(ev, reference_perplexity(base), max_ratio=max_ratio, max_repeat=max_repeat)
          if base is not None else None)
    return {"setting": name, **extra, "fluent_accuracy": fl, "judge_accuracy": ev.accuracy.overall,
            "readout_accuracy": (ev.readout or {}).get("overall"),
            "readout_share": (ev.readout or {}).get("mean_target_share"),
            "perplexity": ev.fluency.get("perplexity_geomean"),
            "repeated_3gram": ev.fluency.get("repeated_3gram_rate_mean"), "n": ev.accuracy.n,
            "judge_by_emotion": dict(ev.accuracy.by_emotion)}


def run(ctx: StageContext) -> SteeringResult:
    from ..evaluate import choose_setting, passes_fluency_guard
    from ..steering import band_name, steer

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    dirs = ctx.upstream("directions").directions
    if s.site not in dirs.sites:
        raise ValueError(f"steering.site {s.site!r}: the directions have sites {dirs.sites}")
    bs = bands(model, s.layer_bands)

    def ctx_for(band, a):
        return lambda e: steer(model, dirs, band, a, emotion=e, site=s.site)

    evaluate = common.evaluator(ctx, emos, readout=s.readout, n_examples=s.n_examples)  # resumable per setting

    settings = [(b, float(a)) for b in bs for a in s.strengths]
    grid, rows, ref = {}, [], None
    if len(settings) > 1:
        val = common.records(ctx, "validation")
        base = evaluate(val, lambda e: None, "none", "validation")
        ref = base.fluency["perplexity_geomean"]
        rows.append(summary_row("none", base, base, s.ppl_guard, s.max_repeat, layers="none", strength=0.0,
                                passes_guard=True))
        for b, a in settings:
            ev = evaluate(val, ctx_for(b, a), f"steering {band_name(b)} α={a}", "validation")
            grid[(band_name(b), a)] = ev
            rows.append(summary_row(f"{band_name(b)} α={a}", ev, base, s.ppl_guard, s.max_repeat,
                                    layers=band_name(b), strength=a,
                                    passes_guard=passes_fluency_guard(ev, ref, max_ratio=s.ppl_guard,
                                                                      max_repeat=s.max_repeat)))
        (bname, alpha), ok = choose_setting(grid, base, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
        band = next(b for b in bs if band_name(b) == bname)
    else:
        (band, alpha), ok = settings[0], None
    test = common.records(ctx, "test")
    ev = evaluate(test, ctx_for(band, alpha), "steering", "test")
    ev0 = evaluate(test, lambda e: None, "none", "test")
    chosen = {"layers": band_name(band), "strength": alpha, "site": s.site,
              "swept": len(settings) > 1, "passes_fluency_guard": ok, "chosen_on": "validation"}
    res = SteeringResult(rows, chosen, ev, ev0, ref, ev.examples,
                         validation_unsteered=base if len(settings) > 1 else None)
    shown = [("steering", ev), ("no intervention", ev0)]
    if s.reference_strength is not None:
        pl, a_ref = bands(model, "paper")[0], float(s.reference_strength)
        same = pl == list(band) and a_ref == alpha
        res.reference = {"layers": band_name(pl), "strength": a_ref, "site": s.site,
                         "same_as_chosen": same}
        if not same:
            res.test_reference = evaluate(test, ctx_for(pl, a_ref), "steering (reference)", "test")
            shown.insert(1, (f"steering {band_name(pl)} α={a_ref:g} (reference)", res.test_reference))
    ctx.table("steering on the test set (setting chosen on validation)",
              ["method", "judge", "readout", "readout share", "perplexity", *emos, "n"],
              [[m, e.accuracy.overall, (e.readout or {}).get("overall"),
                (e.readout or {}).get("mean_target_share"), e.fluency.get("perplexity_geomean"),
                *[e.accuracy.by_emotion.get(x) for x in emos], e.accuracy.n] for m, e in shown])
    if rows:
        ctx.table("validation grid", ["setting", "fluent", "judge", "readout", "perplexity", "rep3", "passes guard"],
                  [[r["setting"], r["fluent_accuracy"], r["judge_accuracy"], r["readout_accuracy"], r["perplexity"],
                    r["repeated_3gram"], r["passes_guard"]] for r in rows])
        steered = [r for r in rows if r["setting"] != "none" and r["layers"] == rows[1]["layers"]]
        if len(steered) > 1:
            from ..viz import figures

            xs = [r["strength"] for r in steered]
            ctx.figure("steering sweep on validation", "steering_sweep.png", figures.sweep_curves, xs,
                       {"judge accuracy": [r["judge_accuracy"] for r in steered],
                        "readout accuracy": [r["readout_accuracy"] for r in steered]},
                       perplexity={"perplexity": [r["perplexity"] for r in steered]},
                       xlabel="α (× rms)", title=f"steering, layers {steered[0]['layers']}")
    return res


def plan(cfg) -> Plan:
    s = cfg.section("steering")
    n_b = ((2 if s.layer_bands == "paper+early" else 1) if isinstance(s.layer_bands, str)
           else len(s.layer_bands))
    n_set = n_b * len(s.strengths)
    nv = common.n_prompts(cfg, "validation") if n_set > 1 else 0
    nt = common.n_prompts(cfg, "test")
    e = len(cfg.emotions)  # the unmodified model's texts are generated once for every target
    gen = nv / e + nv * n_set + nt / e + nt * (1 + (s.reference_strength is not None))
    return Plan(generate=gen, eval_forward=common.text_forwards(cfg) * gen,  # fluency + readout per text
                what=(f"sweep {n_set} settings on validation; best on test" if n_set > 1
                      else "one setting (no sweep); steered vs unsteered on test"))


STUDY = Study("steering", "Steering (stage 03)", Config, run, plan, version=2, requires=("directions",),
              modules=("emocircuits.steering",), inputs=common.sev_inputs("validation", "test"))
