"""Activation steering with emotion directions (the paper's stage 03; docs/stages/steering.md).

Two known flaws of the original protocol apply (see the method page, docs/method.md): the
paper says it steers the last token of the user input, but the authors' code steers the last
token of the whole templated prompt and then every generated token (``"last"`` below); and
α = 8 is the authors' code's value (the paper's own was not recoverable), set while looking
at the evaluation data.

At each steered layer l (hook ``site`` of block l) and each chosen position t:

    scale="rms":   h_t <- h_t + α · rms(h_t) · v_l,   rms(h) = sqrt(mean_d h_d² + 1e-12)
    scale="none":  h_t <- h_t + α · v_l                 ("unit": the old name of "none")

with α = ``strength`` (``alpha=`` is its deprecated name) and rms computed per position
*before* the addition (the paper: α = 8, resid_post, layers 11–20 of 28, "last"). The
default is ``scale="rms"``, ``strength=8``: meant for unit directions (``EmotionDirections``).
A raw tensor is added as given (not normalised), so ``steer`` warns (``ImplicitScaleWarning``)
when a raw tensor comes without an explicit ``scale=``. The directions may also be a dict
``{layer: vector}`` of raw ``[d]`` tensors (model layer numbers): v_l is that layer's vector and
the layers default to the dict's keys; being raw, it warns the same way without ``scale=``. The
``site`` may be a TransformerLens hook name: ``"blocks.12.hook_resid_post"`` is site
``resid_post`` at layer 12 (the layers then default to [12]; given ones must be [12]).
Positions, per forward call:

* ``"last"``: the last position of every call — the last prompt token in prefill and then
  every generated token (each decode call has length 1);
* ``"all"``: every position of every call;
* ``"generated"``: only decode calls inside ``generate`` (``is_decoding(model)``);
* an int tensor ``[k]`` or ``[batch, k]``: those prefill positions only (negative = from the
  end, which is the same in left-padded and unpadded prompts; non-negative = batch column).

``strength`` may be a callable ``strength(step)``: step is 0 for a prefill (any non-decode call)
and k for the k-th decode call after it. The hooks come from ``interventions`` (one
``Intervention`` per layer: a whole-vector shift).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import MappingProxyType

import numpy as np
import torch
from jaxtyping import Float

from . import sites as S
from .deprecation import renamed_keyword
from .directions import EmotionDirections
from .generation import GenerationConfig, generate
from .interventions import Intervention, check_positions, intervene
from .progress import tqdm
from .prompts import Prompt, texts_of
from .results import Result, summarize

RMS_EPS = 1e-12
_PAPER_BAND = (11, 21, 28)  # layers [11, 21) of 28


def paper_layers(model_or_n_layers) -> list[int]:
    """The paper's band (layers 11–20 of 28) scaled to the model's depth:
    [round(11 n / 28), round(21 n / 28)) — 11..20 for n = 28, 12..22 for SmolLM2 (n = 30)."""
    n = model_or_n_layers if isinstance(model_or_n_layers, int) else model_or_n_layers.cfg.n_layers
    lo, hi, ref = _PAPER_BAND
    start, stop = int(math.floor(lo * n / ref + 0.5)), int(math.floor(hi * n / ref + 0.5))
    return list(range(start, max(stop, start + 1)))


PAPER_STEERING: Mapping = MappingProxyType(
    dict(site="resid_post", scale="rms", strength=8.0, positions="last", layers=paper_layers))
"""``steer(model, dirs, emotion=e, **PAPER_STEERING)`` reproduces stage 03 (layers are resolved
by ``paper_layers(model)``)."""

Alpha = float | Callable[[int], float]
Strength = Alpha
SCALES: tuple[str, ...] = ("rms", "none", "unit")


class ImplicitScaleWarning(UserWarning):
    """``steer`` got a raw direction tensor and no explicit ``scale=``."""
Positions = str | torch.Tensor
Directions = torch.Tensor | EmotionDirections | Mapping[int, torch.Tensor]
EmotionSpec = str | Sequence[tuple[str, float]] | Mapping[str, float]


def _resolve_layers(model, layers) -> list[int]:
    if callable(layers):
        layers = layers(model)
    if layers is None:
        raise ValueError("steer: pass layers= (e.g. paper_layers(model))")
    if isinstance(layers, int):
        layers = [layers]
    out = S.layers_of(model, list(layers))
    if len(set(out)) != len(out):
        raise ValueError(f"steer: repeated layers {list(layers)}")
    return out


def steering_vectors(
    model,
    directions: Directions,
    layers: Sequence[int],
    *,
    emotion: EmotionSpec | None = None,
    site: str = "resid_post",
) -> dict[int, Float[torch.Tensor, "d"]]:
    """The vector added at each layer: ``{layer: v_l}``.

    ``directions``: a tensor ``[n_layers, d]`` indexed by the model's layer, a single ``[d]``
    vector used at every layer, a dict ``{layer: [d] tensor}`` (model layers; every one of
    ``layers`` must be a key), or ``EmotionDirections`` with ``emotion`` = a name, or several
    ``(emotion, weight)`` pairs (v_l = Σ w_e v_{e,l}, not renormalised).
    """
    site = S.check_site(site)
    if site not in S.PER_LAYER:
        raise ValueError(f"steer: site {site!r} is not per layer")
    width = S.site_width(model, site)
    if len(width) != 1:
        raise ValueError(f"steer: site {site!r} has per-position shape {width}; only vector sites "
                         f"(resid_*, attn_out, mlp_out, mlp_post, ...) can be steered")
    d = width[0]
    out: dict[int, torch.Tensor] = {}
    if isinstance(directions, EmotionDirections):
        if emotion is None:
            raise ValueError(f"steer: EmotionDirections need emotion= (one of {directions.emotions} "
                             f"or [(emotion, weight), ...])")
        pairs = ([(emotion, 1.0)] if isinstance(emotion, str)
                 else list(emotion.items()) if isinstance(emotion, Mapping) else list(emotion))
        for layer in layers:
            if layer not in directions.layers:
                raise KeyError(f"steer: layer {layer} not in the directions' layers {directions.layers}")
            out[layer] = torch.stack([float(w) * directions.at(e, layer, site).double()
                                      for e, w in pairs]).sum(0).float()
    elif isinstance(directions, Mapping):
        if emotion is not None:
            raise ValueError("steer: emotion= only applies to EmotionDirections")
        by_layer = _layer_dict(model, directions)
        for layer in layers:
            if layer not in by_layer:
                raise KeyError(f"steer: layer {layer} has no vector in the directions dict "
                               f"(its layers: {sorted(by_layer)})")
            out[layer] = by_layer[layer]
    elif isinstance(directions, torch.Tensor):
        if emotion is not None:
            raise ValueError("steer: emotion= only applies to EmotionDirections")
        if directions.dim() == 1:
            out = {layer: directions for layer in layers}
        elif directions.dim() == 2:
            if directions.shape[0] != model.cfg.n_layers:
                raise ValueError(f"steer: direction tensor has {directions.shape[0]} rows; expected "
                                 f"one per model layer ({model.cfg.n_layers}), indexed by layer")
            out = {layer: directions[layer] for layer in layers}
        else:
            raise ValueError(f"steer: direction tensor must be [n_layers, d] or [d], got {tuple(directions.shape)}")
    else:
        raise TypeError(f"steer: directions must be a tensor, a {{layer: vector}} dict or "
                        f"EmotionDirections, got {type(directions).__name__}")
    for layer, v in out.items():
        if v.shape[-1] != d:
            raise ValueError(f"steer: direction at layer {layer} has width {v.shape[-1]} but site "
                             f"{site!r} has {d} (d_model mismatch: directions from another model?)")
        if not torch.isfinite(v).all():
            raise ValueError(f"steer: direction at layer {layer} contains NaN/inf")
    return {layer: v.detach().float() for layer, v in out.items()}


def _layer_dict(model, directions: Mapping) -> dict[int, torch.Tensor]:
    """``{layer: vector}`` with checked model layers (negative counted from the end) and
    ``[d]`` tensors (arrays and lists are converted)."""
    out: dict[int, torch.Tensor] = {}
    for key, v in directions.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"steer: a directions dict maps model layers (ints) to vectors; got key {key!r}")
        layer = S.check_layer(model, int(key))
        if layer in out:
            raise ValueError(f"steer: layer {layer} appears twice in the directions dict")
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        if t.dim() != 1:
            raise ValueError(f"steer: the vector for layer {key} must be [d], got {tuple(t.shape)}")
        out[layer] = t
    if not out:
        raise ValueError("steer: the directions dict is empty")
    return out


def _check_positions(positions: Positions) -> None:
    check_positions(positions, "steer")


def steering_interventions(
    model,
    directions: Directions,
    layers: Sequence[int] | Callable | int | None = None,
    strength: Strength = 8.0,
    *,
    emotion: EmotionSpec | None = None,
    scale: str | None = None,
    positions: Positions = "last",
    site: str = "resid_post",
) -> tuple[list[Intervention], dict[int, torch.Tensor]]:
    """The ``Intervention`` per layer that ``steer`` applies, and the ``{layer: v}`` vectors.
    Arguments as in ``steer`` (``scale=None``: "rms", warning for a raw tensor or dict)."""
    site, site_layer = S.parse_site(site)
    if isinstance(directions, Mapping) and layers is None:
        layers = sorted(_layer_dict(model, directions))
    if site_layer is not None:
        if layers is None:
            layers = [site_layer]
        elif _resolve_layers(model, layers) != [S.check_layer(model, site_layer)]:
            raise ValueError(f"steer: site names layer {site_layer} but layers={layers!r}")
    if scale is None:
        if not isinstance(directions, EmotionDirections):
            warnings.warn(
                "steer: a raw direction tensor (or {layer: vector} dict) without scale=: adding strength·rms(h)·v with v as "
                "given (not normalised; strength 8 by default). Pass scale='rms' (the paper's, for unit "
                "directions) or scale='none' (h += strength·v) explicitly.", ImplicitScaleWarning,
                stacklevel=4)
        scale = "rms"
    if scale not in SCALES:
        raise ValueError(f"steer: scale must be 'rms' or 'none' ('unit' = 'none'), got {scale!r}")
    _check_positions(positions)
    if not callable(strength) and not math.isfinite(float(strength)):
        raise ValueError(f"steer: strength must be finite, got {strength}")
    lay = _resolve_layers(model, layers)
    vecs = steering_vectors(model, directions, lay, emotion=emotion, site=site)
    ivs = [Intervention(site, layer, "shift", value=vecs[layer], strength=strength, positions=positions,
                        rms_scale=scale == "rms") for layer in lay]
    return ivs, vecs


@contextmanager
def steer(
    model,
    directions: Directions,
    layers: Sequence[int] | Callable | int | None = None,
    strength: Strength = 8.0,
    *,
    emotion: EmotionSpec | None = None,
    scale: str | None = None,
    positions: Positions = "last",
    site: str = "resid_post",
    alpha: Alpha | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Context manager: while active, every forward (and ``generate``) is steered (module doc).

    ``directions``: ``EmotionDirections`` with ``emotion=`` (a name or weighted mixture), a
    raw tensor ``[n_layers, d]`` / ``[d]``, or a dict ``{layer: [d] tensor}`` (raw: pass
    ``scale=``; ``layers`` then defaults to the dict's keys). ``strength`` = α
    (``alpha=``: deprecated name). ``scale``: "rms" (default) or "none".

    Yields the ``{layer: v}`` vectors in use. Built on ``interventions.intervene``: hooks are
    removed on every exit, exceptions included.

    Example::

        >>> with steer(model, dirs, paper_layers(model), strength=1.0, emotion="anger") as vecs:
        ...     out = generate(model, test, max_new_tokens=25)      # steered replies
        >>> sorted(vecs) == paper_layers(model)                      # {layer: vector added}
        True
    """
    strength = renamed_keyword("steer", "alpha", "strength", alpha, strength, 8.0, stacklevel=4)
    ivs, vecs = steering_interventions(model, directions, layers, strength, emotion=emotion,
                                       scale=scale, positions=positions, site=site)
    with intervene(model, ivs):
        yield vecs


# ============================================================================ sweep


def _with_prefix(text: str, prefix: str | None) -> str:
    """Append an assistant prefix the way ``prompts.render`` does."""
    if not prefix:
        return text
    return text + ("" if text.endswith((" ", "\n")) else " ") + prefix


@dataclass
class SteeringSweep(Result):
    """One row per (layers, α, emotion): readout share, judge accuracy, fluency."""

    rows: list[dict]
    meta: dict = field(default_factory=dict)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([{k: v for k, v in r.items() if k != "examples"} for r in self.rows])

    def to_dict(self) -> dict:
        return {"rows": self.rows, "summary": self.summary(), "meta": self.meta}

    def _summary(self) -> dict[str, str]:
        emos = list(dict.fromkeys(str(r.get("emotion")) for r in self.rows))
        bands = list(dict.fromkeys(str(r.get("layers")) for r in self.rows))
        strengths = sorted({float(r.get("strength", r.get("alpha", float("nan")))) for r in self.rows})
        return {"rows": str(len(self.rows)), "emotions": summarize(emos), "layers": summarize(bands),
                "strengths": summarize(strengths), "meta": summarize(self.meta)}

    def plot(self, metric: str = "readout_share"):
        """Mean ``metric`` over emotions vs strength, one curve per layer band (the unsteered
        baseline at strength 0), with the perplexity panel: a Figure."""
        from .viz.figures import sweep_curves

        summ = self.summary()
        if not summ:
            raise ValueError("SteeringSweep.plot: no rows")
        if metric not in summ[0]:
            raise KeyError(f"metric {metric!r} not in {sorted(summ[0])}")
        xs = sorted({float(s["strength"]) for s in summ})
        base = {k: s[k] for s in summ if s["layers"] == "none" for k in (metric, "perplexity")}
        acc, ppl = {}, {}
        for band in dict.fromkeys(s["layers"] for s in summ if s["layers"] != "none"):
            at = {float(s["strength"]): s for s in summ if s["layers"] == band}
            acc[band] = [at[x][metric] if x in at else base.get(metric, np.nan) if x == 0 else np.nan
                         for x in xs]
            ppl[band] = [at[x]["perplexity"] if x in at else base.get("perplexity", np.nan) if x == 0
                         else np.nan for x in xs]
        if not acc:  # only the baseline
            acc = {"none": [base.get(metric, np.nan)] * len(xs)}
            ppl = {"none": [base.get("perplexity", np.nan)] * len(xs)}
        rate = metric in ("readout_share", "readout_top1", "judge_accuracy", "repeated_3gram")
        return sweep_curves(xs, acc, perplexity=ppl, xlabel="strength α", ylabel=metric,
                            ylim=(-0.02, 1.02) if rate else None, title=f"steering sweep ({self.meta.get('site', 'resid_post')})")

    def summary(self) -> list[dict]:
        """Mean over emotions per (layers, strength) setting (``"alpha"``: the same, old key)."""
        out: dict[tuple, list[dict]] = {}
        for r in self.rows:
            out.setdefault((r["layers"], r.get("strength", r.get("alpha"))), []).append(r)
        keys = ("readout_share", "readout_top1", "judge_accuracy", "perplexity", "repeated_3gram")
        res = []
        for (lay, a), rs in out.items():
            d = {"layers": lay, "strength": a, "alpha": a}
            for k in keys:
                vals = [r[k] for r in rs if r.get(k) is not None and np.isfinite(r[k])]
                d[k] = float(np.mean(vals)) if vals else float("nan")
            res.append(d)
        return res

    def best(self, metric: str = "judge_accuracy", *, max_perplexity: float | None = None,
             max_repeat: float | None = None, steered_only: bool = True) -> dict:
        """The setting with the highest mean ``metric`` among those within the fluency guard."""
        cand = [s for s in self.summary()
                if (not steered_only or s["strength"] != 0)
                and (max_perplexity is None or s["perplexity"] <= max_perplexity)
                and (max_repeat is None or s["repeated_3gram"] <= max_repeat)
                and np.isfinite(s.get(metric, float("nan")))]
        if not cand:
            raise ValueError(f"best: no setting passes max_perplexity={max_perplexity}, max_repeat={max_repeat}")
        return max(cand, key=lambda s: s[metric])


SweepResult = SteeringSweep
"""The old name of ``SteeringSweep`` (result type names are unique across the library)."""


def band_name(band: Sequence[int]) -> str:
    """The label of a layer band: ``"11-20"`` for a contiguous run of two or more layers,
    otherwise the layers joined by commas (``"5"``, ``"1,3,7"``)."""
    b = [int(x) for x in band]
    if len(b) > 1 and b == list(range(b[0], b[-1] + 1)):
        return f"{b[0]}-{b[-1]}"
    return ",".join(map(str, b))


def steering_sweep(
    model,
    prompts: Sequence[Prompt | str],
    directions: Directions,
    emotions: Sequence[str],
    layer_bands: Sequence[Sequence[int]],
    strengths: Sequence[float] | None = None,
    judge=None,
    gen_config: GenerationConfig | None = None,
    *,
    site: str = "resid_post",
    scale: str | None = None,
    positions: Positions = "last",
    readout_prefix: str | None = "I feel",
    include_baseline: bool = True,
    n_examples: int = 2,
    progress: bool = True,
    alphas: Sequence[float] | None = None,
) -> SteeringSweep:
    """Steer toward each emotion for every (layer band × α) and measure, per setting:

    * ``readout_share``: mean share of the target emotion's words in the next-token mass at the
      reply start (prompt + ``readout_prefix``), steer active; ``readout_top1``: how often it is
      the argmax;
    * ``judge_accuracy``: the judge's match rate on the steered generations (if ``judge``);
    * ``perplexity`` (geometric mean) and ``repeated_3gram`` rate: ``fluency`` computed outside
      the steering context, i.e. under the unsteered model.

    ``strengths``: the α grid (``alphas=``: deprecated name); rows carry it as ``"strength"``
    (and, for one release, ``"alpha"``). ``scale`` as in ``steer``. ``include_baseline`` adds an
    α = 0 row per emotion (unsteered).
    """
    from .evaluate import fluency
    from .judges.readout import emotion_readout

    strengths = renamed_keyword("steering_sweep", "alphas", "strengths", alphas, strengths, None)
    if strengths is None:
        raise TypeError("steering_sweep: pass strengths= (the α grid)")
    cfg = gen_config or GenerationConfig(max_new_tokens=30)
    texts = texts_of(prompts)
    ro_prompts = [_with_prefix(t, readout_prefix) for t in texts]
    settings: list[tuple[list[int] | None, float]] = []
    if include_baseline:
        settings.append((None, 0.0))
    settings += [(list(b), float(a)) for b in layer_bands for a in strengths]
    rows: list[dict] = []
    base_gen = base_ro = base_flu = None
    bar = tqdm(total=len(settings) * len(emotions), desc="sweep", disable=not progress)
    t0 = time.perf_counter()
    try:
        for band, a in settings:
            for e in emotions:
                if band is None:
                    if base_gen is None or base_ro is None:
                        base_ro = emotion_readout(model, ro_prompts, emotions)
                        base_gen = generate(model, texts, cfg, progress=False)
                    ro, gen = base_ro, base_gen
                else:
                    kw = dict(emotion=e) if isinstance(directions, EmotionDirections) else {}
                    with steer(model, directions, band, a, scale=scale, positions=positions, site=site, **kw):
                        ro = emotion_readout(model, ro_prompts, emotions)
                        gen = generate(model, texts, cfg, progress=False)
                k = list(ro.emotions).index(e)
                if band is None and base_flu is not None:
                    flu = base_flu
                else:  # outside the steer context: perplexity under the unsteered model
                    flu = fluency(model, texts, gen.texts, generated_tokens=gen.tokens)
                    if band is None:
                        base_flu = flu
                acc = None
                if judge is not None:
                    acc = float(np.mean(judge.judge(gen.texts, [e] * len(texts)).match))
                rows.append({
                    "layers": "none" if band is None else band_name(band), "strength": a, "alpha": a,
                    "emotion": e,
                    "readout_share": float(ro.share[:, k].mean()),
                    "readout_top1": float(np.mean([lab == e for lab in ro.labels])),
                    "judge_accuracy": acc, "perplexity": flu.mean_perplexity,
                    "repeated_3gram": flu.mean_repeated_ngram_rate, "n": len(texts),
                    "examples": gen.texts[:n_examples],
                })
                bar.update(1)
    finally:
        bar.close()
    return SteeringSweep(rows, {"site": site, "scale": scale or "rms",
                              "positions": positions if isinstance(positions, str) else "index",
                              "gen_config": asdict(cfg), "readout_prefix": readout_prefix,
                              "judge": getattr(judge, "name", None), "seconds": time.perf_counter() - t0})
