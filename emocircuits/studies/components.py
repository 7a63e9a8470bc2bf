"""Stage 04: neuron contributions, exact head ablation (closed form) vs attribution patching,
and top-k vs random-k neuron ablation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[components]``"""

    n_prompts_per_emotion: int | None = None  # None: every train prompt
    ablation_layers: tuple[int, ...] | None = None  # None: every ablation_layer_step-th layer
    ablation_layer_step: int = 1
    sweep_ks: tuple[int, ...] = (1, 4)
    n_random: int = 3
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.n_prompts_per_emotion is not None and self.n_prompts_per_emotion < 1:
            raise ValueError("components.n_prompts_per_emotion must be >= 1")
        if self.ablation_layer_step < 1 or self.top_k < 1 or self.n_random < 0:
            raise ValueError("components: ablation_layer_step and top_k must be >= 1, n_random >= 0")
        if not self.sweep_ks or min(self.sweep_ks) < 1:
            raise ValueError("components.sweep_ks must list positive integers")


@dataclass
class ComponentsResult(Result):
    """Neuron contributions, head importance (attribution and exact), their agreement, sweeps."""

    neurons: object  # NeuronContributions
    heads_attribution: object  # HeadImportance
    heads_exact: object  # HeadImportance
    agreement: dict  # emotion -> {"spearman", "topk_overlap"}
    sweeps: dict = field(default_factory=dict)  # emotion -> component sweep summary
    top_components: dict = field(default_factory=dict)  # {"heads": [(L, h)], "neurons": [(L, i)]}

    @property
    def mean_spearman(self) -> float | None:
        return common.mean(a["spearman"] for a in self.agreement.values())

    def headline(self) -> dict:
        return {"head_attribution_vs_exact_spearman": self.mean_spearman}


def split_per_emotion(prompts, emos, n_per: int | None):
    """The first ``n_per`` prompts of every emotion (input order kept)."""
    if n_per is None:
        return list(prompts)
    count: dict[str, int] = {}
    out = []
    for p in prompts:
        if p.emotion in emos and count.get(p.emotion, 0) < n_per:
            out.append(p)
            count[p.emotion] = count.get(p.emotion, 0) + 1
    return out


def run(ctx: StageContext) -> ComponentsResult:
    from .. import components as K
    from ..prompts import emotion_prompts
    from ..viz import figures

    model, emos, s = ctx.model, ctx.config.emotions, ctx.settings
    abl_layers = (common.check_layers(s.ablation_layers, model.cfg.n_layers, "components.ablation_layers")
                  if s.ablation_layers is not None
                  else list(range(0, model.cfg.n_layers, s.ablation_layer_step)))
    dirs = ctx.upstream("directions").directions
    bs = common.batch_size(ctx)
    prompts = split_per_emotion(emotion_prompts(model, common.records(ctx, "train"), emos), emos,
                                s.n_prompts_per_emotion)
    v_post, v_mid = dirs.vectors["resid_post"], dirs.vectors["resid_mid"]
    nc = K.neuron_contributions(model, prompts, None, v_post, emos, batch_size=bs, progress=ctx.progress)
    attr = K.head_attribution(model, prompts, None, emos, readout="same_layer", directions_mid=v_mid,
                              batch_size=bs, progress=ctx.progress)
    abl = K.head_ablation_importance_closed_form(model, prompts, None, v_mid, emos, layers=abl_layers,
                                                 batch_size=bs, progress=ctx.progress)
    k_top = s.top_k
    agree = {}
    for i, e in enumerate(emos):
        a = attr.mean[i][[attr.layers.index(layer) for layer in abl.layers]]
        r = K.rank_agreement(a, abl.mean[i], k=min(k_top, abl.mean[i].numel()))
        agree[e] = {"spearman": r["spearman"],
                    "topk_overlap": next(v for k, v in r.items() if k.startswith("top")), "k": k_top}
    ks = list(s.sweep_ks)
    sweeps = {}
    for e in emos:
        ps = [p for p in prompts if p.emotion == e]
        sw = K.component_sweep(model, ps, e, nc.top(e, k=max(ks)), "neuron", ks, "ablate",
                               n_random=s.n_random, emotions=emos, batch_size=bs, progress=ctx.progress)
        sweeps[e] = sw.to_dict()
    heads = [(int(r[0]), int(r[1])) for e in emos for r in abl.top(e, k=2)]
    neurons = [(int(r[0]), int(r[1])) for e in emos for r in nc.top(e, k=2)]
    res = ComponentsResult(nc, attr, abl, agree, sweeps,
                           {"heads": list(dict.fromkeys(heads)), "neurons": list(dict.fromkeys(neurons))})
    ctx.table("attribution vs exact head ablation (Spearman over heads)",
              ["emotion", "spearman", f"top{k_top} overlap"],
              [[e, a["spearman"], a["topk_overlap"]] for e, a in agree.items()])
    first = emos[0]
    ctx.figure(f"head importance, exact ablation ({first})", "heads.png", figures.cosine_heatmap,
               abl.mean[0].numpy(), vmin=None, vmax=None,
               xlabels=[f"H{h}" for h in range(abl.mean.shape[-1])],
               ylabels=[f"L{layer}" for layer in abl.layers],
               title=f"exact ablation importance ({first})", annotate=False)
    return res


def plan(cfg) -> Plan:
    s = cfg.section("components")
    n = common.n_prompts(cfg, "train")
    if s.n_prompts_per_emotion is not None:
        n = min(n, s.n_prompts_per_emotion * len(cfg.emotions))
    # neurons 1 + attribution ~2 (forward + backward) + exact heads in closed form 1
    return Plan(forward=n * 4 + n * len(s.sweep_ks) * (1 + s.n_random),
                what="neuron contributions; head ablation + attribution; top-k vs random-k")


STUDY = Study("components", "Local components (stage 04)", Config, run, plan, requires=("directions",),
              modules=("emocircuits.components",), inputs=common.sev_inputs("train"))
