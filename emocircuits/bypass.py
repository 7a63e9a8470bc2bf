"""Run the bridge's hook-free components as the HF modules they wrap.

``TransformerBridge`` puts a wrapper (a ``GeneralizedComponent``) in the HF module tree in
place of every block, norm, attention, MLP and linear layer. A wrapper fires its hook points
and then computes its output, some of them (attention, the norms) by re-deriving the
intermediate values that their hook points expose. When none of those hook points carries a
hook, that work is thrown away: the same numbers come from calling the wrapped HF module.

``bypass_unhooked(model)`` walks the HF tree once and, for the duration of the block, puts
a wrapper's ``original_component`` back where the wrapper was whenever no hook would be lost:
a wrapper stays in place when one of its own hook points (or the wrapper itself) carries a
hook. Hooks on the wrappers that the wrapped module calls still fire: ``hook_z`` is the input
hook of the attention's ``o_proj`` wrapper and ``mlp.hook_post`` that of ``down_proj``, so a
circuit's head and neuron hooks keep only those two linear wrappers, and HF's attention and
MLP modules run around them. On exit, also on an exception, every wrapper is put back. Hooks must be
attached before the block is entered: one added inside a bypassed component would not fire,
so ``bypass_unhooked`` checks this on exit and raises.

    cost per decoding step ≈ HF's own forward + the wrappers whose own hook points carry a hook

What is bypassed computes what HF computes: the norms' outputs are bitwise those of the
bridge (it calls the same HF module); attention and the MLP agree with the bridge's to float
rounding (the bridge re-implements them), and greedy tokens are equal (tests on tiny Llama and
Gemma 3, and HF ``generate``).

``generate`` runs inside it (``GenerationConfig.bypass_unhooked``, on by default), together
with ``grouped_attention.grouped_decoding``, which only the HF attention modules put back here
can use. The measurements are in docs/scaling.md. Collection, bound by the matmuls, did not
change measurably, so the other forwards do not use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _component_class():
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    return GeneralizedComponent


def _inert(fn, cfg) -> bool:
    """True for the bridge's own capture hooks when they do nothing: ``BlockBridge`` puts a
    pre-hook on ln2 that fires ``hook_mlp_in`` (an identity while it has no hooks) and one on
    ln1 that keeps the residual for the split-qkv inputs (read only with ``use_split_qkv_input``
    or ``use_attn_in``). Any other hook counts as a hook."""
    import inspect

    name = getattr(fn, "__qualname__", "")
    if name.endswith("_capture_mlp_in"):
        hp = inspect.getclosurevars(fn).nonlocals.get("hook_mlp_in")
        return hp is not None and not (hp.fwd_hooks or hp.bwd_hooks or _has_torch_hooks(hp, cfg))
    if name.endswith("_capture_pre_ln1"):
        return not (getattr(cfg, "use_split_qkv_input", False) or getattr(cfg, "use_attn_in", False))
    return False


def _has_torch_hooks(m: torch.nn.Module, cfg=None) -> bool:
    if m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        return True
    return any(not _inert(fn, cfg) for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _hooked_modules(root: torch.nn.Module, cfg=None) -> set[int]:
    """ids of the hook points that carry a hook (TL or plain torch) and of the wrappers that
    carry a torch hook themselves (the bridge's inert capture hooks excepted)."""
    from transformer_lens.hook_points import HookPoint

    base = _component_class()
    out: set[int] = set()
    for m in root.modules():
        if isinstance(m, HookPoint):
            if m.fwd_hooks or m.bwd_hooks or _has_torch_hooks(m, cfg):
                out.add(id(m))
        elif isinstance(m, base) and _has_torch_hooks(m, cfg):
            out.add(id(m))
    return out


def _dirty(root: torch.nn.Module, hooked: set[int]) -> set[int]:
    """ids of the modules whose subtree (the module included) holds a module of ``hooked``:
    one pass over the tree, so that hook-free subtrees are not walked again per wrapper."""
    memo: dict[int, bool] = {}

    def visit(m: torch.nn.Module) -> bool:
        k = id(m)
        if k in memo:
            return memo[k]
        memo[k] = False  # a module reached again below itself (shared) counts once
        found = k in hooked
        for c in m._modules.values():
            if c is not None and visit(c):
                found = True
        memo[k] = found
        return found

    visit(root)
    return {k for k, v in memo.items() if v}


def _needs_wrapper(wrapper: torch.nn.Module, hooked: set[int], offloaded: bool = True,
                   dirty: set[int] | None = None) -> bool:
    """True when running the wrapped module instead of ``wrapper`` would lose a hook: a hooked
    module under ``wrapper`` that the wrapped module does not reach (the wrapper's own hook
    points, the wrapper itself, submodules only the wrapper calls). Hooks on wrappers that the
    wrapped module calls (e.g. ``o_proj``'s, where ``hook_z`` lives) fire either way. A subtree
    offloaded by accelerate keeps its wrapper (the wrapper materialises the weights);
    ``offloaded=False`` says that nothing in the model is. ``dirty``: :func:`_dirty` of the
    tree, when known (a wrapper outside it has no hooked module below it)."""
    if not offloaded and (not hooked or (dirty is not None and id(wrapper) not in dirty)):
        return False  # the common case: nothing below this wrapper to look for
    mods = list(wrapper.modules())
    if offloaded and any(hasattr(m, "_hf_hook") for m in mods):
        return True
    inside = {id(m) for m in mods} & hooked
    if not inside:
        return False
    return bool(inside - {id(m) for m in wrapper.original_component.modules()})


def _plan(root: torch.nn.Module, cfg=None, hooked: set[int] | None = None
          ) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, wrapper) for every hook-free wrapper on the HF computation path:
    children of HF modules, outermost first; below a wrapper, its wrapped module's children are
    visited (a kept wrapper may call that module, a bypassed one is that module)."""
    base = _component_class()
    if hooked is None:
        hooked = _hooked_modules(root, cfg)
    offloaded = any(hasattr(m, "_hf_hook") for m in root.modules())
    dirty = _dirty(root, hooked) if hooked else set()
    out: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    seen: set[int] = set()

    def visit(hf_module: torch.nn.Module) -> None:
        if id(hf_module) in seen:
            return
        seen.add(id(hf_module))
        for name, child in list(hf_module._modules.items()):
            if child is None:
                continue
            if isinstance(child, base):
                orig = getattr(child, "original_component", None)
                if orig is None:
                    continue
                if not _needs_wrapper(child, hooked, offloaded, dirty):
                    out.append((hf_module, name, child))
                visit(orig)
            else:
                visit(child)

    visit(root)
    return out


@contextmanager
def bypass_unhooked(model) -> Iterator[int]:
    """While active, hook-free bridge components run as their HF modules (see the module
    docstring). Yields the number of components bypassed. Restores the tree on every exit.
    Not for ``stop_at_layer`` / ``start_at_layer`` forwards: the bridge's blocks implement
    those, and a bypassed block ignores them."""
    root = getattr(model, "original_model", None)
    if root is None:  # not a TransformerBridge: nothing to bypass
        yield 0
        return
    cfg = getattr(model, "cfg", None)
    before = _hooked_modules(root, cfg)
    swaps = _plan(root, cfg, before)
    done: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for parent, name, wrapper in swaps:
            parent._modules[name] = wrapper.original_component
            done.append((parent, name, wrapper))
        yield len(done)
    finally:
        for parent, name, wrapper in reversed(done):
            parent._modules[name] = wrapper
    new = _hooked_modules(root, cfg) - before  # only a module hooked inside the block can be missed
    dirty = _dirty(root, new) if new else set()
    late = [w for _, _, w in done if _needs_wrapper(w, new, False, dirty)]
    if late:
        names = ", ".join(sorted({getattr(w, "name", type(w).__name__) or "?" for w in late})[:5])
        raise RuntimeError(f"bypass_unhooked: hooks were added inside the block to bypassed "
                           f"components ({names}); they did not fire. Attach hooks before entering it")


__all__ = ["bypass_unhooked"]
