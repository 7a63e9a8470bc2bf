"""Stage 04: neuron contributions, exact head ablation vs attribution patching, overlaps of
the top components between emotions, and top-k vs random-k ablation/enhancement sweeps.

Switches (``[components]``): the exact-vs-attribution comparison can run on a smaller prompt
subset (``exact_prompts_per_emotion``, ``exact_valences``) and a layer subset
(``ablation_layers`` / ``ablation_layer_step``), by the closed form or batched ablation
(``exact_method``); ``readouts`` adds attribution with the downstream readouts (``final``:
⟨final_norm, v_ref⟩, ``logit``: the emotion's word mass) compared with the same-layer one and
with exact; ``sweep_runs`` picks the sweeps (neuron/head × ablate/enhance) and
``sweep_emotions`` the emotions they run for.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

SweepRun = Literal["neuron:ablate", "head:ablate", "neuron:enhance", "head:enhance"]
VALENCES = ("positive", "neutral", "negative")


@dataclass(frozen=True)
class Config:
    """``[components]``"""

    n_prompts_per_emotion: int | None = None  # None: every train prompt
    ablation_layers: tuple[int, ...] | None = None  # None: every ablation_layer_step-th layer
    ablation_layer_step: int = 1
    exact_method: Literal["closed_form", "batched"] = "closed_form"  # same numbers; batched is slower
    exact_prompts_per_emotion: int | None = None  # None: the prompts above
    exact_valences: tuple[Literal["positive", "neutral", "negative"], ...] = VALENCES
    readouts: tuple[Literal["final", "logit"], ...] = ()  # extra attribution readouts (exact prompts)
    top_k: int = 5  # k of the top-k overlap in the rank agreements
    overlap_k_neurons: int = 50  # Jaccard of the top-k sets between emotions
    overlap_k_heads: int = 10
    sweep_runs: tuple[SweepRun, ...] = ("neuron:ablate",)
    sweep_emotions: tuple[str, ...] | None = None  # None: every emotion of the run
    sweep_prompts_per_emotion: int | None = None  # None: the prompts above
    sweep_ks: tuple[int, ...] = (1, 4)
    n_random: int = 3
    sweep_lambda: float = 1.0  # enhance: add λ·Δμ
    neuron_rank_layers: tuple[int, ...] | None = None  # layers the sweeps' neuron ranking may use

    def __post_init__(self) -> None:
        for name in ("n_prompts_per_emotion", "exact_prompts_per_emotion", "sweep_prompts_per_emotion"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"components.{name} must be >= 1")
        if self.ablation_layer_step < 1 or self.top_k < 1 or self.n_random < 0:
            raise ValueError("components: ablation_layer_step and top_k must be >= 1, n_random >= 0")
        if self.overlap_k_neurons < 1 or self.overlap_k_heads < 1:
            raise ValueError("components: overlap_k_neurons and overlap_k_heads must be >= 1")
        if not self.sweep_ks or min(self.sweep_ks) < 1:
            raise ValueError("components.sweep_ks must list positive integers")
        if not self.exact_valences:
            raise ValueError("components.exact_valences is empty")

    @staticmethod
    def check(s: Config, cfg) -> None:
        from ..run.config import ConfigError

        bad = [e for e in (s.sweep_emotions or ()) if e not in cfg.emotions]
        if bad:
            raise ConfigError(f"components.sweep_emotions: {bad} not in run.emotions {cfg.emotions}")


@dataclass
class ComponentsResult(Result):
    """Neuron contributions, head importance (attribution and exact), their agreement, top-k
    overlaps between emotions, sweeps; the downstream-readout attributions when switched on."""

    neurons: object  # NeuronContributions
    heads_attribution: object  # HeadImportance (same-layer readout, every layer, all prompts)
    heads_exact: object  # HeadImportance (exact ablation on the exact prompts and layers)
    agreement: dict  # emotion -> {"spearman", "topk_overlap", "k"}
    sweeps: dict = field(default_factory=dict)  # emotion -> {"kind:mode": ComponentSweep}
    top_components: dict = field(default_factory=dict)  # {"heads": [(L, h)], "neurons": [(L, i)]}
    agreement_pooled: dict = field(default_factory=dict)  # over (emotion, layer, head)
    heads_by_readout: dict = field(default_factory=dict)  # readout -> HeadImportance (exact prompts)
    readout_agreement: dict = field(default_factory=dict)  # readout -> {"vs_same_layer", "vs_exact"}
    overlaps: dict = field(default_factory=dict)  # "neurons"/"heads_attribution"/"heads_exact" -> pairwise_jaccard
    sizes: dict = field(default_factory=dict)
    timing_s: dict = field(default_factory=dict)

    @property
    def mean_spearman(self) -> float | None:
        return common.mean(a["spearman"] for a in self.agreement.values())

    def headline(self) -> dict:
        out = {"head_attribution_vs_exact_spearman": self.mean_spearman}
        for name, o in self.overlaps.items():
            out[f"top_{name}_jaccard_mean"] = o.get("mean")
        return out


def split_per_emotion(prompts, emos, n_per: int | None):
    """The first ``n_per`` prompts of every emotion (input order kept)."""
    if n_per is None:
        return [p for p in prompts if p.emotion in emos]
    count: dict[str, int] = {}
    out = []
    for p in prompts:
        if p.emotion in emos and count.get(p.emotion, 0) < n_per:
            out.append(p)
            count[p.emotion] = count.get(p.emotion, 0) + 1
    return out


class _Timer(dict):
    """``with timing("part"): ...`` records the part's wall seconds."""

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self[name] = round(time.perf_counter() - t, 3)


def run(ctx: StageContext) -> ComponentsResult:
    """The stage, with the run's shared last-token collection of the train prompts active."""
    from ..prompts import emotion_prompts

    prompts = common.accepted(ctx, emotion_prompts(ctx.model, common.records(ctx, "train"), ctx.config.emotions),
                              "components")
    with common.shared_train_activations(ctx, prompts):
        return _run(ctx)


def _run(ctx: StageContext) -> ComponentsResult:
    from .. import components as K
    from ..circuits import reference_direction
    from ..prompts import emotion_prompts
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    L = model.cfg.n_layers
    abl_layers = (common.check_layers(s.ablation_layers, L, "components.ablation_layers")
                  if s.ablation_layers is not None else list(range(0, L, s.ablation_layer_step)))
    rank_layers = (set(common.check_layers(s.neuron_rank_layers, L, "components.neuron_rank_layers"))
                   if s.neuron_rank_layers is not None else None)
    dirs = ctx.upstream("directions").directions
    bs = common.batch_size(ctx)
    every = common.accepted(ctx, emotion_prompts(model, common.records(ctx, "train"), emos), "components")
    prompts = split_per_emotion(every, emos, s.n_prompts_per_emotion)
    exact_prompts = split_per_emotion([p for p in every if p.valence in s.exact_valences], emos,
                                      s.exact_prompts_per_emotion)
    same_prompts = [p.key for p in exact_prompts] == [p.key for p in prompts]
    if not exact_prompts:
        raise ValueError(f"components: no train prompt has a valence in {list(s.exact_valences)}")
    v_post, v_mid = dirs.vectors["resid_post"], dirs.vectors["resid_mid"]
    v_ref = reference_direction(dirs)  # [emotion, d_model]
    timing = _Timer()

    with timing("neuron_contributions"):
        nc = ctx.checkpoint("neuron_contributions", lambda: K.neuron_contributions(
            model, prompts, None, v_post, emos, batch_size=bs, progress=ctx.progress))
    with timing("head_attribution"):
        attr = ctx.checkpoint("head_attribution", lambda: K.head_attribution(
            model, prompts, None, emos, readout="same_layer", directions_mid=v_mid, batch_size=bs,
            progress=ctx.progress))
    attr_x = attr
    if not same_prompts:
        with timing("head_attribution_exact_prompts"):
            attr_x = ctx.checkpoint("head_attribution_exact_prompts", lambda: K.head_attribution(
                model, exact_prompts, None, emos, readout="same_layer", directions_mid=v_mid,
                batch_size=bs, progress=ctx.progress))
    with timing(f"head_exact_{s.exact_method}"):
        exact = (K.head_ablation_importance_closed_form if s.exact_method == "closed_form"
                 else K.head_ablation_importance)
        abl = ctx.checkpoint(f"head_exact_{s.exact_method}", lambda: exact(
            model, exact_prompts, None, v_mid, emos, layers=abl_layers, batch_size=bs, progress=ctx.progress))
    k_top = s.top_k
    on_abl = [attr_x.layers.index(layer) for layer in abl.layers]
    agree = {}
    for i, e in enumerate(emos):
        r = K.rank_agreement(attr_x.mean[i][on_abl], abl.mean[i], k=min(k_top, abl.mean[i].numel()))
        agree[e] = {"spearman": r["spearman"],
                    "topk_overlap": next(v for k, v in r.items() if k.startswith("top")), "k": k_top}
    pooled = K.rank_agreement(attr_x.mean[:, on_abl], abl.mean, k=k_top)

    by_readout, ro_agree = {}, {}
    for ro in s.readouts:
        with timing(f"head_attribution_{ro}"):
            a = K.head_attribution(model, exact_prompts, None, emos, readout=ro, v_ref=v_ref,
                                   batch_size=bs, progress=ctx.progress)
        by_readout[ro] = a
        ro_agree[ro] = {"vs_same_layer": K.rank_agreement(attr_x.mean, a.mean, k=k_top),
                        "vs_exact": K.rank_agreement(abl.mean, a.mean[:, [a.layers.index(x) for x in abl.layers]],
                                                     k=k_top)}

    overlaps = {
        "neurons": K.pairwise_jaccard({e: nc.top(e, k=s.overlap_k_neurons) for e in emos}),
        "heads_attribution": K.pairwise_jaccard({e: attr.top(e, k=s.overlap_k_heads) for e in emos}),
        "heads_exact": K.pairwise_jaccard({e: abl.top(e, k=min(s.overlap_k_heads, abl.mean[0].numel()))
                                           for e in emos}),
    }

    sweeps = _sweeps(ctx, model, every, prompts, emos, nc, attr, v_ref, rank_layers, timing)
    heads = [(int(r[0]), int(r[1])) for e in emos for r in abl.top(e, k=2)]
    neurons = [(int(r[0]), int(r[1])) for e in emos for r in nc.top(e, k=2)]
    sizes = {"prompts": len(prompts), "exact_prompts": len(exact_prompts), "exact_layers": abl.layers}
    res = ComponentsResult(nc, attr, abl, agree, sweeps,
                           {"heads": list(dict.fromkeys(heads)), "neurons": list(dict.fromkeys(neurons))},
                           pooled, by_readout, ro_agree, overlaps, sizes, dict(timing))
    ctx.table("attribution vs exact head ablation (Spearman over heads)",
              ["emotion", "spearman", f"top{k_top} overlap"],
              [[e, a["spearman"], a["topk_overlap"]] for e, a in {**agree, "pooled": {
                  "spearman": pooled["spearman"],
                  "topk_overlap": next(v for k, v in pooled.items() if k.startswith("top"))}}.items()])
    if ro_agree:
        ctx.table("downstream-readout attribution: rank agreement (Spearman)",
                  ["readout", "vs same-layer attribution", "vs exact ablation"],
                  [[ro, a["vs_same_layer"]["spearman"], a["vs_exact"]["spearman"]]
                   for ro, a in ro_agree.items()])
    ctx.table("top-component overlap between emotions (mean pairwise Jaccard)", ["components", "k", "mean"],
              [["neurons", s.overlap_k_neurons, overlaps["neurons"]["mean"]],
               ["heads (attribution)", s.overlap_k_heads, overlaps["heads_attribution"]["mean"]],
               ["heads (exact)", s.overlap_k_heads, overlaps["heads_exact"]["mean"]]])
    if sweeps:
        rows = []
        for e, runs in sweeps.items():
            for spec, sw in runs.items():
                for i, k in enumerate(sw.ks):
                    rows.append([e, spec, k, float(sw.top[i, 1]), float(sw.random_mean[i, 1]),
                                 float(sw.top[i, 0]), float(sw.random_mean[i, 0])])
        ctx.table("top-k vs random-k (mean Δ score over prompts)",
                  ["emotion", "run", "k", "Δ s_logit top", "Δ s_logit random", "Δ s_final top",
                   "Δ s_final random"], rows)
    first = emos[0]
    ctx.figure(f"head importance, exact ablation ({first})", "heads.png", figures.cosine_heatmap,
               abl.mean[0].numpy(), vmin=None, vmax=None,
               xlabels=[f"H{h}" for h in range(abl.mean.shape[-1])],
               ylabels=[f"L{layer}" for layer in abl.layers],
               title=f"exact ablation importance ({first})", annotate=False)
    return res


def _sweeps(ctx, model, every, prompts, emos, nc, attr, v_ref, rank_layers, timing) -> dict:
    from .. import components as K
    from ..circuits import difference_vectors

    s, bs = ctx.settings, common.batch_size(ctx)
    if not s.sweep_runs:
        return {}
    ks = list(s.sweep_ks)
    dmu = {}
    if any(spec.endswith(":enhance") for spec in s.sweep_runs):
        with timing("delta_mu"):
            dv = difference_vectors(model, prompts, emos, batch_size=bs, progress=ctx.progress)
        dmu = {"neuron": dv.mlp, "head": dv.z}
    out: dict = {}
    for e in s.sweep_emotions or emos:
        ei = emos.index(e)
        ps = split_per_emotion(every if s.sweep_prompts_per_emotion is not None else prompts, [e],
                               s.sweep_prompts_per_emotion)
        if rank_layers is None:
            n_rank = nc.top(e, k=max(ks))
        else:
            n_rank = [r for r in nc.top(e, k=nc.C_mean[ei].numel()) if int(r[0]) in rank_layers][: max(ks)]
        rankings = {"neuron": n_rank, "head": attr.top(e, k=max(ks))}
        out[e] = {}
        for spec in s.sweep_runs:
            kind, mode = spec.split(":")
            with timing(f"sweep_{e}_{kind}_{mode}"):
                def sweep(e=e, ei=ei, ps=ps, kind=kind, mode=mode, ranking=rankings[kind]):
                    return K.component_sweep(
                        model, ps, e, ranking, kind=kind, ks=ks, mode=mode,
                        delta_mu=dmu[kind][ei] if mode == "enhance" else None, strength=s.sweep_lambda,
                        n_random=s.n_random, seed=0, v_ref=v_ref[ei], emotions=emos, batch_size=bs,
                        progress=ctx.progress)
                out[e][spec] = ctx.checkpoint(f"sweep_{e}_{spec}", sweep)
    return out


def plan(cfg) -> Plan:
    from ..run.plan import LAST_TOKEN_STEP_FORWARDS

    s = cfg.section("components")
    n = common.n_prompts(cfg, "train")
    if s.n_prompts_per_emotion is not None:
        n = min(n, s.n_prompts_per_emotion * len(cfg.emotions))
    nx = n if s.exact_prompts_per_emotion is None else min(n, s.exact_prompts_per_emotion * len(cfg.emotions))
    n_sw = n // len(cfg.emotions) if s.sweep_prompts_per_emotion is None else s.sweep_prompts_per_emotion
    n_emo = len(s.sweep_emotions or cfg.emotions)
    # neurons 1 + attribution ~2 (forward + backward) + exact heads (closed form) 1; neurons and
    # the closed form read the run's shared collection (made by the directions stage) when on
    shared = cfg.run.share_activations and s.exact_method == "closed_form"
    fwd = n * (2 if shared else 3) + nx * ((0 if shared else 1) + 2 * len(s.readouts) + (2 if nx != n else 0))
    steps = 1 + len(s.sweep_ks) * (1 + s.n_random)
    for spec in s.sweep_runs:  # neuron sweeps: one prefix forward, then last-token steps
        per = 1 + steps * LAST_TOKEN_STEP_FORWARDS if spec.startswith("neuron") else steps
        fwd += n_emo * n_sw * per
    return Plan(forward=fwd, what="neuron contributions; head ablation + attribution; overlaps; "
                                  f"top-k vs random-k ({', '.join(s.sweep_runs) or 'no sweeps'})")


STUDY = Study("components", "Local components (stage 04)", Config, run, plan, version=2, requires=("directions",),
              modules=("emocircuits.components",), inputs=common.sev_inputs("train"))
