"""circuitsvis views (offline) of the most important heads and neurons on one test prompt."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common


@dataclass(frozen=True)
class Config:
    """``[views]``"""

    k: int = 4

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"views.k must be >= 1, got {self.k}")


@dataclass
class ViewsResult(Result):
    attention_heads: list
    neurons: list
    prompt: str


def run(ctx: StageContext) -> ViewsResult:
    from ..prompts import neutral_prompts
    from ..viz.circuitsvis_views import attention_view, neuron_view
    from .circuits import top_components

    model, k = ctx.model, ctx.settings.k
    prompt = neutral_prompts(model, common.records(ctx, "test", 1))[0]
    heads, neurons = [], []
    circ, comp = ctx.upstream("circuits"), ctx.upstream("components")
    if circ is not None:
        top = top_components(circ, k)
        heads, neurons = top["heads"], top["neurons"]
    elif comp is not None:
        heads, neurons = comp.top_components["heads"], comp.top_components["neurons"]
    heads = [tuple(h) for h in heads] or [(model.cfg.n_layers // 2, h) for h in range(min(k, model.cfg.n_heads))]
    neurons = [tuple(n) for n in neurons] or [(model.cfg.n_layers - 1, i) for i in range(k)]
    ctx.view(attention_view(model, prompt, heads[:k]), "attention.html")
    ctx.view(neuron_view(model, prompt, neurons[:k]), "neurons.html")
    return ViewsResult([list(h) for h in heads[:k]], [list(n) for n in neurons[:k]], prompt.text)


STUDY = Study("views", "Attention and neuron views", Config, run,
              plan=lambda cfg: Plan(forward=2, what="attention + neuron views of top components (circuitsvis, offline)"),
              optional=("components", "circuits"), inputs=common.sev_inputs("test"))
