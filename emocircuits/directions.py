"""Emotion directions (PAPER_METHOD.md §3) — the group-centred core.

For complete scenario–event groups g (every emotion present) and emotions e:

    μ_g = (1/|E|) Σ_e h_{g,e}            (group mean)
    δ_{g,e} = h_{g,e} − μ_g              (de-contextualised)
    c_e = (1/|G|) Σ_g δ_{g,e}            (emotion centroid)
    u_e = c_e − (1/|E|) Σ_e' c_e'        (global mean removed; a no-op for complete groups)
    v_e = u_e / (‖u_e‖₂ + 1e-12)         (unit direction, per layer)

``group_centered_means`` returns u (``normalize=False``: the difference vectors Δμ of §6.1)
or v (``normalize=True``) for any feature shape (e.g. ``[layer, d_model]``, ``[layer, d_mlp]``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

EPS = 1e-12


@dataclass(frozen=True)
class GroupInfo:
    """Which groups were used, and which were dropped as incomplete (and what they lacked)."""

    used: list[Hashable]
    dropped: dict[Hashable, list[str]] = field(default_factory=dict)

    def describe(self) -> str:
        s = f"{len(self.used)} complete groups used"
        if self.dropped:
            ex = "; ".join(f"{g}: missing {m}" for g, m in list(self.dropped.items())[:5])
            s += f", {len(self.dropped)} incomplete dropped ({ex}{'; ...' if len(self.dropped) > 5 else ''})"
        return s


def group_centered_means(
    x: Float[torch.Tensor, "n *feat"],
    groups: Sequence[Hashable],
    labels: Sequence[str],
    emotions: Sequence[str],
    *,
    normalize: bool = False,
    norm_dims: int = 1,
) -> tuple[Float[torch.Tensor, "emotion *feat"], GroupInfo]:
    """u_e (or unit v_e) from rows ``x[i]`` with group ``groups[i]`` and emotion ``labels[i]``.

    Rows of emotions outside ``emotions`` are ignored; groups missing any emotion are dropped
    (reported in ``GroupInfo``); a (group, emotion) seen twice is averaged. ``norm_dims``
    trailing dims form the vector that is L2-normalised (1: per layer over d_model).
    Raises ``ValueError`` when no complete group remains or ``x`` holds NaN/inf.
    """
    if x.shape[0] != len(groups) or x.shape[0] != len(labels):
        raise ValueError(f"x has {x.shape[0]} rows, groups {len(groups)}, labels {len(labels)}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:5, 0].tolist()
        raise ValueError(f"activations contain NaN/inf (rows {bad}...)")
    emo_idx = {e: i for i, e in enumerate(emotions)}
    sums: dict[Hashable, torch.Tensor] = {}
    counts: dict[Hashable, torch.Tensor] = {}
    xf = x.double()
    for i, (g, lab) in enumerate(zip(groups, labels)):
        if lab not in emo_idx:
            continue
        if g not in sums:
            sums[g] = torch.zeros(len(emotions), *x.shape[1:], dtype=torch.float64)
            counts[g] = torch.zeros(len(emotions), dtype=torch.float64)
        sums[g][emo_idx[lab]] += xf[i]
        counts[g][emo_idx[lab]] += 1
    used, dropped = [], {}
    for g, c in counts.items():
        if (c > 0).all():
            used.append(g)
        else:
            dropped[g] = [e for e, k in zip(emotions, c) if k == 0]
    if not used:
        raise ValueError(
            f"no complete scenario–event group: every group lacks some of {list(emotions)} "
            f"({len(dropped)} incomplete groups)"
        )
    shape = (-1,) + (1,) * (x.dim() - 1)
    deltas = []
    for g in used:
        h = sums[g] / counts[g].view(shape)
        deltas.append(h - h.mean(0, keepdim=True))
    c = torch.stack(deltas).mean(0)
    u = c - c.mean(0, keepdim=True)
    if normalize:
        dims = tuple(range(u.dim() - norm_dims, u.dim()))
        u = u / (u.norm(dim=dims, keepdim=True) + EPS)
    return u.float(), GroupInfo(used, dropped)
