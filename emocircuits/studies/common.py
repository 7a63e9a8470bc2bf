"""What the studies share: data subsets, the judge, generation settings, input files, the model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..run.engine import StageContext
from .config import RunConfig

DEFAULT_SIZES = {"train": 160, "validation": 40, "test": 40}


def subset_records(ds, n: int | None):
    """First ``n`` records taking themes in turn (theme order of first appearance); all if None."""
    recs = list(ds)
    if n is None or n >= len(recs):
        return recs
    if n < 1:
        raise ValueError(f"data size must be >= 1, got {n}")
    by_theme: dict[str, list] = {}
    for r in recs:
        by_theme.setdefault(r.theme, []).append(r)
    out, i = [], 0
    while len(out) < n:
        for rs in by_theme.values():
            if i < len(rs) and len(out) < n:
                out.append(rs[i])
        i += 1
    return out


def records(cfg: RunConfig | StageContext, split: str, n: int | None = None):
    """The first ``data.n_<split>`` (or ``n``) SEV records of ``data.<split>``, themes in turn."""
    from ..data import load_sev

    cfg = cfg.config if isinstance(cfg, StageContext) else cfg
    want = getattr(cfg.data, f"n_{split}") if n is None else n
    return subset_records(load_sev(cfg.data.source(split)), want)


def accepted(ctx: StageContext, prompts: Sequence[Any], where: str) -> list[Any]:
    """``prompts`` kept to the directions stage's accepted groups when its acceptance filter is
    on (``directions.acceptance_filter``), else unchanged; none left raises naming ``where``."""
    dirs = ctx.upstream("directions")
    groups = getattr(dirs, "accepted_groups", None)
    if groups is None:
        return list(prompts)
    from ..elicitation import keep_groups

    kept = keep_groups(prompts, [tuple(g) for g in groups])
    if not kept:
        raise ValueError(f"{where}: none of its {len(prompts)} train prompts is in the "
                         f"{len(groups)} groups the acceptance filter kept")
    return kept


PROMPT_TOKENS = 65  # a chat-templated SEV prompt, about


def text_forwards(cfg: RunConfig) -> float:
    """Scoring one generated text, in prompt forwards: the fluency forward over prompt + up to
    max_new_tokens, plus the logit readout's prompt forward (dry-run estimates)."""
    return 1.0 + (PROMPT_TOKENS + cfg.generation.max_new_tokens) / PROMPT_TOKENS


def n_scenarios(cfg: RunConfig, split: str) -> int:
    return getattr(cfg.data, f"n_{split}") or DEFAULT_SIZES[split]


def n_prompts(cfg: RunConfig, split: str, per_emotion: bool = True) -> int:
    """Prompts of a split: scenarios × 3 valences (× emotions)."""
    return n_scenarios(cfg, split) * 3 * (len(cfg.emotions) if per_emotion else 1)


def sev_inputs(*splits: str):
    """An ``inputs`` function for a study: the SEV files of these splits (content-hashed)."""
    def inputs(cfg: RunConfig) -> list[Path]:
        return [source_path(cfg.data.source(s)) for s in splits]
    return inputs


def source_path(source: str) -> Path:
    """The file behind a data source (``builtin:*`` -> the packaged file)."""
    if source.startswith("builtin:"):
        return Path(__file__).resolve().parents[1] / "data" / "builtin" / "sev_builtin.jsonl"
    return Path(source)


def utterance_inputs(cfg: RunConfig) -> list[Path]:
    from ..data.utterances import builtin_path

    return [builtin_path()]


def judge(ctx: StageContext):
    """The run's offline judge (``[judge] prefer``) over the run's emotions."""
    from ..judges import default_judge

    return default_judge(ctx.config.emotions, prefer=ctx.config.judge.prefer)


def gen_config(ctx: StageContext | RunConfig, **over: Any):
    cfg = ctx.config if isinstance(ctx, StageContext) else ctx
    return cfg.generation.gen_config(**over)


def batch_size(ctx: StageContext) -> int:
    return ctx.config.generation.batch_size


def load_run_model(name: str, *, dtype: str | None = None, device: str | None = None):
    """``models.load_model(name)`` (which also knows ``"tiny-llama"``/``"tiny-gemma"``)."""
    from .. import models

    return models.load_model(name, device=device, dtype=dtype)


def mean(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else None


def check_layers(layers: Sequence[int] | None, n_layers: int, where: str) -> list[int] | None:
    """Layers within ``[-n_layers, n_layers)`` (negative from the end); anything else is an error."""
    if layers is None:
        return None
    out = []
    for x in layers:
        if not -n_layers <= int(x) < n_layers:
            raise ValueError(f"{where}: layer {x} out of range for a {n_layers}-layer model")
        out.append(int(x) % n_layers)
    return out


# The last-token sites the train-prompt analyses read: directions (resid_mid/resid_post), neuron
# contributions (mlp_post), the closed-form head score (resid_pre, attn_o_out, z), Δμ and σ.
SHARED_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_o_out", "mlp_post", "z")


def shared_train_activations(ctx: StageContext, prompts: Sequence[Any]):
    """A context in which every last-token ``collect`` of these prompts (or a subset) at
    ``SHARED_SITES`` is answered from ONE collection per run (``activations.shared_activations``)
    instead of new forwards: the directions, components and circuits stages share it.

    The collection is kept in ``<run>/shared/train-last-<key>.safetensors`` (+ ``.json``; the
    key hashes the model, its dtype and the prompt texts), so a run resumed in a new process
    reuses it. ``[run] share_activations = false``: a no-op (each stage collects its own)."""
    from contextlib import nullcontext

    from ..activations import Activations, collect, shared_activations
    from ..prompts import texts_of

    if not getattr(ctx.config.run, "share_activations", True) or not prompts:
        return nullcontext()
    import hashlib

    from ..results import with_suffix

    model = ctx.model
    texts = texts_of(prompts)
    key = hashlib.sha256("\n".join([str(ctx.config.model), str(ctx.config.run.dtype), *texts])
                         .encode()).hexdigest()[:16]
    stem = ctx.run_dir / "shared" / f"train-last-{key}"
    acts = None
    if with_suffix(stem, ".json").is_file():
        try:
            acts = Activations.load(stem)
        except Exception as e:  # a damaged file is collected again, and said so
            ctx.notes["shared activations"] = f"collected again ({type(e).__name__}: {e})"
        if acts is not None and (len(acts) != len(texts) or not set(SHARED_SITES) <= set(acts.acts)):
            acts = None
    if acts is None:
        acts = collect(model, list(prompts), SHARED_SITES, "last", batch_size=batch_size(ctx),
                       progress=ctx.progress)
        stem.parent.mkdir(parents=True, exist_ok=True)
        acts.save(stem)
    return shared_activations(model, acts, prompts)


def evaluator(ctx: StageContext, emotions: Sequence[str], *, readout: bool = True, n_examples: int = 12,
              key_prefix: str = ""):
    """``evaluate(records, make_ctx, name, split) -> MethodEvaluation``: generate on the records'
    neutral prompts under ``make_ctx(emotion)`` for every emotion, judge, score fluency and (with
    ``readout``) the "I feel" logit readout (``evaluate.evaluate_intervention`` with the run's
    judge and generation settings), kept as the checkpoint ``{key_prefix}{split}/{name}`` so an
    interrupted run resumes per method and setting."""
    from ..evaluate import evaluate_intervention
    from ..prompts import neutral_prompts
    from .steering import READOUT_PREFIX

    model, the_judge, gen = ctx.model, judge(ctx), gen_config(ctx)

    def evaluate(recs, make, name: str, split: str):
        def compute():
            p = neutral_prompts(model, recs)
            ro = neutral_prompts(model, recs, assistant_prefix=READOUT_PREFIX) if readout else None
            return evaluate_intervention(model, p, list(emotions), make, the_judge, gen, method=name,
                                         readout_prompts=ro, n_examples=n_examples)
        return ctx.checkpoint(f"{key_prefix}{split}/{name}", compute)
    return evaluate
