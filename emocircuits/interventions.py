"""One hook factory for interventions on units at positions: shift, zero, scale, set.

An ``Intervention`` names a site and layer (``sites``), the units it touches and what it does:

* units: ids along the site's unit axis — neurons of ``mlp_post`` ``[.., d_mlp]``, heads of ``z``
  ``[.., head, d_head]`` (a head is its whole ``d_head`` slice), dimensions of a residual-width
  site — or ``None`` for the whole vector (a residual *direction*);
* ``op``, with a = ``strength`` (a float, or ``strength(step)``: step 0 for a prefill and k for the
  k-th decode call after it):

  - ``"shift"``: x[.., units] += a · value (units: ``value`` [k] per neuron / [k, d_head] per head;
    a direction: ``value`` [d] and, with ``rms_scale``, x += a · rms(x) · value with
    rms(x) = sqrt(mean_d x_d² + 1e-12) per position before the addition — the paper's steering);
  - ``"zero"``: x[.., units] = 0;  ``"scale"``: x[.., units] *= a;  ``"set"``: x[.., units] = value;

* positions, per forward call: ``"last"`` (the last position of every call: the last prompt token,
  then every generated token), ``"all"``, ``"generated"`` (decode calls inside ``generate`` only) or
  an int tensor ``[k]`` / ``[batch, k]`` of prefill positions (negative = from the end; not applied
  in decode calls).

``intervention_hooks(model, interventions)`` builds the ``(hook name, fn)`` pairs;
``intervene(model, interventions)`` is the context manager that adds them with
``model.hooks(fwd_hooks=...)`` and removes them on every exit, exceptions included. ``steer``,
``circuits.modulate`` / ``circuits.ablate`` and ``components.component_sweep`` are built on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from . import sites as S
from .generation import is_decoding

RMS_EPS = 1e-12
Op = Literal["shift", "zero", "scale", "set"]
Positions = str | torch.Tensor
Strength = float | Callable[[int], float]
OPS: tuple[str, ...] = ("shift", "zero", "scale", "set")


@dataclass(frozen=True)
class Intervention:
    """One intervention on ``site`` at ``layer`` (module docstring). ``site`` may be a
    TransformerLens hook name (``"blocks.3.hook_resid_post"``; stored as its site name, and
    ``layer`` must be its layer)."""

    site: str
    layer: int
    op: Op = "shift"
    units: Sequence[int] | torch.Tensor | None = None
    value: torch.Tensor | None = None
    strength: Strength = 1.0
    positions: Positions = "last"
    rms_scale: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.site, str) and self.site not in S.SITES:
            try:
                site, _ = S.parse_site(self.site, self.layer)
            except S.UnknownSiteError:
                return  # reported, with the accepted forms, when the hooks are built
            object.__setattr__(self, "site", site)


def check_positions(positions: Positions, who: str = "intervention") -> None:
    """``positions`` is 'last', 'all', 'generated' or an integer index tensor [k] / [batch, k]."""
    if isinstance(positions, torch.Tensor):
        if positions.dtype.is_floating_point or positions.dim() not in (1, 2):
            raise ValueError(f"{who}: an index tensor of positions must be integer [k] or [batch, k]")
    elif positions not in ("last", "all", "generated"):
        raise ValueError(f"{who}: positions must be 'last', 'all', 'generated' or an index tensor, "
                         f"got {positions!r}")


def _check(model, iv: Intervention) -> None:
    S.check_site(iv.site)
    check_positions(iv.positions)
    if iv.op not in OPS:
        raise ValueError(f"intervention: op must be one of {OPS}, got {iv.op!r}")
    if iv.op in ("shift", "set") and iv.value is None:
        raise ValueError(f"intervention: op {iv.op!r} needs a value")
    if iv.rms_scale and (iv.units is not None or iv.op != "shift"):
        raise ValueError("intervention: rms_scale applies to shifting a whole vector (units=None)")
    if not callable(iv.strength) and not math.isfinite(float(iv.strength)):
        raise ValueError(f"intervention: strength must be finite, got {iv.strength}")
    S.check_layer(model, iv.layer)


def _index_columns(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row columns [b, k] of an index tensor of positions (negative from the end)."""
    cols = idx.to(x.device)
    if cols.dim() == 1:
        cols = cols.unsqueeze(0).expand(x.shape[0], -1)
    if cols.shape[0] != x.shape[0]:
        raise ValueError(f"intervention: index tensor has {cols.shape[0]} rows, batch has {x.shape[0]}")
    if (cols >= x.shape[1]).any() or (cols < -x.shape[1]).any():
        raise IndexError(f"intervention: position index outside the sequence (length {x.shape[1]})")
    return cols % x.shape[1]


def _strength_now(model, mode, indexed: bool, strength, state: dict) -> float | None:
    """The strength this call applies, or None when the hook passes the activation through
    ("generated" positions during the prompt; explicit position indices during decoding)."""
    decoding = is_decoding(model)
    if (mode == "generated" and not decoding) or (indexed and decoding):
        return None
    return float(strength(state["step"])) if callable(strength) else float(strength)


def _direction_hook(model, iv: Intervention, state: dict):
    """Shift the whole vector by a · (rms(x) ·) v at the positions (the steering arithmetic:
    computed in float32, cast back to the activation dtype)."""
    v_cpu = iv.value.detach().float()  # type: ignore[union-attr]
    strength = iv.strength
    idx = iv.positions.long() if isinstance(iv.positions, torch.Tensor) else None
    mode = "index" if idx is not None else iv.positions

    def hook(x, hook):  # noqa: ARG001 - TL hook signature
        a = _strength_now(model, mode, idx is not None, strength, state)
        if a is None:
            return x
        if a == 0.0:
            return x
        v = v_cpu.to(x.device)
        if mode == "all":
            part = x
        elif idx is None:  # "last", "generated"
            part = x[:, -1:]
        else:
            cols = _index_columns(idx, x)
            g = cols.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            part = torch.gather(x, 1, g)
        pf = part.float()
        if iv.rms_scale:
            add = a * torch.sqrt(pf.pow(2).mean(-1, keepdim=True) + RMS_EPS) * v
        else:
            add = (a * v).expand_as(pf)
        new = (pf + add).to(x.dtype)
        if mode == "all":
            return new
        out = x.clone()
        if idx is None:
            out[:, -1:] = new
        else:
            out.scatter_(1, g, new)
        return out

    return hook


def _unit_hook(model, iv: Intervention, state: dict):
    """Shift / zero / scale / set units (neurons: last axis; heads of z: axis 2), in the
    activation dtype."""
    ids_cpu = None if iv.units is None else torch.as_tensor(iv.units, dtype=torch.long).cpu()
    value = None if iv.value is None else iv.value.detach()
    head_axis = iv.site in ("z", "head_result")
    strength = iv.strength
    idx = iv.positions.long() if isinstance(iv.positions, torch.Tensor) else None
    mode = "index" if idx is not None else iv.positions

    def apply(part: torch.Tensor, a: float, dev) -> None:
        """Modify ``part`` [b, p, ...] in place at the units."""
        ids = slice(None) if ids_cpu is None else ids_cpu.to(dev)
        key = (slice(None), slice(None), ids) if head_axis else (..., ids)
        if iv.op == "zero":
            part[key] = torch.zeros_like(part[key])
        elif iv.op == "shift":
            part[key] = part[key] + a * value.to(dev, part.dtype)  # type: ignore[union-attr]
        elif iv.op == "scale":
            part[key] = part[key] * a
        else:  # set
            part[key] = value.to(dev, part.dtype).expand_as(part[key])  # type: ignore[union-attr]

    def hook(x, hook):  # noqa: ARG001 - TL hook signature
        a = _strength_now(model, mode, idx is not None, strength, state)
        if a is None:
            return x
        if iv.op == "shift" and a == 0.0:
            return x
        out = x.clone()
        if mode == "all":
            apply(out, a, x.device)
        elif idx is None:  # "last", "generated"
            apply(out[:, -1:], a, x.device)  # a view: the writes land in out
        else:
            cols = _index_columns(idx, x)
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(cols)
            part = out[rows, cols]
            apply(part, a, x.device)
            out[rows, cols] = part
        return out

    return hook


def intervention_hooks(model, interventions: Sequence[Intervention]) -> list[tuple[str, Callable]]:
    """The ``(hook name, fn)`` pairs of ``interventions``, in order (plus, first, a step counter
    at ``resid_pre`` of layer 0 when a strength is a schedule). Use inside ``model.hooks`` —
    or use ``intervene``."""
    ivs = list(interventions)
    for iv in ivs:
        _check(model, iv)
    state = {"step": 0}
    hooks: list[tuple[str, Callable]] = []
    if any(callable(iv.strength) for iv in ivs):
        def counter(x, hook):  # noqa: ARG001 - runs first in every forward call
            state["step"] = state["step"] + 1 if is_decoding(model) else 0
            return x
        hooks.append((S.hook_name(model, "resid_pre", 0), counter))
    for iv in ivs:
        make = _direction_hook if (iv.units is None and iv.op == "shift") else _unit_hook
        hooks.append((S.hook_name(model, iv.site, iv.layer), make(model, iv, state)))
    return hooks


@contextmanager
def intervene(model, interventions: Sequence[Intervention]) -> Iterator[list[tuple[str, Callable]]]:
    """While active, every forward (and ``generate``) runs with ``interventions``; the hooks are
    removed on every exit, exceptions included. Yields the hook pairs."""
    hooks = intervention_hooks(model, interventions)
    with model.hooks(fwd_hooks=hooks):
        yield hooks


__all__ = ["OPS", "Intervention", "check_positions", "intervene", "intervention_hooks"]
