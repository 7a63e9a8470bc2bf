"""Collect only the activations asked for: chosen sites, layers and positions.

``collect(model, prompts, sites, position)`` runs batched, left-padded forwards with one
hook per (site, layer) that copies only the wanted positions to float32 on the CPU, and
stops the forward after the deepest layer needed (no unembedding unless ``final_norm``
is asked). Never materialises a full ``run_with_cache``.

Positions:

* ``"last"``: the last prompt token -> ``[n, layer, *width]``;
* ``"all"``: every real token, left-aligned and zero-padded -> ``[n, layer, max_len, *width]``
  with ``Activations.lengths``;
* an int tensor ``[n, k]`` (or ``[k]`` for all prompts) of positions in each unpadded
  prompt, negative counting from the end -> ``[n, layer, k, *width]``.

``final_norm`` has no layer axis (its "layer" axis has size 1). ``head_result`` is
``z_h @ W_O[h]`` computed in the hook. With ``out_dir`` the results are streamed to disk in
safetensors shards (one per batch group) and ``Activations.load(out_dir)`` reads them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import sites as S
from .progress import tqdm
from .prompts import Prompt, batches, check_context, encode, pad_ids, texts_of
from .results import (
    Result,
    ResultFileError,
    ResultFileMissing,
    atomic_write_bytes,
    atomic_write_json,
)

Position = str | torch.Tensor


@dataclass
class Activations(Result):
    """``acts[site]``: float32 CPU tensor ``[n, layer, (pos,) *width]``; ``layers[site]`` lists its layers.

    ``acts[site, L]`` (or ``acts["blocks.L.hook_<site>"]``) is model layer ``L`` alone:
    ``[n, (pos,) *width]`` (``L`` is the model's layer number, not the index into
    ``layers[site]``)."""

    acts: dict[str, Float[torch.Tensor, "n layer ..."]]
    layers: dict[str, list[int]]
    position: str
    lengths: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        site, layer = S.parse_site(key)
        if site not in self.acts:
            raise KeyError(f"site {site!r} was not collected; have {list(self.acts)}")
        if layer is None:
            return self.acts[site]
        return self.layer(site, layer)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return next(iter(self.acts.values())).shape[0]

    def layer(self, site: str, layer: int) -> torch.Tensor:
        """The slice of one model layer: ``[n, (pos,) *width]``."""
        site, layer = S.parse_site(site, layer)
        if site not in self.acts:
            raise KeyError(f"site {site!r} was not collected; have {list(self.acts)}")
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int (a model layer number), got {type(layer).__name__}")
        try:
            j = self.layers[site].index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} of {site!r} not collected; collected layers: "
                           f"{self.layers[site]}") from None
        return self.acts[site][:, j]

    @classmethod
    def load(cls, path: str | os.PathLike) -> Activations:
        """Load a ``save``d result (``Result.load``), or a folder of shards written by
        ``collect(out_dir=...)``."""
        if Path(path).is_dir():
            return _load_shards(Path(path))
        return super().load(path)


_SHARD = re.compile(r"shard_\d{5,}\.safetensors")


def _load_shards(folder: Path) -> Activations:
    """Read ``collect(out_dir=...)`` shards, checking the index and each shard's sha256."""
    ix = folder / "index.json"
    if not ix.is_file():
        raise ResultFileMissing(f"{ix}: shard index missing")
    try:
        index = json.loads(ix.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultFileError(f"{ix}: not a valid shard index ({e})") from None
    ok = (isinstance(index, dict) and isinstance(index.get("shards"), list) and index["shards"]
          and all(isinstance(s, str) and _SHARD.fullmatch(s) for s in index["shards"])
          and isinstance(index.get("layers"), dict)
          and all(isinstance(v, list) and all(isinstance(x, int) for x in v)
                  for v in index["layers"].values())
          and isinstance(index.get("position"), str) and isinstance(index.get("meta", {}), dict)
          and isinstance(index.get("sha256", {}), dict))
    if not ok:
        raise ResultFileError(f"{ix}: malformed shard index")
    hashes = index.get("sha256", {})
    parts = []
    for s in index["shards"]:
        f = folder / s
        if not f.is_file():
            raise ResultFileMissing(f"{f}: shard listed in {ix.name} is missing")
        data = f.read_bytes()
        if s in hashes and hashlib.sha256(data).hexdigest() != hashes[s]:
            raise ResultFileError(f"{f}: contents do not match the hash recorded in {ix.name}")
        try:
            t = st_load(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise ResultFileError(f"{f}: unreadable safetensors shard ({e})") from None
        missing = [k for k in index["layers"] if f"acts/{k}" not in t]
        if missing:
            raise ResultFileError(f"{f}: shard lacks sites {missing}")
        parts.append(t)
    if index["position"] == "all":  # shards are padded to their own widths
        width = max(p[f"acts/{k}"].shape[2] for p in parts for k in index["layers"])
        parts = [{k: (_pad_right(v, width) if k.startswith("acts/") else v) for k, v in p.items()}
                 for p in parts]
    acts = {k: torch.cat([p[f"acts/{k}"] for p in parts]) for k in index["layers"]}
    lengths = torch.cat([p["lengths"] for p in parts]) if "lengths" in parts[0] else None
    return Activations(acts, index["layers"], index["position"], lengths, index.get("meta", {}))


def forward_until(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None, stop: int | None,
                  fwd_hooks: Sequence = ()) -> torch.Tensor | None:
    """One forward with ``fwd_hooks`` active (removed on every exit) and no KV cache.

    ``stop``: run blocks 0..stop−1 only (no unembedding) and return None; ``None`` or
    ``stop >= n_layers``: the whole model, returning the logits of the last position only
    ``[batch, 1, vocab]``."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if stop is None or stop >= model.cfg.n_layers:
            return model(tokens, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
        model(tokens, attention_mask=attention_mask, stop_at_layer=stop, use_cache=False)
        return None


def _decoder_stack(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """The HF module whose ``layers`` ModuleList holds the bridge's blocks, and that list."""
    first = model.blocks[0]
    for mod in model.original_model.modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and layers[0] is first:
            return mod, layers
    raise NotImplementedError(f"forward_from: cannot find the decoder layer list of {type(model.original_model).__name__}")


@contextlib.contextmanager
def _blocks_from(model, start: int):
    """Blocks ``start..`` only: the HF layer list and its per-layer config lists are sliced
    for the duration of the block and restored on every exit (also on exceptions)."""
    stack, layers = _decoder_stack(model)
    cfg = getattr(stack, "config", None)
    per_layer = {}
    if cfg is not None:
        for key in ("layer_types",):
            v = getattr(cfg, key, None)
            if isinstance(v, (list, tuple)) and len(v) == len(layers):
                per_layer[key] = v
    stack.layers = torch.nn.ModuleList(list(layers)[start:])
    for key, v in per_layer.items():
        setattr(cfg, key, list(v)[start:])
    try:
        yield
    finally:
        stack.layers = layers
        for key, v in per_layer.items():
            setattr(cfg, key, v)


def forward_from(model, resid_pre: Float[torch.Tensor, "batch pos d_model"], layer: int,
                 attention_mask: torch.Tensor | None, stop: int | None = None,
                 fwd_hooks: Sequence = (), past=None, position_ids: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
    """Resume a forward at block ``layer`` from its input ``resid_pre`` (as captured on an
    earlier run of the same tokens and mask): blocks ``0..layer−1`` are not run at all.

    Same result as the whole forward whenever ``resid_pre`` is what blocks ``0..layer−1``
    produce (tested against it: equal to float32 rounding, ~1e-7). Hooks on blocks below ``layer`` never fire.
    ``stop`` and the return value are as in ``forward_until``. ``past``: an HF KV cache of the
    earlier positions (``resid_pre`` then holds the new positions only, ``attention_mask``
    covers all); only its layers ``layer..`` are read and extended. ``position_ids`` ``[batch,
    pos]``: the new positions' RoPE positions (required with a 4D ``attention_mask``; derived
    from a 2D mask otherwise)."""
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise ValueError(f"forward_from: layer {layer} outside [0, {n})")
    if stop is not None and stop <= layer:
        raise ValueError(f"forward_from: stop={stop} must be after the start layer {layer}")
    if layer == 0:
        start_ctx = contextlib.nullcontext()
    else:
        start_ctx = _blocks_from(model, layer)
    kw = dict(attention_mask=attention_mask, start_at_layer=layer, use_cache=past is not None)
    if past is not None:
        kw["past_key_values"] = past
    accepts = getattr(model, "_accepts_derived_position_ids", lambda: False)
    if position_ids is not None:
        kw["position_ids"] = position_ids
    elif attention_mask is not None and attention_mask.dim() == 2 and accepts():
        # the bridge derives positions from the mask for token input, not for a residual:
        # derive them the same way (left padding shifts every real token)
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        kw["position_ids"] = pos[:, attention_mask.shape[1] - resid_pre.shape[1]:]
    with start_ctx, model.hooks(fwd_hooks=list(fwd_hooks)):
        if stop is None or stop >= n:
            return model(resid_pre, logits_to_keep=1, **kw)
        model(resid_pre, stop_at_layer=stop, **kw)
        return None


def prompts_hash(prompts: Sequence[str | Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update((p.text if isinstance(p, Prompt) else p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _columns(batch, position: Position, rows: slice | list[int]) -> torch.Tensor | None:
    """Column indices [b, k] into the padded batch for the requested positions (None = all)."""
    if isinstance(position, str):
        if position == "last":
            return torch.full((len(batch), 1), batch.tokens.shape[1] - 1, dtype=torch.long)
        if position == "all":
            return None
        raise ValueError(f"position must be 'last', 'all' or an index tensor, got {position!r}")
    idx = position
    if idx.dim() == 1:
        idx = idx.unsqueeze(0).expand(len(batch), -1)
    else:
        idx = idx[rows]
    if not (idx < batch.lengths.unsqueeze(1).cpu()).all() or not (idx >= -batch.lengths.unsqueeze(1).cpu()).all():
        raise IndexError("collect: a position index is outside its prompt")
    return batch.positions(idx.to(batch.tokens.device)).cpu()


def resolve_sites(model, sites, layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """``{site: [model layers]}`` for ``collect``'s ``sites`` argument: one spec or a list of
    them, each a site name (at ``layers``, default all, in the order given), a TL hook name such
    as ``"blocks.3.hook_resid_post"`` or a ``(site, layer)`` pair (that layer only). Specs naming
    the same site merge (their layers then sorted); ``final_norm`` has the one layer
    ``n_layers − 1``."""
    if isinstance(sites, str) or (isinstance(sites, tuple) and len(sites) == 2
                                  and isinstance(sites[0], str) and isinstance(sites[1], int)
                                  and not isinstance(sites[1], bool)):
        sites = [sites]  # one spec: "resid_post", "blocks.3.hook_z" or ("resid_post", 3)
    if len(sites) == 0:
        raise ValueError("collect: no sites given")
    lay = S.layers_of(model, layers)
    out: dict[str, list[int]] = {}
    for spec in sites:
        site, layer = S.parse_site(tuple(spec) if isinstance(spec, list) else spec)
        if site == "final_norm":
            want = [model.cfg.n_layers - 1]
        elif layer is None:
            want = lay
        else:
            want = [S.check_layer(model, layer)]
        out[site] = sorted(set(out[site]) | set(want)) if site in out else list(want)
    return out


@torch.no_grad()
def collect(
    model,
    prompts: Sequence[str | Prompt] | str | Prompt,
    sites: Sequence[str | tuple[str, int]] | str | tuple[str, int],
    position: Position = "last",
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    out_dir: str | os.PathLike | None = None,
    shard_size: int = 1024,
    sort_by_length: bool = True,
    progress: bool = True,
) -> Activations:
    """Activations at ``sites`` × ``layers`` × ``position`` for every prompt (module docstring).

    ``prompts``: a list of prompts, or one prompt (a string or ``Prompt``: one row).
    ``sites``: site names (collected at ``layers``, default all), TransformerLens hook names
    (``"blocks.3.hook_resid_post"``: that site at that layer only) or ``(site, layer)`` pairs,
    one or a list (``resolve_sites``); ``acts[site, layer]`` reads one layer back.

    With ``sort_by_length`` (default) the prompts of each shard window are batched in order of
    token length (less padding, fewer FLOPs) and the results put back in input order; the values
    equal those of input-order batching up to float rounding. Forwards run with
    ``use_cache=False`` (no KV cache is built for a one-shot forward).

    Example::

        >>> acts = collect(model, prompts, ["resid_mid", "resid_post"], position="last")
        >>> acts["resid_post"].shape                       # [prompt, layer, d_model]
        torch.Size([12, 30, 576])
        >>> acts["resid_post", 12].shape                   # one layer
        torch.Size([12, 576])
    """
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    site_layers = resolve_sites(model, sites, layers)
    sites = tuple(site_layers)
    if len(prompts) == 0:
        raise ValueError("collect: no prompts")
    lay = sorted({layer for s, ls in site_layers.items() if s != "final_norm" for layer in ls})
    if isinstance(position, str) and position == "last" and out_dir is None:
        hit = _from_shared(model, prompts, site_layers)
        if hit is not None:
            return hit
    if isinstance(position, torch.Tensor):
        position = position.long().cpu()
        if position.dim() == 2 and position.shape[0] != len(prompts):
            raise ValueError(f"position tensor has {position.shape[0]} rows for {len(prompts)} prompts")
    texts = texts_of(prompts)
    stop = None if "final_norm" in sites or not lay else max(lay) + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    chunks: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    lengths_all: list[torch.Tensor] = []
    shards: list[str] = []
    shard_sha: dict[str, str] = {}
    n_in_shard = 0
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal n_in_shard
        if out_dir is None or n_in_shard == 0:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        tensors = {f"acts/{s}": torch.cat(chunks[s]).contiguous() for s in sites}
        if position == "all":
            tensors["lengths"] = torch.cat(lengths_all)
        data = st_save(tensors)
        atomic_write_bytes(out_dir / name, data)
        shards.append(name)
        shard_sha[name] = hashlib.sha256(data).hexdigest()
        for s in sites:
            chunks[s].clear()
        lengths_all.clear()
        n_in_shard = 0

    ids = [encode(model, t) for t in texts]
    check_context(model, [len(x) for x in ids], prompts)  # before any batch is run
    # batches never straddle a shard window, so every shard holds a contiguous input range;
    # inside a window, batches go by token length when sort_by_length
    window = shard_size if out_dir is not None else len(texts)
    plan: list[tuple[list[int], bool]] = []  # (input rows, last batch of its window)
    for w in range(0, len(texts), window):
        rows_w = list(range(w, min(w + window, len(texts))))
        key = (lambda i: len(ids[i])) if sort_by_length else None
        chunk = [rows for _, rows in batches(rows_w, batch_size, sort_by_length=key)]
        plan += [(rows, k == len(chunk) - 1) for k, rows in enumerate(chunk)]
    pending: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    pending_len: list[torch.Tensor] = []
    pending_rows: list[int] = []

    def settle() -> None:
        """Move the finished window's batches, back in input order, into ``chunks``."""
        inv = torch.tensor(sorted(range(len(pending_rows)), key=pending_rows.__getitem__))
        for s in sites:
            ts = pending[s]
            if position == "all":
                width = max(t.shape[2] for t in ts)
                ts = [_pad_right(t, width) for t in ts]
            chunks[s].append(torch.cat(ts)[inv])
            pending[s].clear()
        if pending_len:
            lengths_all.append(torch.cat(pending_len)[inv])
        pending_len.clear()
        pending_rows.clear()

    bar = tqdm(total=len(texts), desc="collect", disable=not progress, leave=False)
    try:
        for rows, window_done in plan:
            batch = pad_ids(model, [ids[i] for i in rows])
            cols = _columns(batch, position, rows)
            store: dict[tuple[str, int], torch.Tensor] = {}

            def make_hook(site: str, layer: int, cols=cols, store=store):
                def hook(x, hook):  # noqa: ARG001 - TL hook signature
                    if site == "head_result":
                        y = S.head_result_from_z(model, layer, x)
                    else:
                        y = x
                    if cols is None:
                        store[(site, layer)] = y.detach().float().cpu()
                    else:
                        c = cols.to(y.device)
                        gather = c.view(c.shape[0], c.shape[1], *([1] * (y.dim() - 2)))
                        gather = gather.expand(-1, -1, *y.shape[2:])
                        store[(site, layer)] = torch.gather(y, 1, gather).detach().float().cpu()
                    return x
                return hook

            fwd = [(S.hook_name(model, s, None if s == "final_norm" else layer), make_hook(s, layer))
                   for s in sites for layer in site_layers[s]]
            forward_until(model, batch.tokens, batch.attention_mask, stop, fwd)
            for s in sites:
                per_layer = [store[(s, layer)] for layer in site_layers[s]]
                t = torch.stack(per_layer, dim=1)  # [b, layer, pos|k, *width]
                if position == "last":
                    t = t[:, :, 0]
                elif position == "all":
                    t = _left_align(t, batch.lengths.cpu())
                pending[s].append(t)
            pending_rows.extend(rows)
            if position == "all":
                pending_len.append(batch.lengths.cpu())
            n_in_shard += len(batch)
            if window_done:
                settle()
                if out_dir is not None:
                    flush()
            bar.update(len(batch))
    finally:
        bar.close()
    meta = {"prompts_hash": prompts_hash(prompts), "n": len(texts),
            "model": getattr(model.cfg, "emocircuits_alias", getattr(model.cfg, "model_name", ""))}
    if out_dir is not None:
        flush()
        atomic_write_json(out_dir / "index.json", {"shards": shards, "layers": site_layers,
                                                   "position": position if isinstance(position, str) else "index",
                                                   "meta": meta, "sha256": shard_sha})
        return Activations.load(out_dir)
    if position == "all":
        width = max(c.shape[2] for c in chunks[sites[0]])
        acts = {s: torch.cat([_pad_right(c, width) for c in chunks[s]]) for s in sites}
        lengths = torch.cat(lengths_all)
    else:
        acts = {s: torch.cat(chunks[s]) for s in sites}
        lengths = None
    return Activations(acts, site_layers, position if isinstance(position, str) else "index",
                       lengths, meta)


_SHARED_ATTR = "_emocircuits_shared_activations"


@contextlib.contextmanager
def shared_activations(model, acts: Activations, prompts: Sequence[str | Prompt]):
    """Inside the block, ``collect(model, ps, sites, "last", layers=...)`` on any prompts ``ps``
    among ``prompts`` (the rows of ``acts``, a last-token collection) and any sites and layers
    that ``acts`` holds is answered from ``acts`` (rows picked by prompt text) instead of new
    forwards. The values equal a fresh collection up to float rounding (batch composition).
    Nested blocks: the innermost that covers a request answers it. Removed on every exit."""
    if acts.position != "last":
        raise ValueError(f"shared_activations needs a last-token collection, got position {acts.position!r}")
    texts = texts_of(prompts)
    if len(texts) != len(acts):
        raise ValueError(f"shared_activations: {len(texts)} prompts for {len(acts)} rows")
    index: dict[str, int] = {}
    for i, t in enumerate(texts):
        index.setdefault(t, i)
    stack = list(getattr(model, _SHARED_ATTR, ()))
    object.__setattr__(model, _SHARED_ATTR, (*stack, (acts, index)))
    try:
        yield acts
    finally:
        object.__setattr__(model, _SHARED_ATTR, tuple(stack))


def _from_shared(model, prompts, site_layers: dict[str, list[int]]) -> Activations | None:
    for acts, index in reversed(getattr(model, _SHARED_ATTR, ())):
        if not all(s in acts.acts and set(ls) <= set(acts.layers[s]) for s, ls in site_layers.items()):
            continue
        rows = [index.get(t) for t in texts_of(prompts)]
        if any(r is None for r in rows):
            continue
        idx = torch.tensor(rows, dtype=torch.long)
        out = {}
        for s, ls in site_layers.items():
            cols = torch.tensor([acts.layers[s].index(layer) for layer in ls], dtype=torch.long)
            out[s] = acts.acts[s].index_select(0, idx).index_select(1, cols)
        meta = {"prompts_hash": prompts_hash(prompts), "n": len(rows), "model": acts.meta.get("model", ""),
                "shared": True}
        return Activations(out, {s: list(ls) for s, ls in site_layers.items()}, "last", None, meta)
    return None


def _left_align(t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[b, layer, pos, ...] left-padded -> left-aligned, zeros after each row's length."""
    b, _, width = t.shape[:3]
    out = torch.zeros_like(t)
    for i in range(b):
        n = int(lengths[i])
        out[i, :, :n] = t[i, :, width - n:]
    return out


def _pad_right(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[2] == width:
        return t
    pad = torch.zeros(*t.shape[:2], width - t.shape[2], *t.shape[3:], dtype=t.dtype)
    return torch.cat([t, pad], dim=2)
