"""Activation patching, ablations and attribution patching over TransformerLens hooks.

A *location* (``Loc``) is a site from ``emocircuits.sites`` (plus ``mlp_in``, see below) at a
layer, optionally one component along the first width axis (a head of ``z``, a neuron of
``mlp_post``, a coordinate of a residual site) and optionally one token position (index into
the unpadded prompt, negative from the end; ``None`` = every position).

Patching replaces the activation a_T at the locations of a *target* run by a value a':

* ``source``: the activation of a source run on other prompts (row i of the source for row i
  of the target). *Denoising* = clean source into a corrupted target; *noising* = corrupted
  source into a clean target (``denoising(clean, corrupted)`` / ``noising(...)`` build the
  keyword arguments).
* ``"zero"``: a' = 0.
* ``"mean"``: a' = mean of the activation over a reference prompt set (at the patched position
  when one is given, else over every real token of every reference prompt).
* ``"resample"``: a' = the activation of another prompt j ≠ i drawn (seeded) from the reference
  set (default: the targets themselves) — a source run on a resampled prompt list.

When all positions are patched from a source, source and target rows must have the same token
length (the same template, or padded to align): otherwise a ``ValueError`` says so.

A metric maps the last-position logits and the activations of the hooks it names to one
number per prompt: ``projection_metric`` (⟨a[pos], v⟩ at a site), ``logit_readout_metric``
(log Σ_{t∈T_e} softmax(logits)[t], the emotion's word mass), ``logit_diff_metric``
(logit[a] − logit[b]) or any ``Metric(fn, hooks=...)``. When a metric needs no logits the
forward stops right after its deepest layer.

Sweeps (``patch_heads`` -> [layer, head], ``patch_neurons`` -> [layer, neuron]) patch one
component at a time but batch the components: the target batch is repeated along the batch
dimension, copy k patching component k.

Attribution patching (``attribution_patching``) estimates every sweep at once from one
forward and one backward pass (Nanda 2023; Syed et al. 2023):

    Δmetric(ablate c) ≈ Σ_pos (a'_c − a_c) · ∂metric/∂a_c       (summed over d_head for heads)

It is exact when the metric is linear in the patched activation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float

from . import sites as S
from .activations import forward_from, forward_until
from .progress import tqdm
from .prompts import Prompt, TokenBatch, texts_of, tokenize
from .results import Result

Ablation = Literal["zero", "mean", "resample"]
PromptLike = str | Prompt

def _width(model, site: str) -> tuple[int, ...]:
    if site == "head_result":
        raise ValueError("patch 'z' (a head's z) rather than the derived 'head_result'")
    return S.site_width(model, site)


def _layer_of_hook(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


# ----------------------------------------------------------------------------- locations


@dataclass(frozen=True)
class Loc:
    """One patched location: ``site`` at ``layer``, component ``index`` (None = all), ``position``."""

    site: str
    layer: int
    index: int | None = None
    position: int | None = None

    def check(self, model) -> Loc:
        layer = S.check_layer(model, self.layer)
        if self.site == "final_norm":
            raise ValueError("final_norm cannot be patched per layer; patch resid_post of the last layer")
        width = _width(model, self.site)
        if self.index is not None:
            what = {"z": "head", "mlp_post": "neuron"}.get(self.site, "index")
            if not -width[0] <= self.index < width[0]:
                raise IndexError(f"{what} {self.index} out of range for site {self.site!r} "
                                 f"at layer {layer} (size {width[0]})")
            return Loc(self.site, layer, self.index % width[0], self.position)
        return Loc(self.site, layer, None, self.position)


def head(layer: int, h: int, position: int | None = None) -> Loc:
    return Loc("z", layer, h, position)


def neuron(layer: int, n: int, position: int | None = -1) -> Loc:
    return Loc("mlp_post", layer, n, position)


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """``fn(logits, cache, rows) -> [batch]``.

    ``logits``: [batch, vocab] at the last position (None when ``needs_logits`` is False);
    ``cache``: {hook name: [batch, pos, ...]} for ``hooks``; ``rows``: [batch] index of each
    row's prompt in the prompt list (rows repeat when a sweep batches copies).
    """

    fn: Callable[..., torch.Tensor]
    hooks: tuple[str, ...] = ()
    needs_logits: bool = True
    name: str = "metric"

    def stop_layer(self) -> int | None:
        """Forward may stop after this many layers (None: needs the full model)."""
        if self.needs_logits:
            return None
        layers = [_layer_of_hook(h) for h in self.hooks]
        if not layers or any(layer is None for layer in layers):
            return None
        return max(layers) + 1  # type: ignore[type-var]


def as_metric(fn: Metric | Callable, hooks: Sequence[str] = (), name: str | None = None) -> Metric:
    """Wrap a user callable ``fn(logits, cache)`` (or ``fn(logits, cache, rows)``) as a Metric."""
    if isinstance(fn, Metric):
        return fn
    n_args = len(inspect.signature(fn).parameters)
    if n_args == 2:
        return Metric(lambda logits, cache, rows: fn(logits, cache), tuple(hooks), True,
                      name or getattr(fn, "__name__", "metric"))
    if n_args == 3:
        return Metric(fn, tuple(hooks), True, name or getattr(fn, "__name__", "metric"))
    raise TypeError("a metric callable takes (logits, cache) or (logits, cache, rows)")


def projection_metric(model, site: str, layer: int | None, direction: Float[torch.Tensor, "... d"],
                      position: int = -1, name: str | None = None) -> Metric:
    """⟨a_site[position], v⟩; ``direction`` is [d] or [n_prompts, d] (one per prompt)."""
    hook = S.hook_name(model, site, layer)
    v = direction.detach().float()

    def fn(logits, cache, rows):  # noqa: ARG001
        a = cache[hook][:, position].float()
        d = v.to(a.device)
        return a @ d if d.dim() == 1 else (a * d[rows.to(d.device)]).sum(-1)

    return Metric(fn, (hook,), False, name or f"proj[{hook}]")


def logit_readout_metric(model, emotion: str | Sequence[str], emotions=None, log: bool = True,
                         name: str | None = None) -> Metric:
    """log Σ_{t∈T_e} softmax(logits)[t] (``emotion_tokens``); one emotion, or one per prompt."""
    from .judges.readout import emotion_tokens

    toks = emotion_tokens(model, emotions)
    ids = {e: torch.tensor(toks.token_ids[e]) for e in toks.emotions}
    per_prompt = not isinstance(emotion, str)
    for e in ([emotion] if isinstance(emotion, str) else emotion):
        if e not in ids:
            raise ValueError(f"logit readout: emotion {e!r} not in {list(toks.emotions)}")
    mask = torch.zeros(len(toks.emotions), model.cfg.d_vocab, dtype=torch.bool)
    for j, e in enumerate(toks.emotions):
        mask[j, ids[e]] = True
    which = (torch.tensor([toks.emotions.index(e) for e in emotion]) if per_prompt
             else torch.tensor(toks.emotions.index(emotion)))

    def fn(logits, cache, rows):  # noqa: ARG001
        lp = torch.log_softmax(logits.float(), -1)
        m = mask.to(lp.device)
        sel = m[which[rows.cpu()].to(lp.device)] if per_prompt else m[which].expand_as(lp)
        lse = torch.logsumexp(lp.masked_fill(~sel, float("-inf")), -1)
        return lse if log else lse.exp()

    return Metric(fn, (), True, name or f"logit_readout[{emotion if isinstance(emotion, str) else '*'}]")


def logit_diff_metric(token_a: int, token_b: int, name: str | None = None) -> Metric:
    """logits[token_a] − logits[token_b] at the last position."""

    def fn(logits, cache, rows):  # noqa: ARG001
        if not (0 <= token_a < logits.shape[-1] and 0 <= token_b < logits.shape[-1]):
            raise IndexError(f"token id out of the vocabulary (size {logits.shape[-1]})")
        return logits[:, token_a].float() - logits[:, token_b].float()

    return Metric(fn, (), True, name or f"logit_diff[{token_a}-{token_b}]")


# ----------------------------------------------------------------------------- running


def forward_metric(model, batch: TokenBatch, metric: Metric, rows: torch.Tensor,
                   extra_hooks: Sequence = (), repeat: int = 1, stop_early: bool = True,
                   resume: tuple[int, torch.Tensor] | None = None, past=None) -> torch.Tensor:
    """Run ``batch`` (repeated ``repeat`` times along the batch) with ``extra_hooks`` and return
    ``metric`` per row; ``rows`` are the rows' indices into the metric's per-prompt data. The
    forward stops after the metric's last hook unless ``stop_early=False``. ``resume=(layer,
    resid_pre)`` starts the forward at block ``layer`` from the batch's (unrepeated) residual
    entering it (``forward_from``): blocks below it are not run. ``past``: a KV cache of every
    position but the last (``repeat`` must be 1): only the last token runs, on that cache (which
    grows by one position: crop it to reuse it)."""
    tokens, mask = batch.tokens, batch.attention_mask
    if repeat > 1:
        tokens, mask = tokens.repeat(repeat, 1), mask.repeat(repeat, 1)
        rows = rows.repeat(repeat)
    if resume is not None:
        start, resid = resume
        lows = [_layer_of_hook(h) for h in metric.hooks]
        if any(low is not None and low < start for low in lows):
            raise ValueError(f"forward_metric: the metric reads a hook below the resume layer {start}")
        tokens = resid.repeat(repeat, 1, 1) if repeat > 1 else resid
    cache: dict[str, torch.Tensor] = {}

    def grabber(name: str):
        def grab(x, hook):  # noqa: ARG001 - hook.name may be the canonical alias, not ``name``
            cache[name] = x
            return x
        return grab

    hooks = list(extra_hooks) + [(h, grabber(h)) for h in metric.hooks]
    stop = metric.stop_layer() if stop_early else None
    if past is not None:
        if repeat != 1 or resume is not None:
            raise ValueError("forward_metric: past= runs the last token alone (no repeat, no resume)")
        with model.hooks(fwd_hooks=hooks):
            out = model(tokens[:, -1:], attention_mask=mask, past_key_values=past, use_cache=True,
                        logits_to_keep=1)
    elif resume is not None:
        out = forward_from(model, tokens, resume[0], mask, stop, hooks)
    else:
        out = forward_until(model, tokens, mask, stop, hooks)
    logits = out[:, -1] if out is not None else None
    return metric.fn(logits if metric.needs_logits else None, cache, rows)


@torch.no_grad()
def metric_values(model, prompts: Sequence[PromptLike], metric: Metric | Callable, *,
                  batch_size: int = 16) -> Float[torch.Tensor, "n"]:
    """The metric on each prompt, unpatched."""
    metric = as_metric(metric)
    texts = texts_of(prompts)
    out = []
    for s in range(0, len(texts), batch_size):
        b = tokenize(model, texts[s:s + batch_size])
        out.append(forward_metric(model, b, metric, torch.arange(s, s + len(b))).float().cpu())
    return torch.cat(out)


def _capture(model, batch: TokenBatch, hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Full activations of ``hooks`` on ``batch`` (forward stopped after the deepest one)."""
    store: dict[str, torch.Tensor] = {}

    def grabber(name: str):
        def grab(x, hook):  # noqa: ARG001
            store[name] = x.detach()
            return x
        return grab

    stop = max(_layer_of_hook(h) for h in hooks) + 1  # type: ignore[type-var]
    with torch.no_grad():
        forward_until(model, batch.tokens, batch.attention_mask, stop,
                      [(h, grabber(h)) for h in set(hooks)])
    return store


def _check_aligned(target: TokenBatch, source: TokenBatch, where: str) -> None:
    if len(target) != len(source):
        raise ValueError(f"{where}: {len(source)} source prompts for {len(target)} target prompts")
    bad = (target.lengths.cpu() != source.lengths.cpu()).nonzero()[:, 0].tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"{where}: source and target token lengths differ (row {i}: source "
            f"{int(source.lengths[i])} vs target {int(target.lengths[i])} tokens; {len(bad)} rows). "
            "Patching every position needs aligned prompts: build them from the same template, "
            "pad them to the same length, or patch a single position (position=-1)."
        )


def _cols(batch: TokenBatch, position: int | None) -> torch.Tensor | None:
    """[b] column of ``position`` in each row of the padded batch (None = all columns)."""
    if position is None:
        return None
    idx = torch.full((len(batch), 1), position, dtype=torch.long, device=batch.tokens.device)
    return batch.positions(idx)[:, 0]


def _take(x: torch.Tensor, cols: torch.Tensor | None, index: int | None) -> torch.Tensor:
    """x[b, pos, *w] -> [b, T, *w'] at the columns (T=1) or all (T=pos), component ``index``."""
    y = x
    if cols is not None:
        y = x[torch.arange(x.shape[0], device=x.device), cols.to(x.device)].unsqueeze(1)
    if index is not None:
        y = y[:, :, index]
    return y


def _put(x: torch.Tensor, rows: slice, cols: torch.Tensor | None, index: int | None,
         val: torch.Tensor) -> None:
    """In place: x[rows, cols|:, index|:] = val (val broadcastable to [b, T, *w'])."""
    xs = x[rows]
    if cols is None:
        target = xs if index is None else xs[:, :, index]
        target.copy_(val.to(x.dtype).expand_as(target))
        return
    r = torch.arange(xs.shape[0], device=x.device)
    c = cols.to(x.device)
    cur = xs[r, c] if index is None else xs[r, c, index]
    xs_val = val.to(x.dtype).expand(xs.shape[0], 1, *cur.shape[1:])[:, 0]
    if index is None:
        xs[r, c] = xs_val
    else:
        xs[r, c, index] = xs_val


@dataclass
class _Values:
    """Replacement values for one batch: per-row source activations or a broadcast constant."""

    kind: str  # "zero" | "mean" | "source"
    batch: TokenBatch | None = None  # source batch (aligned rows) for "source"
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # source: hook -> [b,pos,...]
    means: dict[tuple[str, int | None], torch.Tensor] = field(default_factory=dict)  # (hook,pos)->[*w]

    def get(self, hook: str, loc: Loc) -> torch.Tensor:
        """Value broadcastable to [b, T, *w'] for ``loc``."""
        if self.kind == "zero":
            return torch.zeros(())
        if self.kind == "mean":
            v = self.means[(hook, loc.position)]
            v = v if loc.index is None else v[loc.index]
            return v.view(1, 1, *v.shape)
        assert self.batch is not None
        return _take(self.cache[hook], _cols(self.batch, loc.position), loc.index)


@torch.no_grad()
def reference_means(model, reference: Sequence[PromptLike], locs: Sequence[Loc], *,
                    batch_size: int = 16) -> dict[tuple[str, int | None], torch.Tensor]:
    """Mean activation over ``reference`` for each (hook, position) of ``locs``: [*width]."""
    texts = texts_of(reference)
    if len(texts) == 0:
        raise ValueError("mean ablation needs a non-empty reference prompt set (reference=...)")
    keys = sorted({(S.hook_name(model, loc.site, loc.layer), loc.position) for loc in locs},
                  key=lambda k: (k[0], -10**9 if k[1] is None else k[1]))
    sums: dict[tuple[str, int | None], torch.Tensor] = {}
    counts: dict[tuple[str, int | None], int] = {}
    for s in range(0, len(texts), batch_size):
        b = tokenize(model, texts[s:s + batch_size])
        cache = _capture(model, b, [k[0] for k in keys])
        for hook, pos in keys:
            x = cache[hook].double()
            if pos is None:
                m = b.attention_mask.bool().to(x.device)
                tot, cnt = x[m].sum(0), int(m.sum())
            else:
                tot, cnt = _take(x, _cols(b, pos), None)[:, 0].sum(0), len(b)
            sums[(hook, pos)] = sums.get((hook, pos), 0) + tot
            counts[(hook, pos)] = counts.get((hook, pos), 0) + cnt
    return {k: (sums[k] / counts[k]).float() for k in keys}


def _resample_order(n_target: int, n_ref: int, same: bool, seed: int) -> torch.Tensor:
    """For each target row a reference row (≠ itself when the reference is the target set)."""
    if same and n_ref < 2:
        raise ValueError("resample ablation needs at least 2 prompts to resample from")
    g = torch.Generator().manual_seed(seed)
    if same:
        off = torch.randint(1, n_ref, (n_target,), generator=g)
        return (torch.arange(n_target) + off) % n_ref
    return torch.randint(0, n_ref, (n_target,), generator=g)


def _resolve_source(target: list[str], source, ablation, reference, seed):
    """-> (kind, source texts or None, reference texts or None)."""
    if (source is None) == (ablation is None):
        raise ValueError("give exactly one of source=... (patching) or ablation='zero'|'mean'|'resample'")
    if source is not None:
        src = texts_of(source)
        if len(src) != len(target):
            raise ValueError(f"{len(src)} source prompts for {len(target)} target prompts")
        return "source", src, None
    if ablation == "zero":
        return "zero", None, None
    if ablation == "mean":
        if reference is None:
            raise ValueError("mean ablation needs reference=... (a prompt set to average over)")
        ref = texts_of(reference)
        if not ref:
            raise ValueError("mean ablation needs a non-empty reference prompt set (reference=...)")
        return "mean", None, ref
    if ablation == "resample":
        ref = target if reference is None else texts_of(reference)
        if not ref:
            raise ValueError("resample ablation needs a non-empty reference prompt set")
        order = _resample_order(len(target), len(ref), reference is None, seed)
        return "source", [ref[int(j)] for j in order], None
    raise ValueError(f"unknown ablation {ablation!r}: use 'zero', 'mean' or 'resample'")


def _batch_values(model, kind, src_texts, means, rows: slice, tbatch: TokenBatch,
                  hooks: Sequence[str], locs: Sequence[Loc], where: str) -> _Values:
    if kind == "zero":
        return _Values("zero")
    if kind == "mean":
        return _Values("mean", means=means)
    sb = tokenize(model, src_texts[rows])
    if any(loc.position is None for loc in locs):
        _check_aligned(tbatch, sb, where)
    return _Values("source", sb, _capture(model, sb, hooks))


@torch.no_grad()
def patch(model, target: Sequence[PromptLike], locs: Loc | Sequence[Loc], metric: Metric | Callable, *,
          source: Sequence[PromptLike] | None = None, ablation: Ablation | None = None,
          reference: Sequence[PromptLike] | None = None, seed: int = 0,
          batch_size: int = 16) -> Float[torch.Tensor, "n"]:
    """Metric per target prompt with all ``locs`` patched at once (from ``source`` or ablated).

    Example::

        >>> metric = logit_readout_metric(model, "anger")      # log P(anger words), next token
        >>> patch(model, test, [head(20, 0), head(20, 3)], metric, ablation="mean",
        ...       reference=neutral).shape                     # one value per target prompt
        torch.Size([6])
    """
    metric = as_metric(metric)
    locs = [locs] if isinstance(locs, Loc) else list(locs)
    if not locs:
        raise ValueError("patch: no locations given")
    locs = [loc.check(model) for loc in locs]
    texts = texts_of(target)
    kind, src, ref = _resolve_source(texts, source, ablation, reference, seed)
    means = reference_means(model, ref, locs, batch_size=batch_size) if kind == "mean" else {}
    hooks = sorted({S.hook_name(model, loc.site, loc.layer) for loc in locs})
    out = []
    for s in range(0, len(texts), batch_size):
        rows = slice(s, s + batch_size)
        tb = tokenize(model, texts[rows])
        vals = _batch_values(model, kind, src, means, rows, tb, hooks, locs, "patch")

        def make(name: str, tb=tb, vals=vals):
            mine = [loc for loc in locs if S.hook_name(model, loc.site, loc.layer) == name]

            def fn(x, hook):  # noqa: ARG001
                x = x.clone()
                for loc in mine:
                    _put(x, slice(None), _cols(tb, loc.position), loc.index, vals.get(name, loc))
                return x
            return fn

        out.append(forward_metric(model, tb, metric, torch.arange(s, s + len(tb)),
                            [(h, make(h)) for h in hooks]).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- sweeps


@dataclass
class PatchingResult(Result):
    """``effect[layer, component]`` = mean over prompts of (patched − unpatched) metric."""

    effect: Float[torch.Tensor, "layer component"]
    axes: tuple[str, str]
    layers: list[int]
    baseline: float  # mean unpatched target metric
    source_metric: float | None = None  # mean metric of the source run (patching only)
    meta: dict = field(default_factory=dict)

    @property
    def patched(self) -> torch.Tensor:
        return self.effect + self.baseline

    def normalized(self) -> torch.Tensor:
        """effect / (source − target metric): 1 = the patch fully restores the source metric."""
        if self.source_metric is None:
            raise ValueError("normalized() needs a source run (patching, not ablation)")
        return self.effect / (self.source_metric - self.baseline)

    def to_dataframe(self):
        import pandas as pd

        rows = [(layer, c, float(self.effect[i, c]))
                for i, layer in enumerate(self.layers) for c in range(self.effect.shape[1])]
        df = pd.DataFrame(rows, columns=["layer", self.axes[1], "effect"])
        df["patched"] = df["effect"] + self.baseline
        return df

    def plot(self, title: str = ""):
        """``effect`` as a layer × component heatmap (rows: model layers): a Figure."""
        from .viz.figures import cosine_heatmap

        m = self.effect.detach().double().cpu().numpy()
        lim = float(abs(m).max()) if m.size and float(abs(m).max()) > 0 else 1.0
        return cosine_heatmap(m, xlabels=[str(c) for c in range(m.shape[1])],
                              ylabels=[f"L{layer}" for layer in self.layers], vmin=-lim, vmax=lim,
                              cbar_label="effect on the metric", xlabel=self.axes[1], ylabel="layer",
                              title=title or f"patching effect per {self.axes[0]} × {self.axes[1]}")

    def top(self, k: int = 10, largest: bool = True) -> list[tuple[int, int, float]]:
        flat = self.effect.flatten()
        idx = torch.topk(flat, min(k, flat.numel()), largest=largest).indices
        n = self.effect.shape[1]
        return [(self.layers[int(i) // n], int(i) % n, float(flat[i])) for i in idx]


def denoising(clean: Sequence[PromptLike], corrupted: Sequence[PromptLike]) -> dict:
    """Keyword arguments to patch clean activations into corrupted runs."""
    return {"target": corrupted, "source": clean}


def noising(clean: Sequence[PromptLike], corrupted: Sequence[PromptLike]) -> dict:
    """Keyword arguments to patch corrupted activations into clean runs."""
    return {"target": clean, "source": corrupted}


@torch.no_grad()
def _sweep(model, target, metric, site: str, n_comp: int, comps: Sequence[int] | None,
           source, ablation, reference, layers, position, seed, batch_size, per_pass,
           progress) -> PatchingResult:
    metric = as_metric(metric)
    texts = texts_of(target)
    if not texts:
        raise ValueError("no target prompts")
    lay = S.layers_of(model, layers)
    comps = list(range(n_comp)) if comps is None else [int(c) for c in comps]
    for c in comps:
        Loc(site, lay[0], c, position).check(model)
    kind, src, ref = _resolve_source(texts, source, ablation, reference, seed)
    locs_all = [Loc(site, layer, None, position) for layer in lay]
    means = reference_means(model, ref, locs_all, batch_size=batch_size) if kind == "mean" else {}
    effect = torch.zeros(len(lay), len(comps), dtype=torch.float64)
    base_sum, src_sum = 0.0, 0.0
    bar = tqdm(total=len(lay) * len(texts), desc=f"patch {site}", disable=not progress, leave=False)
    for s in range(0, len(texts), batch_size):
        rows = slice(s, s + batch_size)
        tb = tokenize(model, texts[rows])
        b = len(tb)
        ridx = torch.arange(s, s + b)
        hooks = [S.hook_name(model, site, layer) for layer in lay]
        vals = _batch_values(model, kind, src, means, rows, tb, hooks, locs_all, f"patch_{site}")
        base = forward_metric(model, tb, metric, ridx).double().cpu()
        base_sum += float(base.sum())
        if kind == "source" and source is not None:
            src_sum += float(forward_metric(model, vals.batch, metric, ridx).double().sum())
        for i, layer in enumerate(lay):
            hook = hooks[i]
            cols = _cols(tb, position)
            for c0 in range(0, len(comps), per_pass):
                chunk = comps[c0:c0 + per_pass]

                def fn(x, hook, chunk=chunk, layer=layer, b=b, cols=cols, vals=vals, name=hook):  # noqa: ARG001
                    x = x.clone()
                    for k, c in enumerate(chunk):
                        loc = Loc(site, layer, c, position)
                        _put(x, slice(k * b, (k + 1) * b), cols, c, vals.get(name, loc))
                    return x

                m = forward_metric(model, tb, metric, ridx, [(hook, fn)], repeat=len(chunk)).double().cpu()
                effect[i, c0:c0 + len(chunk)] += (m.view(len(chunk), b) - base).sum(1)
            bar.update(b)
    bar.close()
    n = len(texts)
    axes = ("layer", {"z": "head", "mlp_post": "neuron"}.get(site, "index"))
    return PatchingResult((effect / n).float(), axes, lay, base_sum / n,
                          src_sum / n if source is not None else None,
                          {"site": site, "position": position, "kind": ablation or "source",
                           "metric": metric.name, "n": n, "components": comps})


@torch.no_grad()
def patch_layers(model, target: Sequence[PromptLike], site: str, metric: Metric | Callable, *,
                 source: Sequence[PromptLike] | None = None, ablation: Ablation | None = None,
                 reference: Sequence[PromptLike] | None = None, layers: Sequence[int] | None = None,
                 position: int | Literal["each"] | None = None, seed: int = 0, batch_size: int = 8,
                 progress: bool = True) -> PatchingResult:
    """Patch the whole ``site`` at each layer separately -> ``effect[layer, 1]``; with
    ``position=k`` only token k; with ``position="each"`` every token separately ->
    ``effect[layer, position]`` (positions of the unpadded prompts, which must then all have
    the same length).

    Cache once, resume from the patched layer: per batch, the source runs once (its ``site`` at
    every layer kept) and the target runs once (its residual entering every layer kept, and the
    unpatched metric). The patched forward for layer ℓ then starts at block ℓ from that residual
    (``forward_from``): blocks below ℓ, whose output the patch cannot change, are not rerun. All
    positions of one layer go in one batched forward. Same numbers as ``patch`` per location.

    Example (the last token's residual of the anger prompts into the neutral ones)::

        >>> angry = emotion_prompts(model, load_sev("builtin:train")[:2], ["anger"])  # = neutral's rows
        >>> res = patch_layers(model, site="resid_post", metric=metric, position=-1,
        ...                    **denoising(clean=angry, corrupted=neutral))
        >>> res.effect.shape, res.normalized().shape           # 1 = the anger metric restored
        (torch.Size([30, 1]), torch.Size([30, 1]))
    """
    metric = as_metric(metric)
    S.check_site(site)
    if site in ("final_norm",):
        raise ValueError(f"patch_layers: site {site!r} has no layer axis")
    texts = texts_of(target)
    if not texts:
        raise ValueError("patch_layers: no target prompts")
    lay = S.layers_of(model, layers)
    each = position == "each"
    if isinstance(position, str) and not each:
        raise ValueError(f"patch_layers: position must be an int, None or 'each', got {position!r}")
    kind, src, ref = _resolve_source(texts, source, ablation, reference, seed)
    n_pos = None
    if each:
        lens = set(tokenize(model, texts).lengths.tolist())
        if len(lens) != 1:
            raise ValueError(f"patch_layers(position='each'): the target prompts have {len(lens)} different "
                             "token lengths; every prompt must have the same length (one template)")
        n_pos = lens.pop()
    locs_all = [Loc(site, layer, None, k) for layer in lay
                for k in (range(n_pos) if each else [position])]
    for loc in locs_all[:: max(1, len(locs_all) // len(lay))]:
        loc.check(model)
    means = {}
    if kind == "mean":
        means = reference_means(model, ref, locs_all, batch_size=batch_size)
    metric_low = [low for low in (_layer_of_hook(h) for h in metric.hooks) if low is not None]
    effect = torch.zeros(len(lay), n_pos if each else 1, dtype=torch.float64)
    base_sum, src_sum = 0.0, 0.0
    bar = tqdm(total=len(lay) * len(texts), desc=f"patch layers {site}", disable=not progress, leave=False)
    try:
        for s0 in range(0, len(texts), batch_size):
            rows = slice(s0, s0 + batch_size)
            tb = tokenize(model, texts[rows])
            b = len(tb)
            ridx = torch.arange(s0, s0 + b)
            hooks = [S.hook_name(model, site, layer) for layer in lay]
            vals = _batch_values(model, kind, src, means, rows, tb, hooks, locs_all, "patch_layers")
            if each and vals.batch is not None:
                _check_aligned(tb, vals.batch, "patch_layers(position='each')")
            if kind == "source" and source is not None:
                src_sum += float(forward_metric(model, vals.batch, metric, ridx).double().sum())
            starts = sorted({min([layer, *metric_low]) for layer in lay})
            resid: dict[int, torch.Tensor] = {}

            def keep(layer: int, resid=resid):
                def fn(x, hook):  # noqa: ARG001
                    resid[layer] = x.detach().clone()
                    return x
                return fn

            grab = [(S.hook_name(model, "resid_pre", k), keep(k)) for k in starts]
            base = forward_metric(model, tb, metric, ridx, grab, stop_early=False).double().cpu()
            base_sum += float(base.sum())
            for i, layer in enumerate(lay):
                start = min([layer, *metric_low])
                reps = n_pos if each else 1
                if each:
                    cols = [_cols(tb, k) for k in range(n_pos)]
                else:
                    cols = [_cols(tb, position)]

                def fn(x, hook, layer=layer, cols=cols, name=hooks[i], b=b, vals=vals):  # noqa: ARG001
                    x = x.clone()
                    for k, c in enumerate(cols):
                        loc = Loc(site, layer, None, k if each else position)
                        _put(x, slice(k * b, (k + 1) * b), c, None, vals.get(name, loc))
                    return x

                m = forward_metric(model, tb, metric, ridx, [(hooks[i], fn)], repeat=reps,
                                   resume=(start, resid[start])).double().cpu()
                effect[i] += (m.view(reps, b) - base).sum(1)
                bar.update(b)
    finally:
        bar.close()
    n = len(texts)
    return PatchingResult((effect / n).float(), ("layer", "position" if each else "all"), lay,
                          base_sum / n, src_sum / n if source is not None else None,
                          {"site": site, "position": position, "kind": ablation or "source",
                           "metric": metric.name, "n": n, "method": "resume from the patched layer"})


def patch_heads(model, target: Sequence[PromptLike], metric: Metric | Callable, *,
                source: Sequence[PromptLike] | None = None, ablation: Ablation | None = None,
                reference: Sequence[PromptLike] | None = None, layers: Sequence[int] | None = None,
                position: int | None = None, seed: int = 0, batch_size: int = 8,
                progress: bool = True) -> PatchingResult:
    """Patch each head's z (every position, or one ``position``) separately -> [layer, head].

    All heads of a layer run in one batched forward (the batch repeated n_heads times).
    """
    n = model.cfg.n_heads
    return _sweep(model, target, metric, "z", n, None, source, ablation, reference, layers,
                  position, seed, batch_size, n, progress)


def patch_neurons(model, target: Sequence[PromptLike], metric: Metric | Callable, *,
                  source: Sequence[PromptLike] | None = None, ablation: Ablation | None = None,
                  reference: Sequence[PromptLike] | None = None, layers: Sequence[int] | None = None,
                  neurons: Sequence[int] | None = None, position: int | None = -1, seed: int = 0,
                  batch_size: int = 8, neurons_per_pass: int = 32,
                  progress: bool = True) -> PatchingResult:
    """Patch each neuron of mlp_post (default: at the last token) separately -> [layer, neuron]."""
    return _sweep(model, target, metric, "mlp_post", model.cfg.d_mlp, neurons, source, ablation,
                  reference, layers, position, seed, batch_size, neurons_per_pass, progress)


# ----------------------------------------------------------------------------- attribution


def cut_between_layers_hooks(model) -> list:
    """Hooks that detach every layer's resid_pre: values unchanged, gradient stopped there.

    With them, ∂(Σ_l s_l)/∂a_l = ∂s_l/∂a_l for a per-layer readout s_l at layer l that is
    downstream of a_l only within layer l (e.g. the paper's same-layer head readout).
    """
    return [(S.hook_name(model, "resid_pre", layer), lambda x, hook: x.detach())
            for layer in range(1, model.cfg.n_layers)]


def attribution_patching(model, prompts: Sequence[PromptLike], metric: Metric | Callable, *,
                         sites: Sequence[str] = ("z", "mlp_post"), layers: Sequence[int] | None = None,
                         positions: Literal["all", "last"] = "all",
                         source: Sequence[PromptLike] | None = None,
                         extra_hooks: Sequence = (), batch_size: int = 8,
                         progress: bool = True) -> dict[str, PatchingResult]:
    """Linear estimate of every component's patch effect from one forward + one backward.

    effect[l, c] ≈ mean_prompts Σ_pos (a'_c − a_c) · ∂metric/∂a_c with a' = 0 (zero ablation)
    or the ``source`` activation; heads also sum over d_head. ``positions="last"`` patches only
    the last token. Gradients are taken w.r.t. additive zero tensors at the hooks
    (``torch.autograd.grad``: no parameter gradients are accumulated).

    Example::

        >>> eff = attribution_patching(model, test, metric, sites=("z", "mlp_post"))
        >>> eff["z"].effect.shape, eff["mlp_post"].effect.shape   # [layer, head], [layer, neuron]
        (torch.Size([30, 9]), torch.Size([30, 1536]))
        >>> eff["z"].top(3)                                        # [(layer, head, effect), ...]
    """
    metric = as_metric(metric)
    texts = texts_of(prompts)
    if not texts:
        raise ValueError("attribution_patching: no prompts")
    for s in sites:
        S.check_site(s)
        if s in ("final_norm", "head_result"):
            raise ValueError(f"attribution over site {s!r} is not supported; use z / mlp_post / resid sites")
    lay = S.layers_of(model, layers)
    if source is not None:
        src = texts_of(source)
        if len(src) != len(texts):
            raise ValueError(f"{len(src)} source prompts for {len(texts)} prompts")
    sums = {s: torch.zeros(len(lay), _width(model, s)[0], dtype=torch.float64) for s in sites}
    base_sum = 0.0
    for s0 in tqdm(range(0, len(texts), batch_size), desc="attribution", disable=not progress,
                   leave=False):
        tb = tokenize(model, texts[s0:s0 + batch_size])
        ridx = torch.arange(s0, s0 + len(tb))
        cache_src = {}
        if source is not None:
            sb = tokenize(model, src[s0:s0 + batch_size])
            _check_aligned(tb, sb, "attribution_patching")
            cache_src = _capture(model, sb, [S.hook_name(model, s, layer) for s in sites for layer in lay])
        acts: dict[str, torch.Tensor] = {}
        deltas: dict[str, torch.Tensor] = {}

        def adder(name: str, acts=acts, deltas=deltas):
            def add_delta(x, hook):  # noqa: ARG001
                acts[name] = x.detach()
                d = torch.zeros_like(x, requires_grad=True)
                deltas[name] = d
                return x + d
            return add_delta

        hooks = [(h, adder(h)) for h in (S.hook_name(model, s, layer) for s in sites for layer in lay)]
        with torch.enable_grad():
            m = forward_metric(model, tb, metric, ridx, list(extra_hooks) + hooks)
            names = list(deltas)
            grads = torch.autograd.grad(m.sum(), [deltas[n] for n in names], allow_unused=True)
        base_sum += float(m.detach().double().sum())
        mask = tb.attention_mask.bool()
        if positions == "last":
            mask = torch.zeros_like(mask)
            mask[:, -1] = True
        elif positions != "all":
            raise ValueError(f"positions must be 'all' or 'last', got {positions!r}")
        for name, g in zip(names, grads, strict=True):
            a = acts[name]
            new = cache_src[name] if source is not None else torch.zeros_like(a)
            if g is None:
                g = torch.zeros_like(a)
            contrib = ((new - a) * g).double() * mask.view(*mask.shape, *([1] * (a.dim() - 2)))
            contrib = contrib.sum((0, 1))
            if contrib.dim() == 2:  # z: [head, d_head]
                contrib = contrib.sum(-1)
            site = next(s for s in sites if name in {S.hook_name(model, s, layer) for layer in lay})
            sums[site][lay.index(_layer_of_hook(name))] += contrib.cpu()
    n = len(texts)
    out = {}
    for s in sites:
        axes = ("layer", {"z": "head", "mlp_post": "neuron"}.get(s, "index"))
        out[s] = PatchingResult((sums[s] / n).float(), axes, lay, base_sum / n, None,
                                {"site": s, "method": "attribution", "positions": positions,
                                 "metric": metric.name, "n": n,
                                 "kind": "source" if source is not None else "zero"})
    return out
