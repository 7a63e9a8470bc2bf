"""Stage 02: context-agnostic emotion directions, their decodability and the keyword control.

Switches (``[directions]``): ``methods`` (the first is the one later stages use; the others are
compared with it per layer), ``decoding_sites`` (held-out nearest-centroid decoding per site),
``keyword_control``, ``reply_directions`` (directions read from the generated replies'
tokens, compared with the main ones), ``acceptance_filter`` (the paper's filter: generate the
instructed reply for every train prompt, judge it, and keep only the (scenario, event) groups
whose six replies were all accepted; the circuits stage uses the same groups; off by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

METHODS = ("context_agnostic", "mean_difference", "pca", "probe")
CONTROL_WORDS = ("red", "blue", "green", "yellow", "purple", "orange", "brown", "pink")


@dataclass(frozen=True)
class Config:
    """``[directions]``"""

    sites: tuple[str, ...] = ("resid_mid", "resid_post")
    # the first method is the one every later stage uses; the others are compared with it
    methods: tuple[Literal["context_agnostic", "mean_difference", "pca", "probe"], ...] = ("context_agnostic",)
    n_folds: int = 5
    keyword_control: bool = True
    control_words: tuple[str, ...] = CONTROL_WORDS
    pca_layers: Literal["auto"] | tuple[int, ...] = "auto"
    decoding_sites: tuple[str, ...] | None = None  # None: every site (the last is the headline)
    # directions from the generated replies (mean over reply tokens), first n train scenarios
    reply_directions: bool = False
    reply_scenarios: int | None = 8  # None: every train scenario
    reply_sites: tuple[str, ...] = ("resid_post",)
    reply_max_new_tokens: int = 24
    # the paper's acceptance filter (only complete groups of judge-accepted instructed replies)
    acceptance_filter: bool = False

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("directions.sites is empty")
        if not self.methods:
            raise ValueError("directions.methods is empty")
        if self.n_folds < 2:
            raise ValueError(f"directions.n_folds must be >= 2, got {self.n_folds}")
        for name, subset in (("decoding_sites", self.decoding_sites or ()),
                             ("reply_sites", self.reply_sites)):
            bad = [x for x in subset if x not in self.sites]
            if bad:
                raise ValueError(f"directions.{name}: {bad} not in directions.sites {list(self.sites)}")
        if not self.reply_sites:
            raise ValueError("directions.reply_sites is empty")
        if self.reply_scenarios is not None and self.reply_scenarios < 1:
            raise ValueError("directions.reply_scenarios must be >= 1")
        if self.reply_max_new_tokens < 1:
            raise ValueError("directions.reply_max_new_tokens must be >= 1")


@dataclass
class DirectionsResult(Result):
    """Unit directions (the first method's), held-out decodability, the keyword control and
    cosines between methods/emotions/layers; the reply-token directions when switched on."""

    directions: object  # EmotionDirections
    decoding: object  # Decodability of the last site
    keyword_control: object | None = None  # KeywordControlResult
    other_methods: dict = field(default_factory=dict)  # method -> EmotionDirections
    method_cosine: dict = field(default_factory=dict)  # method -> {site: [per layer mean cos]}
    off_diagonal_cosine_across_emotions: dict = field(default_factory=dict)
    mean_cosine_across_layer_sites: dict = field(default_factory=dict)
    decoding_by_site: dict = field(default_factory=dict)  # site -> Decodability
    emotion_cosine: object | None = None  # CosineMatrix between emotions (last site, middle layer)
    layer_cosine: object | None = None  # CosineMatrix across layers × sites (first emotion)
    adjacent_cosines: dict = field(default_factory=dict)  # emotion -> adjacent_site_cosines
    reply: object | None = None  # EmotionDirections from the generated replies
    reply_cosine: dict = field(default_factory=dict)  # site -> [per layer mean cos with `directions`]
    # acceptance filter: the kept (skeleton_id, valence) groups and how many there were
    accepted_groups: list | None = None
    groups_total: int | None = None

    def headline(self) -> dict:
        out = {"decoding_peak_centered": max(self.decoding.centered) if len(self.decoding.centered) else None}
        if self.accepted_groups is not None:
            out["acceptance_filter_groups_kept"] = len(self.accepted_groups)
            out["acceptance_filter_groups_total"] = self.groups_total
        for site, d in self.decoding_by_site.items():
            out[f"decoding_peak_centered_{site}"] = max(d.centered) if len(d.centered) else None
        for site, c in self.reply_cosine.items():
            out[f"reply_direction_cosine_max_{site}"] = max(c) if c else None
        if self.keyword_control is not None:
            out["decoding_emotion_words_max_over_layers"] = max(self.keyword_control.emotion.centered)
            out["decoding_control_words_max_over_layers"] = max(self.keyword_control.control.centered)
        return out


def _pick_layers(n_layers: int, spec, k: int = 4) -> list[int]:
    if spec == "auto":
        return sorted({round(x * (n_layers - 1) / (k - 1)) for x in range(k)})
    return common.check_layers(spec, n_layers, "directions.pca_layers")


def directions_by_method(method: str, model, acts, prompts, emos, sites, recs, ctx):
    from .. import directions as D

    if method == "context_agnostic":
        return D.context_agnostic(acts, prompts, emos, sites=sites)
    if method == "pca":
        return D.pca_directions(acts, prompts, emos, sites=sites)
    if method == "probe":
        return D.probe_directions(acts, prompts, emos, sites=sites)
    if method == "mean_difference":
        from ..activations import collect
        from ..prompts import neutral_prompts

        neu = neutral_prompts(model, recs)
        nacts = collect(model, neu, sites, position="last", progress=ctx.progress,
                        batch_size=common.batch_size(ctx))
        return D.mean_difference(acts, prompts, emos, nacts, sites=sites)
    raise ValueError(f"unknown directions method {method!r}; use one of {METHODS}")


def accepted_groups(ctx: StageContext, recs) -> tuple[list[tuple[str, str]], int]:
    """The paper's acceptance filter on ``recs``: instructed replies generated and judged;
    the complete groups (every emotion accepted) and the number of groups."""
    from ..elicitation import complete_groups, elicit, judge_generations

    emos = ctx.config.emotions
    rows = elicit(ctx.model, recs, emos, gen_config=common.gen_config(ctx),
                  batch_size=common.batch_size(ctx), progress=ctx.progress)
    judged = judge_generations(rows, common.judge(ctx))
    groups = complete_groups(judged, emos)
    total = len({(r["skeleton_id"], r["valence"]) for r in rows})
    ctx.notes["acceptance filter"] = (f"{len(groups)} of {total} train groups complete "
                                      f"(all {len(emos)} instructed replies accepted by the judge)")
    if not groups:
        raise ValueError(f"directions.acceptance_filter: the judge accepted no complete group of the "
                         f"{total} train groups (every emotion's instructed reply must be accepted); "
                         "switch the filter off or use more train scenarios")
    return groups, total


def run(ctx: StageContext) -> DirectionsResult:
    from .. import directions as D
    from ..activations import collect
    from ..prompts import emotion_prompts
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    pca_layers = _pick_layers(model.cfg.n_layers, s.pca_layers)  # checked before the work
    sites = list(s.sites)
    recs = common.records(ctx, "train")
    prompts = emotion_prompts(model, recs, emos)
    groups, n_groups = None, None
    if s.acceptance_filter:
        from ..elicitation import keep_groups

        groups, n_groups = accepted_groups(ctx, recs)
        prompts = keep_groups(prompts, groups)
    with common.shared_train_activations(ctx, prompts):  # one collection for this and later stages
        acts = collect(model, prompts, sites, position="last", progress=ctx.progress,
                       batch_size=common.batch_size(ctx))
    dirs = directions_by_method(s.methods[0], model, acts, prompts, emos, sites, recs, ctx)
    others = {m: directions_by_method(m, model, acts, prompts, emos, sites, recs, ctx)
              for m in s.methods[1:]}
    method_cos = {m: {site: D.direction_agreement(dirs, o, site) for site in sites}
                  for m, o in others.items()}
    n_folds = min(s.n_folds, len({p.skeleton_id for p in prompts}))
    main = sites[-1]
    dec_sites = list(s.decoding_sites) if s.decoding_sites is not None else sites
    by_site = {site: D.nearest_centroid_accuracy(acts, prompts, emos, site, n_folds)
               for site in dict.fromkeys([*dec_sites, main])}
    dec = by_site[main]
    kw = None
    if s.keyword_control:
        kw = D.keyword_control(model, recs, emos, tuple(s.control_words)[: len(emos)], site=main,
                               n_folds=n_folds, emotion_acts=acts, progress=ctx.progress)
    reply, reply_cos = None, {}
    if s.reply_directions:
        n_rep = len(recs) if s.reply_scenarios is None else min(s.reply_scenarios, len(recs))
        gen = common.gen_config(ctx, max_new_tokens=s.reply_max_new_tokens,
                                min_new_tokens=min(ctx.config.generation.min_new_tokens,
                                                   s.reply_max_new_tokens))
        reply = D.reply_directions(model, recs[:n_rep], emos, sites=tuple(s.reply_sites), gen_config=gen,
                                   batch_size=common.batch_size(ctx), progress=ctx.progress)
        reply_cos = {site: D.direction_agreement(dirs, reply, site) for site in s.reply_sites}
    res = DirectionsResult(
        dirs, dec, kw, others, method_cos,
        {f"{site}/L{layer}": float(D.cosine_across_emotions(dirs, site, layer).off_diagonal_mean())
         for site in sites for layer in dirs.layers},
        {e: float(D.cosine_across_layers(dirs, e, sites).off_diagonal_mean()) for e in emos},
        by_site, D.cosine_across_emotions(dirs, main), D.cosine_across_layers(dirs, emos[0], sites),
        {e: D.adjacent_site_cosines(dirs, e, sites) for e in emos}, reply, reply_cos,
        None if groups is None else [list(g) for g in groups], n_groups)
    if others or reply_cos:
        curves = {f"{m} ({site})": c for m, per in method_cos.items() for site, c in per.items()}
        curves.update({f"reply tokens ({site})": c for site, c in reply_cos.items()})
        ctx.table(f"mean cosine with the {s.methods[0]} directions, per layer",
                  ["directions", *[f"L{layer}" for layer in dirs.layers]],
                  [[name, *c] for name, c in curves.items()])
    if kw is not None:
        ctx.figure("keyword-confound control: decoding emotion words vs colour words",
                   "keyword_control.png", figures.probe_accuracy,
                   {"emotion, group-centred": kw.emotion.centered,
                    "control words, group-centred": kw.control.centered,
                    "emotion, raw": kw.emotion.uncentered, "control words, raw": kw.control.uncentered},
                   layers=kw.emotion.layers, chance=kw.emotion.chance,
                   title="nearest-centroid decoding: emotion vs control words")
    ctx.figure("nearest-centroid decoding per layer", "decoding.png", figures.probe_accuracy,
               {f"{site}, {kind}": getattr(d, attr) for site, d in by_site.items()
                for kind, attr in (("group-centred", "centered"), ("raw", "uncentered"))},
               layers=dec.layers, chance=dec.chance, title="held-out nearest-centroid accuracy")
    ctx.figure("direction cosine across layers and sites (mean over emotions)",
               "direction_similarity.png", figures.direction_similarity,
               {site: dirs.vectors[site] for site in sites}, emos)
    mid = dirs.layers[len(dirs.layers) * 2 // 3]
    ctx.figure(f"cosine between emotion directions ({main}, layer {mid})", "emotion_similarity.png",
               figures.emotion_similarity, dirs.vectors[main][:, dirs.layers.index(mid)], emos)
    x = acts[main]
    ctx.figure("PCA of last-token activations, coloured by instructed emotion", "pca.png",
               figures.pca_clusters,
               {layer: x[:, acts.layers[main].index(layer)] for layer in pca_layers
                if layer in acts.layers[main]}, [p.emotion for p in prompts])
    return res


def plan(cfg) -> Plan:
    s = cfg.section("directions")
    n = common.n_prompts(cfg, "train")
    extra = n if s.keyword_control else 0
    if "mean_difference" in s.methods:
        extra += common.n_prompts(cfg, "train", per_emotion=False)
    gen = 0
    if s.reply_directions:
        n_rep = common.n_scenarios(cfg, "train")
        n_rep = n_rep if s.reply_scenarios is None else min(n_rep, s.reply_scenarios)
        gen = n_rep * 3 * len(cfg.emotions)
        extra += gen
    if s.acceptance_filter:
        gen += n
        extra += n
    return Plan(forward=n + extra, generate=gen,
                what="collect last-token resid; directions; decoding; keyword control"
                     + ("; reply-token directions" if s.reply_directions else ""))


STUDY = Study("directions", "Emotion directions (stage 02)", Config, run, plan,
              modules=("emocircuits.directions",), inputs=common.sev_inputs("train"))
