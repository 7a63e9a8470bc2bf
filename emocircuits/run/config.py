"""Typed configuration: dataclass sections parsed from TOML, checked before anything runs.

A section is a frozen dataclass whose fields carry their defaults (written once, there). A TOML
table is parsed into it with :func:`parse_section`: an unknown key, a misspelt key (with a
suggestion) and a value of the wrong type are refused with the key named, e.g.::

    config [steering]: unknown key 'alpahs' (did you mean 'alphas'?); accepted: alphas, layer_bands
    config steering.alphas: expected a list of float, got 8 (int)

Supported field types: ``bool int float str``, ``None`` (in unions), ``Literal[...]``,
``list[T]``, ``tuple[T, ...]``, ``dict[str, T]`` and unions of those. ``int`` values are
accepted for ``float`` fields (and become floats); ``bool`` is never an ``int``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip install tomli (same API)
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is unknown, misspelt or of the wrong type (the message names the key)."""


# ============================================================================ parsing


def parse_section(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` after checking every key and value against ``cls``'s fields."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config [{where}] must be a table, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        near = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"config [{where}]: unknown key {k!r}{hint}; accepted: "
                          f"{', '.join(fields) or '(none)'}")
    vals = {k: check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**vals)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config [{where}]: {e}") from None


def check_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and normalised: int -> float, list -> tuple)."""
    ok, out = _check(value, tp)
    if not ok:
        raise ConfigError(f"config {where}: expected {_describe(tp)}, got {_show(value)}")
    return out


def _check(v: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, v
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for a in get_args(tp):
            ok, out = _check(v, a)
            if ok:
                return True, out
        return False, None
    if tp is type(None):
        return v is None, None
    if origin is Literal:
        return any(v == a and type(v) is type(a) for a in get_args(tp)), v
    if tp is bool:
        return isinstance(v, bool), v
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool), v
    if tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok, float(v) if ok else None
    if tp is str:
        return isinstance(v, str), v
    if origin in (list, Sequence, tuple):
        if not isinstance(v, (list, tuple)):
            return False, None
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(v):
                return False, None
            res = [_check(x, a) for x, a in zip(v, args, strict=True)]
        else:
            a = args[0] if args else Any
            res = [_check(x, a) for x in v]
        if not all(ok for ok, _ in res):
            return False, None
        items = [x for _, x in res]
        return True, (tuple(items) if origin is tuple else items)
    if origin in (dict, Mapping):
        if not isinstance(v, Mapping):
            return False, None
        kt, vt = get_args(tp) or (Any, Any)
        out = {}
        for k, x in v.items():
            ok1, k2 = _check(k, kt)
            ok2, x2 = _check(x, vt)
            if not (ok1 and ok2):
                return False, None
            out[k2] = x2
        return True, out
    if dataclasses.is_dataclass(tp):
        try:
            return True, parse_section(tp, v, tp.__name__)
        except ConfigError:
            return False, None
    return isinstance(v, tp) if isinstance(tp, type) else False, v


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in get_args(tp) if a is not type(None)]
        none = type(None) in get_args(tp)
        return " or ".join(parts) + (" (or none: omit the key)" if none else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, Sequence, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        inner = args[0] if args else None
        return f"a list of {plural.get(inner) or (_describe(inner) if inner is not None else 'values')}"
    if origin in (dict, Mapping):
        return f"a table of {_describe(get_args(tp)[1]) if get_args(tp) else 'values'}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _show(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


def section_dict(obj: Any) -> dict[str, Any]:
    """A section as plain TOML/JSON values (tuples as lists), every field with its value."""
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return section_dict(x)
        if isinstance(x, (list, tuple)):
            return [plain(y) for y in x]
        if isinstance(x, Mapping):
            return {str(k): plain(y) for k, y in x.items()}
        return x
    return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if not f.name.startswith("_")}


# ============================================================================ presets, overrides


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {p}: invalid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML (``8``, ``[2.0, 4.0]``, ``"x"``, ``true``), else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of ``cfg`` with ``section.key=value`` overrides applied."""
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r}: use section.key=value (e.g. data.n_test=4)")
        key, val = item.split("=", 1)
        section, k = key.strip().split(".", 1)
        sec = out.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"override {item!r}: [{section}] is not a table")
        sec[k.strip()] = parse_value(val.strip())
    return out


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def sha(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
