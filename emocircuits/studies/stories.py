"""Emotion directions that never read the emotion word: directions from implicit-emotion
stories (:mod:`emocircuits.story_directions`, the method of Sofroniew et al. 2026) beside the
paper's directions (the ``directions`` stage), on held-out stories and SEV event prompts.

The paper's directions are read at the last token of prompts that *name* the emotion
("Always reply in anger"), so they may encode the word rather than the state (the keyword
confound). The stories (``emocircuits/data/stories.py``) show an emotion without naming it.
This stage, per site and layer:

* splits the story corpus by topic (``story_splits``: train / validation / test);
* builds story directions from the train stories (token means from ``from_token``, centred
  over the emotions, the train neutral texts' top principal axes projected out up to
  ``denoise_share`` of their variance, unit length): ``StoriesResult.directions``, an
  ``EmotionDirections`` over ``[stories] emotions`` (default: the run's emotions) that the
  steering, components and circuits stages accept like the paper's;
* the valence–arousal geometry (``va_geometry``: PC1 vs human valence, PC2 vs human arousal,
  permutation p per layer and for the best layer) of those directions, or of all 20 story
  concepts with ``concepts = "all"``;
* the cosine between the two kinds of directions per layer and shared emotion;
* held-out decodability of both kinds on the *test stories*: each story's token-mean
  activation, centred on the mean of the train stories' emotion means, is projected onto each
  emotion's direction and the largest projection is the prediction (a nearest-direction
  classifier, no fitting); the layer is chosen on the validation stories, test accuracy is
  reported at that layer and per layer; story − paper is a paired difference over the test
  stories (bootstrap interval, sign-flip p), read out as a one-line ``verdict``;
* the valence read-out on SEV test event prompts (neutral template, no emotion word, last
  token): score = projection on v_happiness − mean of the negative emotions' directions
  (``emotions.NEGATIVE_EMOTIONS`` among the shared ones: anger, sadness, fear, disgust), AUC
  positive vs negative event per layer, for each kind.

The SEV prompts carry a valence label but no emotion label, so emotion decodability is only
measured on the stories. The held-out stories are in distribution for the story directions
(fitted on stories of other topics) and the SEV prompts for the paper's: neither comparison is
free of that asymmetry (docs/stages/stories.md).

``requires=("directions",)``, not optional: the comparison with the paper's directions is the
question this stage answers (the result always has it, and its default sites follow the
paper's), and the directions stage is cheap (one forward per train prompt) and runs first
when a preset asks only for ``stories``.

With ``steering_strengths``, this stage also steers with each kind of directions (the paper's
layer band, resid_post; α per kind chosen on validation by fluent accuracy) and compares them
on test with paired intervals (``StoriesResult.steering``). With ``circuit_lambdas`` (and the
circuits stage in the run) it assembles a circuit per emotion from the story directions on the
circuits stage's footing (σ, budget, allocation; influence, neuron and head scores and Δμ read
from stories) and compares it on test with the paper's circuit and with random circuits of its
sizes (``StoriesResult.circuits``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from ..emotions import NEGATIVE_EMOTIONS, POSITIVE_EMOTIONS
from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

KINDS = ("story", "paper")
POSITIVE_EMOTION = POSITIVE_EMOTIONS[0]  # the valence read-out: happiness − mean(NEGATIVE_EMOTIONS)
ALPHA = 0.05  # the verdict names a winner when p < ALPHA and the interval excludes 0


@dataclass(frozen=True)
class Config:
    """``[stories]``"""

    # the story directions' emotions (None: the run's emotions; any of the 20 story concepts);
    # the comparison with the paper's directions uses the ones the run also has
    emotions: tuple[str, ...] | None = None
    # the geometry's concepts: the story directions' emotions, or all 20 concepts (a second
    # set of story directions, centred over the 20)
    concepts: Literal["emotions", "all"] = "emotions"
    from_token: int = 10  # first token averaged (0 = BOS), story_directions.DEFAULT_FROM_TOKEN
    denoise_share: float = 0.5  # neutral variance share projected out (0: no denoising)
    # None: resid_post, and resid_mid when the paper's directions have it; the first site is the
    # headline site (geometry, layer choice, verdict)
    sites: tuple[Literal["resid_post", "resid_mid", "resid_pre", "attn_out", "mlp_out"], ...] | None = None
    max_per_emotion: int | None = None  # stories per emotion and split (None: all; small runs)
    max_neutral: int | None = None  # train neutral texts for the denoising (None: all)
    seed: int = 0  # the topic split and the permutation / bootstrap draws
    n_permutations: int = 10000  # the geometry's permutation test
    sev_scenarios: int | None = None  # SEV test scenarios for the valence AUC (None: data.n_test; 0: off)
    # steering with each kind of directions (the paper's layer band, resid_post): α chosen per
    # kind on validation by fluent accuracy, both on test with paired intervals; () = off
    steering_strengths: tuple[float, ...] = ()
    # circuits assembled from the story directions beside the circuits stage's (needs it and
    # resid_mid + resid_post story directions at every layer): the λ grid, chosen on validation
    # by fluent accuracy; () = off
    circuit_lambdas: tuple[float, ...] = ()
    circuit_budget: int | None = None  # None: the budget the circuits stage chose on validation
    circuit_influence_scenarios: int | None = None  # None: circuits.n_influence_scenarios
    circuit_random: int | None = None  # random circuits of the story circuit's sizes (None: circuits.random_controls)
    ppl_guard: float = 3.0  # fluent: perplexity ≤ this × the unsteered texts' median
    max_repeat: float = 0.3  # fluent: repeated-3-gram rate below this

    def __post_init__(self) -> None:
        from ..data.stories import STORY_EMOTIONS

        if self.emotions is not None:
            emos = list(self.emotions)
            bad = [e for e in emos if e not in STORY_EMOTIONS]
            if bad:
                raise ValueError(f"stories.emotions: unknown concept(s) {bad}; the story concepts are "
                                 f"{', '.join(STORY_EMOTIONS)}")
            if len(emos) < 2 or len(set(emos)) != len(emos):
                raise ValueError(f"stories.emotions must list >= 2 distinct concepts, got {emos}")
        if self.from_token < 0:
            raise ValueError(f"stories.from_token must be >= 0, got {self.from_token}")
        if not 0.0 <= self.denoise_share <= 1.0:
            raise ValueError(f"stories.denoise_share must be in [0, 1], got {self.denoise_share}")
        if self.sites is not None and (not self.sites or len(set(self.sites)) != len(self.sites)):
            raise ValueError(f"stories.sites must list distinct sites, got {list(self.sites)}")
        if self.max_per_emotion is not None and self.max_per_emotion < 1:
            raise ValueError("stories.max_per_emotion must be >= 1")
        if self.max_neutral is not None and self.max_neutral < 1:
            raise ValueError("stories.max_neutral must be >= 1 (denoise_share = 0 turns denoising off)")
        if self.n_permutations < 1:
            raise ValueError("stories.n_permutations must be >= 1")
        if any(a <= 0 for a in self.steering_strengths):
            raise ValueError(f"stories.steering_strengths must be > 0, got {list(self.steering_strengths)}")
        if any(x <= 0 for x in self.circuit_lambdas):
            raise ValueError(f"stories.circuit_lambdas must be > 0, got {list(self.circuit_lambdas)}")
        for name in ("circuit_budget", "circuit_influence_scenarios"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"stories.{name} must be >= 1")
        if self.circuit_random is not None and self.circuit_random < 0:
            raise ValueError("stories.circuit_random must be >= 0")
        if self.sev_scenarios is not None and self.sev_scenarios < 0:
            raise ValueError("stories.sev_scenarios must be >= 0")


@dataclass
class StoriesResult(Result):
    """Story directions, their valence–arousal geometry, and the comparison with the paper's
    directions (cosines, held-out story decoding, SEV valence AUC) per site and layer.

    ``decoding[kind][site]``: ``{"test": [accuracy per layer], "test_raw": [...] (no
    centring), "validation": [...]}``; ``chosen_layer[kind]`` the validation argmax at the
    headline site, ``test_at_chosen[kind]`` its test accuracy; ``comparison`` story − paper
    there (paired over test stories); ``valence_auc[kind][site]``: AUC per layer;
    ``cosine[site][emotion]``: cos(story, paper) per layer."""

    directions: object  # EmotionDirections from the train stories (stories.emotions)
    geometry: object | None  # VAGeometry at the headline site (None: fewer than 3 concepts)
    concept_directions: object | None = None  # EmotionDirections over all concepts (concepts = "all")
    sites: list = field(default_factory=list)
    layers: list = field(default_factory=list)
    shared_emotions: list = field(default_factory=list)
    paper_method: str = ""
    cosine: dict = field(default_factory=dict)
    decoding: dict = field(default_factory=dict)
    n_test: int = 0
    n_validation: int = 0
    chance: float | None = None
    chosen_layer: dict = field(default_factory=dict)
    test_at_chosen: dict = field(default_factory=dict)
    comparison: object | None = None  # stats.Estimate: story − paper accuracy (paired)
    verdict: str = ""
    test_ids: list = field(default_factory=list)
    test_labels: list = field(default_factory=list)
    test_predictions: dict = field(default_factory=dict)  # kind -> labels at its chosen layer
    valence_auc: dict = field(default_factory=dict)
    negative_emotions: list = field(default_factory=list)
    n_sev: dict = field(default_factory=dict)  # {"positive": n, "negative": n}
    n_forwards: int = 0
    notes: list = field(default_factory=list)
    # steering with each kind: {"grid": [row per kind × α], "chosen": {kind: α}, "layers": band,
    # "comparison": MethodComparison.to_dict(), "examples": {method: [...]}} (empty: not run)
    steering: dict = field(default_factory=dict)
    # circuits from each kind (_circuit_side_by_side): {"grid", "chosen", "sizes",
    # "overlap_with_paper", "comparison": MethodComparison.to_dict(), ...} (empty: not run)
    circuits: dict = field(default_factory=dict)

    def headline(self) -> dict:
        out: dict = {}
        g = self.geometry
        if g is not None:
            for axis in ("valence", "arousal"):
                r = np.asarray(getattr(g, f"r_{axis}"), dtype=float)
                best = getattr(g, f"best_layer_{axis}")
                out[f"stories_va_best_layer_{axis}"] = best if best >= 0 else None
                out[f"stories_va_r_{axis}"] = float(np.nanmax(r)) if np.isfinite(r).any() else None
                out[f"stories_va_p_{axis}_best"] = getattr(g, f"p_{axis}_best")
        site = self.sites[0] if self.sites else None
        for kind in KINDS:
            d = self.decoding.get(kind, {}).get(site)
            if d:
                out[f"stories_decoding_{kind}_test_max"] = max(d["test"])
            if kind in self.test_at_chosen:
                out[f"stories_decoding_{kind}_test"] = self.test_at_chosen[kind]
                out[f"stories_decoding_{kind}_layer"] = self.chosen_layer[kind]
            a = self.valence_auc.get(kind, {}).get(site)
            if a:
                fin = [x for x in a if x is not None and np.isfinite(x)]
                out[f"stories_valence_auc_{kind}_max"] = max(fin) if fin else None
        if self.chance is not None:
            out["stories_decoding_chance"] = self.chance
        c = self.cosine.get(site) if site else None
        if c:
            per_layer = np.mean(np.asarray(list(c.values()), dtype=float), axis=0)
            out["stories_cosine_with_paper_max"] = float(per_layer.max())
        if self.comparison is not None:
            out["stories_minus_paper_decoding"] = self.comparison.value
        for row in (self.circuits.get("comparison") or {}).get("table", []):
            if row["method"] in ("circuit (stories)", "circuit (paper)"):
                out[f"stories_fluent_accuracy_{row['method'].replace(' ', '_')}"] = row["fluent_accuracy"]
        return out


# ============================================================================ the stories used


@lru_cache(maxsize=4)
def _splits(seed: int):
    from ..data.stories import load_stories, story_splits

    return story_splits(load_stories(), seed=seed)


@dataclass(frozen=True)
class _Selection:
    emotions: list  # the story directions' emotions
    shared: list  # also the run's (the comparison)
    train: list
    neutral: list
    concepts: list  # all concepts (concepts = "all"), else []
    concept_train: list
    centre: list  # train stories of the shared emotions (the centring mean)
    validation: list
    test: list


def _pick(stories, emotions, cap):
    out = []
    for e in emotions:
        rows = [x for x in stories if x.emotion == e]
        out += rows if cap is None else rows[:cap]
    return out


def select(s: Config, run_emotions) -> _Selection:
    """The stories the stage reads: per split and emotion, the first ``max_per_emotion`` in
    file order of the topic split of the whole builtin corpus (``story_splits``, ``seed``)."""
    from ..data.stories import STORY_EMOTIONS

    sp = _splits(s.seed)
    emos = list(s.emotions) if s.emotions is not None else list(run_emotions)
    shared = [e for e in emos if e in list(run_emotions)]
    neutral = [x for x in sp["train"] if x.is_neutral]
    if s.max_neutral is not None:
        neutral = neutral[: s.max_neutral]
    concepts = [e for e in STORY_EMOTIONS if any(x.emotion == e for x in sp["train"])] if s.concepts == "all" else []
    cap = s.max_per_emotion
    return _Selection(emos, shared, _pick(sp["train"], emos, cap), neutral, concepts,
                      _pick(sp["train"], concepts, cap), _pick(sp["train"], shared, cap),
                      _pick(sp["validation"], shared, cap), _pick(sp["test"], shared, cap))


def _n_sev(cfg, s: Config) -> int:
    n = common.n_scenarios(cfg, "test") if s.sev_scenarios is None else s.sev_scenarios
    return 2 * n  # positive and negative event of each scenario


def _forwards(sel: _Selection, s: Config, n_sev: int) -> int:
    neutral = len(sel.neutral) if s.denoise_share > 0 else 0
    n = len(sel.train) + neutral
    if sel.concepts:
        n += len(sel.concept_train) + neutral
    if len(sel.shared) >= 2:
        n += len(sel.centre) + len(sel.validation) + len(sel.test)
        if POSITIVE_EMOTION in sel.shared and any(e in NEGATIVE_EMOTIONS for e in sel.shared):
            n += n_sev
    return n


# ============================================================================ the numbers


def nearest_direction(means, directions, centre=None):
    """Predicted emotion index per layer: ``argmax_e ⟨m − μ, v_e⟩``.

    ``means`` ``[n, layer, d]``; ``directions`` ``[emotion, layer, d]``; ``centre`` ``[layer, d]``
    (μ; None: 0). Returns ``[layer, n]`` int indices into the emotions."""
    import torch

    m = means.double()
    if centre is not None:
        m = m - centre.double()[None]
    scores = torch.einsum("nld,eld->lne", m, directions.double())
    return scores.argmax(-1).numpy()


def accuracy_per_layer(pred, labels) -> list[float]:
    y = np.asarray(labels)
    return [float(np.mean(p == y)) for p in pred]


def valence_axis(dirs, site: str, negative) -> object:
    """``v_happiness − mean_{e ∈ negative} v_e`` per layer ``[layer, d]``."""
    return dirs.get(POSITIVE_EMOTION, site).double() - dirs.tensor(site, list(negative)).double().mean(0)


def auc_per_layer(acts, axis, labels) -> list[float]:
    """ROC AUC of ``⟨h, w⟩`` for the binary ``labels`` (1 = positive event), per layer."""
    import torch
    from sklearn.metrics import roc_auc_score

    scores = torch.einsum("nld,ld->ln", acts.double(), axis.double()).numpy()
    y = np.asarray(labels)
    if len(set(y.tolist())) < 2:
        return [float("nan")] * scores.shape[0]
    return [float(roc_auc_score(y, sc)) for sc in scores]


def _verdict(site, acc, est, n, chance) -> str:
    s, p = acc["story"], acc["paper"]
    head = (f"held-out test stories (n = {n}, chance {chance:.2f}, {site}, layer chosen on validation): "
            f"story directions {s[1]:.2f} (layer {s[0]}) vs paper directions {p[1]:.2f} (layer {p[0]}); "
            f"story − paper {100 * est.value:+.1f} points [{100 * est.low:.1f}, {100 * est.high:.1f}]"
            + (f", p = {est.p_value:.3g}" if est.p_value is not None else ""))
    clear = est.p_value is not None and est.p_value < ALPHA and (est.low > 0 or est.high < 0)
    if clear and est.value > 0:
        return head + ": the story directions decode the held-out stories better"
    if clear and est.value < 0:
        return head + ": the paper's directions decode the held-out stories better"
    return head + f": no clear difference at this n (p ≥ {ALPHA:g} or the interval includes 0)"


# ============================================================================ the stage


def run(ctx: StageContext) -> StoriesResult:
    import torch

    from .. import story_directions as SD
    from ..activations import collect
    from ..data.stories import human_va_unit
    from ..prompts import neutral_prompts
    from ..viz import figures

    model, s = ctx.model, ctx.settings
    bs = common.batch_size(ctx)
    paper_res = ctx.upstream("directions")
    paper = paper_res.directions
    sel = select(s, ctx.config.emotions)
    sites = list(s.sites) if s.sites is not None else (
        ["resid_post", *(["resid_mid"] if "resid_mid" in paper.sites else [])])
    main = sites[0]
    notes: list[str] = []
    kw = dict(sites=sites, from_token=s.from_token, neutral=sel.neutral, denoise_share=s.denoise_share,
              batch_size=bs, progress=ctx.progress)
    dirs = SD.story_directions(model, sel.train, emotions=sel.emotions, **kw)
    n_fwd = len(sel.train) + (len(sel.neutral) if s.denoise_share > 0 else 0)
    concept_dirs = None
    if sel.concepts:
        concept_dirs = SD.story_directions(model, sel.concept_train, emotions=sel.concepts, **kw)
        n_fwd += len(sel.concept_train) + (len(sel.neutral) if s.denoise_share > 0 else 0)

    # -- geometry (headline site)
    geo_dirs = concept_dirs if concept_dirs is not None else dirs
    geo = None
    rated = [e for e in geo_dirs.emotions if e in human_va_unit()]
    if len(rated) >= 3:
        geo = SD.va_geometry(geo_dirs, site=main, n_permutations=s.n_permutations, seed=s.seed)
    else:
        notes.append(f"geometry: not computed, {len(rated)} concepts (needs >= 3; set stories.concepts = \"all\")")

    layers = [x for x in dirs.layers if x in paper.layers]
    shared = [e for e in sel.shared if e in paper.emotions]
    both = [x for x in sites if x in paper.sites]
    res = StoriesResult(dirs, geo, concept_dirs, sites, layers, shared,
                        str(paper.meta.get("method", "")), notes=notes)

    # -- cosine story vs paper, per site, emotion, layer
    li_s = [dirs.layers.index(x) for x in layers]
    li_p = [paper.layers.index(x) for x in layers]
    for site in both:
        a = dirs.tensor(site, shared)[:, li_s].double()
        b = paper.tensor(site, shared)[:, li_p].double()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        res.cosine[site] = {e: cos[i].tolist() for i, e in enumerate(shared)}

    if len(shared) < 2:
        notes.append(f"decoding and valence AUC: not run; the story and paper directions share "
                     f"{shared or 'no emotion'} (need >= 2)")
    else:
        _decode(ctx, res, sel, dirs, paper, both, li_s, li_p)
        n_fwd += len(sel.centre) + len(sel.validation) + len(sel.test)
        # -- SEV valence read-out
        n_sc = common.n_scenarios(ctx.config, "test") if s.sev_scenarios is None else s.sev_scenarios
        neg = [e for e in shared if e in NEGATIVE_EMOTIONS]
        res.negative_emotions = neg
        if n_sc and POSITIVE_EMOTION in shared and neg:
            recs = common.records(ctx, "test", n_sc)
            prompts = neutral_prompts(model, recs, valences=("positive", "negative"))
            acts = collect(model, prompts, sites, position="last", batch_size=bs, progress=ctx.progress)
            n_fwd += len(prompts)
            y = [1 if p.valence == "positive" else 0 for p in prompts]
            res.n_sev = {"positive": sum(y), "negative": len(y) - sum(y)}
            for kind, d, li in (("story", dirs, li_s), ("paper", paper, li_p)):
                res.valence_auc[kind] = {}
                for site in (sites if kind == "story" else both):
                    h = acts[site][:, [acts.layers[site].index(x) for x in layers]]
                    res.valence_auc[kind][site] = auc_per_layer(h, valence_axis(d, site, neg)[li], y)
        elif n_sc:
            notes.append(f"valence AUC: not run; needs {POSITIVE_EMOTION!r} and a negative emotion "
                         f"among the shared emotions {shared}")
    res.n_forwards = n_fwd
    if s.steering_strengths and shared:
        res.steering = _steering_side_by_side(ctx, paper, dirs, shared)
    if s.circuit_lambdas:
        if ctx.upstream("circuits") is None:
            notes.append("story circuits: not built; stories.circuit_lambdas needs the circuits stage in the run")
        elif shared != list(ctx.config.emotions):
            notes.append(f"story circuits: not built; the story directions' emotions {shared} must be the "
                         f"run's {list(ctx.config.emotions)} (the circuits stage's comparison)")
        else:
            res.circuits = _circuit_side_by_side(ctx, dirs, sel, shared)
    _report(ctx, res, figures)
    return res


def _steering_side_by_side(ctx: StageContext, paper, story, emotions: list[str]) -> dict:
    """Steer with the paper's and the story directions on the paper's layer band (resid_post):
    each kind's α from ``stories.steering_strengths`` chosen on validation by fluent accuracy
    (``evaluate.choose_setting``), then both and the unsteered model on test, compared with
    paired 95 % intervals over scenarios (``evaluate.compare_methods``). When the steering
    stage ran on that band and site, its unsteered texts and its paper-direction choice (its
    own α grid) and test texts are reused."""
    from ..evaluate import (
        choose_setting,
        compare_methods,
        passes_fluency_guard,
    )
    from ..steering import band_name, paper_layers, steer
    from .steering import summary_row

    model, s = ctx.model, ctx.settings
    band = list(paper_layers(model))

    evaluate = common.evaluator(ctx, emotions, key_prefix="steering/")

    def steered(d, a):
        return lambda e: steer(model, d, band, a, emotion=e, site="resid_post")

    val, test = common.records(ctx, "validation"), common.records(ctx, "test")
    # the steering stage's paper-direction texts when it steered the same band and site (its α
    # chosen on validation by the same fluent criterion, over its own grid): not generated twice
    st = ctx.upstream("steering")
    reuse = (st is not None and st.validation_unsteered is not None and st.chosen.get("site") == "resid_post"
             and st.chosen.get("layers") == band_name(band) and list(emotions) == list(ctx.config.emotions))
    base = st.validation_unsteered if reuse else evaluate(val, lambda e: None, "none", "validation")
    ref = base.fluency["perplexity_geomean"]
    rows = [summary_row("none", base, base, s.ppl_guard, s.max_repeat, kind="none", strength=0.0)]
    chosen = {}
    evals = {"none": st.test_unsteered if reuse else evaluate(test, lambda e: None, "none", "test")}
    for kind, d in (("paper", paper), ("stories", story)):
        if kind == "paper" and reuse:
            rows += [{**r, "setting": f"paper α={r['strength']:g}", "kind": "paper"} for r in st.grid
                     if r.get("layers") == band_name(band)]
            chosen[kind] = {"strength": st.chosen["strength"], "passes_fluency_guard": st.chosen["passes_fluency_guard"],
                            "chosen_on": "validation", "from": "the steering stage"}
            evals["steering (paper)"] = st.test
            continue
        grid = {}
        for a in s.steering_strengths:
            ev = evaluate(val, steered(d, float(a)), f"{kind} α={a:g}", "validation")
            grid[float(a)] = ev
            rows.append(summary_row(f"{kind} α={a:g}", ev, base, s.ppl_guard, s.max_repeat, kind=kind,
                                    strength=float(a), passes_guard=passes_fluency_guard(
                                        ev, ref, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)))
        a, ok = choose_setting(grid, base, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
        chosen[kind] = {"strength": a, "passes_fluency_guard": ok, "chosen_on": "validation"}
        evals[f"steering ({kind})"] = evaluate(test, steered(d, a), f"steering ({kind})", "test")
    cmp = compare_methods(evals, focus="steering (stories)", against=["steering (paper)", "none"],
                          max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    return {"grid": rows, "chosen": chosen, "layers": band_name(band), "site": "resid_post",
            "emotions": list(emotions), "comparison": cmp.to_dict(),
            "examples": {m: ev.examples for m, ev in evals.items()}}


def _circuit_side_by_side(ctx: StageContext, story, sel: _Selection, emotions: list[str]) -> dict:
    """Circuits assembled from the story directions beside the circuits stage's (the paper's
    directions), on the same footing: the same σ, per-sublayer budget (the circuits stage's
    choice), allocation and λ grid (``circuits.lambdas``, chosen on validation by fluent
    accuracy); influence on ``circuit_influence_scenarios`` neutral train scenarios with the
    story directions; neuron scores C_mean = mean g · β from the train stories' token means;
    head scores the exact closed-form ablation score at the train stories' last token; Δμ
    from the train stories (``story_difference_vectors``). On test: the story circuit, random
    circuits of its per-layer sizes, against the paper's circuit, its random circuits and the
    unmodulated model from the circuits stage (paired 95 % intervals over scenarios)."""
    import torch

    from .. import circuits as C
    from .. import components as K
    from .. import sites as S
    from ..evaluate import choose_setting, compare_methods, passes_fluency_guard
    from ..prompts import neutral_prompts
    from ..run.plan import INFLUENCE_BATCH, INFLUENCE_MAX_ROWS
    from ..story_directions import story_difference_vectors
    from .steering import summary_row

    model, s = ctx.model, ctx.settings
    circ = ctx.upstream("circuits")
    cs = ctx.config.section("circuits")
    n = model.cfg.n_layers
    missing = [x for x in ("resid_mid", "resid_post") if x not in story.sites]
    if missing or story.layers != list(range(n)):
        raise ValueError(f"stories.circuit_lambdas: the story circuit needs story directions at resid_mid and "
                         f"resid_post at every layer (stories.sites = {story.sites}, layers {story.layers[:3]}...)")
    bs = common.batch_size(ctx)
    budget = int(s.circuit_budget if s.circuit_budget is not None else circ.chosen["budget_per_sublayer"])
    n_infl = s.circuit_influence_scenarios if s.circuit_influence_scenarios is not None else cs.n_influence_scenarios
    n_rand = s.circuit_random if s.circuit_random is not None else cs.random_controls
    train = [x for x in sel.train if x.emotion in emotions]
    sdv = story_difference_vectors(model, train, emotions, from_token=s.from_token, batch_size=bs,
                                   progress=ctx.progress)
    dv = sdv.difference
    v_mid, v_post = story.tensor("resid_mid", emotions), story.tensor("resid_post", emotions)
    W_out = torch.stack([S.W_out(model, L).detach().float().cpu() for L in range(n)])
    nscores = torch.stack([(sdv.mlp_means[i].double() * K.neuron_betas_from_weights(W_out, v_post[i])).float()
                           for i in range(len(emotions))])
    hscores = K.head_ablation_importance_closed_form(model, [x.text for x in train], [x.emotion for x in train],
                                                     v_mid, emotions, batch_size=bs, progress=ctx.progress).mean
    infl_prompts = neutral_prompts(model, common.records(ctx, "train", n_infl))
    infl = ctx.checkpoint("circuit/influence", lambda: C.sublayer_influence(
        model, infl_prompts, v_mid, v_post, circ.sigma, alphas=tuple(cs.influence_alphas), emotions=emotions,
        batch_size=min(bs, INFLUENCE_BATCH), max_rows=INFLUENCE_MAX_ROWS, progress=ctx.progress))
    circuits = {e: C.assemble_circuit(e, infl.influence[i], nscores[i], hscores[i], dv.mlp[i], dv.z[i],
                                      budget_per_sublayer=budget, meta={"directions": "stories"})
                for i, e in enumerate(emotions)}
    evaluate = common.evaluator(ctx, emotions, readout=cs.readout, n_examples=cs.n_examples,
                                key_prefix="circuit/")

    def modulated(cc, lam):
        return lambda e: C.modulate(model, cc[e], lam)

    val, test = common.records(ctx, "validation"), common.records(ctx, "test")
    steer_res = ctx.upstream("steering")
    base = (steer_res.validation_unsteered if steer_res is not None and steer_res.validation_unsteered is not None
            else evaluate(val, lambda e: None, "none", "validation"))
    ref = base.fluency["perplexity_geomean"]
    rows = [summary_row("none", base, base, s.ppl_guard, s.max_repeat, strength=0.0, passes_guard=True)]
    grid = {}
    for lam in s.circuit_lambdas:
        ev = evaluate(val, modulated(circuits, float(lam)), f"stories λ={lam:g}", "validation")
        grid[float(lam)] = ev
        rows.append(summary_row(f"stories λ={lam:g}", ev, base, s.ppl_guard, s.max_repeat, strength=float(lam),
                                budget=budget, passes_guard=passes_fluency_guard(
                                    ev, ref, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)))
    lam, ok = choose_setting(grid, base, max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    paper_ev = circ.evaluations
    evals = {"none": paper_ev["none"], "circuit (paper)": paper_ev["circuit"],
             "circuit (stories)": evaluate(test, modulated(circuits, lam), "circuit (stories)", "test")}
    for r in range(n_rand):
        rc = {e: C.random_circuit(circuits[e], dv.mlp[i], dv.z[i], seed=r) for i, e in enumerate(emotions)}
        evals[f"random circuit {r} (stories sizes)"] = evaluate(test, modulated(rc, lam), f"random circuit {r}", "test")
    cmp = compare_methods(evals, focus="circuit (stories)", against=["circuit (paper)", "random circuit", "none"],
                          max_ratio=s.ppl_guard, max_repeat=s.max_repeat)
    paper_cmp = circ.comparison
    paper_random = [v for v in (paper_cmp.verdicts if paper_cmp is not None else [])
                    if v.startswith("circuit ") and "random circuit" in v]
    overlap = {e: C.overlap(circuits[e], circ.circuits[e]) for e in emotions if e in circ.circuits}
    return {"grid": rows, "chosen": {"lambda": lam, "passes_fluency_guard": ok, "chosen_on": "validation",
                                     "budget_per_sublayer": budget, "paper_lambda": circ.chosen.get("lambda")},
            "influence_scenarios": n_infl, "paper_influence_scenarios": cs.n_influence_scenarios,
            "random_controls": n_rand, "emotions": list(emotions),
            "sizes": {e: {"neurons": c.n_neurons, "heads": c.n_heads} for e, c in circuits.items()},
            "overlap_with_paper": overlap, "comparison": cmp.to_dict(), "paper_random_verdicts": paper_random,
            "head_scores": "exact closed-form zero-ablation score at the train stories' last token",
            "examples": {m: ev.examples for m, ev in evals.items() if not m.startswith("random")}}


def _decode(ctx, res, sel, dirs, paper, both, li_s, li_p) -> None:
    """Held-out decoding of both kinds (``res.decoding``, the layer choice, the verdict)."""
    from .. import story_directions as SD
    from ..stats import paired_difference

    s, sites, layers, shared = ctx.settings, res.sites, res.layers, res.shared_emotions
    idx = {e: i for i, e in enumerate(shared)}
    centre, valid, test = ([x for x in rows if x.emotion in idx]
                           for rows in (sel.centre, sel.validation, sel.test))
    means, lay, _ = SD.story_token_means(ctx.model, [*centre, *valid, *test], sites, from_token=s.from_token,
                                         batch_size=common.batch_size(ctx), progress=ctx.progress,
                                         desc="held-out story means")
    li_m = [lay.index(x) for x in layers]
    n_c, n_v = len(centre), len(valid)
    y_c = [idx[x.emotion] for x in centre]
    y_v = [idx[x.emotion] for x in valid]
    y_t = [idx[x.emotion] for x in test]
    res.n_test, res.n_validation, res.chance = len(y_t), len(y_v), 1.0 / len(shared)
    res.test_ids = [x.id for x in test]
    res.test_labels = [x.emotion for x in test]
    preds_main: dict = {}
    for kind, d, li in (("story", dirs, li_s), ("paper", paper, li_p)):
        res.decoding[kind] = {}
        for site in (sites if kind == "story" else both):
            m = means[site][:, li_m]
            mc = m[:n_c]
            # μ: the mean of the train stories' emotion means (equal weight per emotion)
            mu = _mean_of_means(mc, y_c, len(shared))
            v = d.tensor(site, shared)[:, li]
            pv = nearest_direction(m[n_c:n_c + n_v], v, mu)
            pt = nearest_direction(m[n_c + n_v:], v, mu)
            pr = nearest_direction(m[n_c + n_v:], v, None)
            res.decoding[kind][site] = {"validation": accuracy_per_layer(pv, y_v),
                                        "test": accuracy_per_layer(pt, y_t),
                                        "test_raw": accuracy_per_layer(pr, y_t)}
            if site == sites[0]:
                preds_main[kind] = pt
    if sites[0] not in both:
        res.notes.append(f"verdict: the paper's directions have no {sites[0]!r} (sites {paper.sites})")
        return
    acc = {}
    correct = {}
    for kind in ("story", "paper"):
        val = res.decoding[kind][sites[0]]["validation"]
        j = int(np.argmax(val))  # ties: the earliest layer
        res.chosen_layer[kind] = layers[j]
        res.test_at_chosen[kind] = res.decoding[kind][sites[0]]["test"][j]
        res.test_predictions[kind] = [shared[k] for k in preds_main[kind][j]]
        correct[kind] = (preds_main[kind][j] == np.asarray(y_t)).astype(float)
        acc[kind] = (layers[j], res.test_at_chosen[kind])
    res.comparison = paired_difference(correct["story"], correct["paper"], res.test_ids, seed=s.seed)
    res.verdict = _verdict(sites[0], acc, res.comparison, res.n_test, res.chance)


def _mean_of_means(x, labels, k):
    """Mean over classes of the class means of ``x`` ``[n, ...]`` (classes 0..k−1)."""
    import torch

    y = torch.as_tensor(labels)
    return torch.stack([x[y == c].mean(0) for c in range(k)]).mean(0)


def _report(ctx: StageContext, res: StoriesResult, figures) -> None:
    geo, main = res.geometry, res.sites[0]
    if res.verdict:
        ctx.notes["keyword control"] = res.verdict
        ctx.table("keyword control: which directions decode the held-out stories better (the stories "
                  "are in distribution for the story directions)", ["verdict"], [[res.verdict]])
    if geo is not None:
        df = geo.to_dataframe()
        ctx.table(f"valence–arousal geometry of the story directions ({main}, {len(geo.emotions)} concepts)",
                  list(df.columns), [[int(r[0]), *map(float, r[1:])] for r in df.itertuples(index=False)])
        ctx.table("best layers of the geometry", ["axis", "best layer", "r", "p at that layer",
                                                  "p corrected for the layer choice"],
                  [[axis, getattr(geo, f"best_layer_{axis}"),
                    _at(geo, axis, "r"), _at(geo, axis, "p"), getattr(geo, f"p_{axis}_best")]
                   for axis in ("valence", "arousal")])
        ctx.figure("valence–arousal geometry of the story directions per layer", "va_geometry.png", geo.plot)
        from ..story_directions import va_scatter

        ctx.figure(f"story concepts in PC1 × PC2 at the best valence layer ({geo.best_layer_valence})",
                   "va_scatter.png", va_scatter, geo, geo.best_layer_valence)
    for site, per in res.cosine.items():
        ctx.table(f"cosine between story and paper directions per layer ({site})",
                  ["layer", *per, "mean"],
                  [[layer, *[per[e][j] for e in per], float(np.mean([per[e][j] for e in per]))]
                   for j, layer in enumerate(res.layers)])
        ctx.figure(f"cosine between story and paper directions ({site})", f"cosine_{site}.png",
                   figures.sweep_curves, res.layers, per, xlabel="layer", ylabel="cosine",
                   title=f"cos(story, paper) per emotion ({site})", ylim=(-1.02, 1.02))
    dec = res.decoding
    if dec:
        cols = [(k, site) for k in KINDS for site in dec.get(k, {})]
        ctx.table(f"nearest-direction decoding of the held-out test stories (n = {res.n_test}, "
                  f"chance {res.chance:.3f}; centred on the train stories' mean)",
                  ["layer", "n", "chance", *[f"{k} {site}" for k, site in cols],
                   *[f"{k} {site} (raw)" for k, site in cols]],
                  [[layer, res.n_test, res.chance, *[dec[k][site]["test"][j] for k, site in cols],
                    *[dec[k][site]["test_raw"][j] for k, site in cols]]
                   for j, layer in enumerate(res.layers)])
        if res.chosen_layer:
            ctx.table(f"test accuracy at the layer chosen on the validation stories (n = {res.n_validation}), "
                      f"{main}", ["directions", "layer", "validation accuracy", "test accuracy", "n test"],
                      [[k, res.chosen_layer[k], max(dec[k][main]["validation"]), res.test_at_chosen[k],
                        res.n_test] for k in KINDS])
        curves = {f"{k} {site}": dec[k][site]["test"] for k, site in cols}
        ctx.figure("held-out story decoding per layer (test stories)", "story_decoding.png",
                   figures.probe_accuracy, curves, layers=res.layers, chance=res.chance,
                   title="nearest-direction decoding of held-out stories")
    if res.valence_auc:
        cols = [(k, site) for k in KINDS for site in res.valence_auc.get(k, {})]
        ctx.table(f"valence read-out on SEV test events: AUC positive vs negative "
                  f"(n = {res.n_sev.get('positive')} + {res.n_sev.get('negative')}; "
                  f"{POSITIVE_EMOTION} − mean({', '.join(res.negative_emotions)}))",
                  ["layer", *[f"{k} {site}" for k, site in cols]],
                  [[layer, *[res.valence_auc[k][site][j] for k, site in cols]]
                   for j, layer in enumerate(res.layers)])
        ctx.figure("valence read-out AUC on SEV test events per layer", "valence_auc.png", figures.sweep_curves,
                   res.layers, {f"{k} {site}": res.valence_auc[k][site] for k, site in cols},
                   xlabel="layer", ylabel="AUC", title="AUC positive vs negative event", ylim=(0.0, 1.02))
    st = res.steering
    if st:
        pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
        ctx.table(f"steering with each kind of directions ({st['layers']}, {st['site']}): validation grid",
                  ["setting", "fluent", "judge", "readout", "perplexity", "rep3", "passes guard", "n"],
                  [[r["setting"], r["fluent_accuracy"], r["judge_accuracy"], r["readout_accuracy"], r["perplexity"],
                    r["repeated_3gram"], r.get("passes_guard"), r["n"]] for r in st["grid"]])
        cmp = st["comparison"]
        ctx.table("steering with each kind on the test set (α chosen on validation), 95 % intervals over scenarios",
                  ["method", "α", "fluent accuracy %", "95 % interval", "raw accuracy %", "readout %",
                   "perplexity (median)", "n", "scenarios"],
                  [[r["method"], st["chosen"].get(r["method"].removeprefix("steering (").rstrip(")"), {}).get("strength"),
                    pct(r["fluent_accuracy"]), f"[{pct(r['fluent_low'])}, {pct(r['fluent_high'])}]",
                    pct(r["accuracy"]), pct(r["readout_accuracy"]), r["perplexity_median"], r["n"], r["n_scenarios"]]
                   for r in cmp["table"]])
        if cmp["verdicts"]:
            ctx.table("steering verdicts (paired by scenario, event and target; permutation p)", ["verdict"],
                      [[v] for v in cmp["verdicts"]])
    ci = res.circuits
    if ci:
        pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
        ch = ci["chosen"]
        ctx.table(f"circuit from the story directions: λ on validation (budget {ch['budget_per_sublayer']} per "
                  f"sublayer, influence on {ci['influence_scenarios']} scenarios)",
                  ["setting", "fluent", "judge", "readout", "perplexity", "rep3", "passes guard", "n"],
                  [[r["setting"], r["fluent_accuracy"], r["judge_accuracy"], r["readout_accuracy"], r["perplexity"],
                    r["repeated_3gram"], r.get("passes_guard"), r["n"]] for r in ci["grid"]])
        cmp = ci["comparison"]
        ctx.table(f"circuits from each kind of directions on the test set (story λ = {ch['lambda']:g}, paper "
                  f"λ = {ch['paper_lambda']}, chosen on validation), 95 % intervals over scenarios",
                  ["method", "fluent accuracy %", "95 % interval", "raw accuracy %", "readout %",
                   "perplexity (median)", "n", "scenarios"],
                  [[r["method"], pct(r["fluent_accuracy"]), f"[{pct(r['fluent_low'])}, {pct(r['fluent_high'])}]",
                    pct(r["accuracy"]), pct(r["readout_accuracy"]), r["perplexity_median"], r["n"], r["n_scenarios"]]
                   for r in cmp["table"]])
        ctx.table("circuit verdicts (paired by scenario, event and target; permutation p)", ["verdict"],
                  [[v] for v in [*cmp["verdicts"], *ci["paper_random_verdicts"]]])
        ov = ci["overlap_with_paper"]
        if ov:
            keys = list(next(iter(ov.values())))
            ctx.table("overlap of the story circuit with the paper's circuit (Jaccard)", ["emotion", *keys],
                      [[e, *[o[k] for k in keys]] for e, o in ov.items()])
    for i, n in enumerate(res.notes):
        ctx.notes[f"note {i + 1}"] = n
    if res.notes:
        ctx.table("notes", ["note"], [[n] for n in res.notes])


def _at(geo, axis: str, what: str):
    best = getattr(geo, f"best_layer_{axis}")
    if best not in geo.layers:
        return None
    return float(getattr(geo, f"{what}_{axis}")[geo.layers.index(best)])


def plan(cfg) -> Plan:
    s = cfg.section("stories")
    sel = select(s, cfg.emotions)
    gen = 0.0
    if s.steering_strengths:  # unsteered once per split, each kind × α on validation, each kind on test
        e = len(cfg.emotions)
        nv, nt = common.n_prompts(cfg, "validation"), common.n_prompts(cfg, "test")
        ss = cfg.section("steering")
        reuse = ((cfg.run.stages is None or "steering" in cfg.run.stages) and ss.site == "resid_post"
                 and ss.layer_bands == "paper" and len(ss.strengths) > 1 and s.emotions in (None, tuple(cfg.emotions)))
        gen = (len(s.steering_strengths) * nv + nt if reuse
               else nv / e + 2 * len(s.steering_strengths) * nv + nt / e + 2 * nt)
    work = 0.0
    fwd = _forwards(sel, s, _n_sev(cfg, s))
    if s.circuit_lambdas:  # the story circuit: validation grid, test with its random circuits, influence
        from .circuits import influence_seconds

        cs = cfg.section("circuits")
        nv, nt = common.n_prompts(cfg, "validation"), common.n_prompts(cfg, "test")
        n_rand = s.circuit_random if s.circuit_random is not None else cs.random_controls
        gen += len(s.circuit_lambdas) * nv + nt * (1 + n_rand)
        n_infl = s.circuit_influence_scenarios if s.circuit_influence_scenarios is not None else cs.n_influence_scenarios
        work += influence_seconds(cfg, n_infl)
        fwd += 2 * len(sel.train)  # Δμ and the closed-form head scores
    return Plan(forward=fwd, generate=gen, eval_forward=common.text_forwards(cfg) * gen, work_seconds=work,
                what=f"story directions ({len(sel.emotions)} emotions, {len(sel.train)} train stories"
                     + (f"; {len(sel.concepts)} concepts" if sel.concepts else "")
                     + "); VA geometry; cosine, held-out decoding and SEV valence AUC vs the paper's"
                     + ("; steering with each kind" if s.steering_strengths else "")
                     + ("; circuit from the story directions vs the paper's" if s.circuit_lambdas else ""))


def inputs(cfg) -> list[Path]:
    from ..data.stories import BUILTIN_FILE

    out = [Path(__file__).resolve().parents[1] / "data" / "builtin" / BUILTIN_FILE]
    s = cfg.section("stories")
    if s.sev_scenarios != 0:
        out += common.sev_inputs("test")(cfg)
    return out


STUDY = Study("stories", "Emotion directions from stories (no emotion word)", Config, run, plan,
              requires=("directions",), optional=("steering", "circuits"), modules=("emocircuits.story_directions",), inputs=inputs)
