"""One result contract: every result type saves as ``<stem>.safetensors`` + ``<stem>.json``.

A result type is a dataclass that inherits :class:`Result`. ``save(path)`` walks its fields:
tensors (torch or numeric numpy) go to one safetensors file under their field path
(``vectors.resid_post``), everything else (numbers, strings, lists, dicts, nested results) to
a JSON document that refers to the tensors by key and records the sha256 of the tensor file.
``load(path)`` rebuilds the object from those two files. Nothing is ever unpickled: the only
classes a load instantiates are registered ``Result`` subclasses (looked up by name), built
through their constructor from plain JSON values and tensors.

Both files are written atomically (a temporary file in the same folder, then ``os.replace``),
tensors first; the JSON document is the commit marker, and a tensor file that does not match
the hash in its JSON is reported (:class:`ResultFileError`) instead of being read.

Example::

    dirs.save("runs/x/directions")            # directions.safetensors + directions.json
    back = EmotionDirections.load("runs/x/directions")
    any_result = load_result("runs/x/directions.json")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

FORMAT = "emocircuits.result/1"
_SUFFIXES = (".json", ".safetensors")
_REGISTRY: dict[str, type[Result]] = {}

R = TypeVar("R", bound="Result")


class ResultFileError(ValueError):
    """A result file is missing, truncated, tampered with or of another type (the message names it)."""


class ResultFileMissing(ResultFileError, FileNotFoundError):
    """A result file (or the tensor file it refers to) does not exist."""


# ============================================================================ atomic writers


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``
    (``fsync``: flush the file to disk before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """The one atomic text writer (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """``obj`` as JSON (NaN/inf written as null, see :func:`jsonable`), atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, allow_nan=False))


def jsonable(obj: Any) -> Any:
    """Numbers, arrays, tensors, results and dataclasses -> plain JSON (NaN/inf -> None)."""
    if isinstance(obj, Result):
        return jsonable(obj.to_dict())
    if hasattr(obj, "to_dict") and callable(obj.to_dict) and not isinstance(obj, type):
        return jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        seq = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in seq]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().float().numpy() if obj.is_floating_point() else obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return obj.as_posix()
    return str(obj)


# ============================================================================ the base


class Result:
    """Base of every result type (subclasses are dataclasses).

    ``save(path)`` / ``load(path)``: tensors in safetensors, the rest in JSON (see the module
    docstring); ``to_dict()``: a JSON-able summary (default: every field, tensors as lists);
    subclasses add ``to_dataframe()`` where the result is a table. ``VERSION`` is stored with
    the file; a file of another major version is refused.
    """

    VERSION: ClassVar[int] = 1
    REPR_LIMIT: ClassVar[int] = 300
    """``repr`` is cut to this many characters (it never shows tensor/array contents)."""
    _REPR_FIRST: ClassVar[tuple[str, ...]] = (
        "emotion", "emotions", "classes", "method", "kind", "site", "sites", "layer", "layers")
    """Fields shown first in ``repr`` (the rest follow in declaration order)."""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        name = cls.__name__
        prev = _REGISTRY.get(name)
        if prev is not None and prev.__module__ != cls.__module__:
            raise TypeError(f"two result types are called {name!r} "
                            f"({prev.__module__} and {cls.__module__}); rename one")
        _REGISTRY[name] = cls
        # ``@dataclass`` writes a field-by-field ``__repr__`` (tensor contents included) unless
        # the class itself defines one: give every subclass the inherited compact repr first
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = next(c.__dict__["__repr__"] for c in cls.__mro__[1:]
                                if "__repr__" in c.__dict__)

    # ------------------------------------------------------------------ display
    def _summary(self) -> dict[str, str]:
        """``{label: short text}`` shown by ``repr`` and ``_repr_html_``: every public field
        summarised by :func:`summarize` (tensors as dtype[shape], long lists as their length,
        dicts by their keys), the ``_REPR_FIRST`` fields first. Subclasses refine it."""
        if not dataclasses.is_dataclass(self):
            return {}
        names = [f.name for f in dataclasses.fields(self) if f.repr and not f.name.startswith("_")]
        names = [n for n in self._REPR_FIRST if n in names] + [n for n in names if n not in self._REPR_FIRST]
        return {n: summarize(getattr(self, n)) for n in names}

    def __repr__(self) -> str:
        parts = [f"{k}={v}" for k, v in self._summary().items()]
        return _fit(type(self).__name__, parts, self.REPR_LIMIT)

    def _repr_html_(self) -> str:
        """A small HTML table: the summary, then the head of ``to_dataframe()`` when the type
        is tabular (Jupyter shows this instead of the repr)."""
        from html import escape

        rows = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td style='text-align:left'>"
                       f"{escape(v)}</td></tr>" for k, v in self._summary().items())
        html = (f"<div><b>{escape(type(self).__name__)}</b><table>{rows}</table>")
        df = self._dataframe_or_none()
        if df is not None:
            more = f"<p>{len(df)} rows × {len(df.columns)} columns</p>" if len(df) > 10 else ""
            html += df.head(10).to_html(max_cols=12) + more
        return html + "</div>"

    def _dataframe_or_none(self):
        fn = getattr(self, "to_dataframe", None)
        if not callable(fn):
            return None
        try:
            return fn()
        except Exception:  # noqa: BLE001 - a display never raises
            return None

    def _result_fields(self) -> dict[str, Any]:
        """What ``save`` stores: every non-private dataclass field. A subclass whose field holds
        something else (a fitted model) overrides this to give a savable stand-in, which its
        constructor must accept back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.startswith("_")}

    # ------------------------------------------------------------------ dict view
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON (tensors as nested lists)."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} is not a dataclass")
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.name.startswith("_")}

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.safetensors`` (when there are tensors) and ``<stem>.json``; return the JSON path.

        ``path`` may name the stem or either file (``x``, ``x.json``, ``x.safetensors``)."""
        from safetensors.torch import save as st_save

        stem = _stem(path)
        tensors: dict[str, torch.Tensor] = {}
        body = _encode(self, "", tensors, {})
        doc: dict[str, Any] = {"format": FORMAT, "type": type(self).__name__,
                               "version": type(self).VERSION, "body": body}
        st = with_suffix(stem, ".safetensors")
        if tensors:
            data = st_save(tensors)
            doc["tensors"] = {"file": st.name, "sha256": hashlib.sha256(data).hexdigest(),
                              "count": len(tensors)}
            atomic_write_bytes(st, data)
        elif st.exists():
            st.unlink()
        return atomic_write_text(with_suffix(stem, ".json"),
                                 json.dumps(doc, indent=1, allow_nan=False))

    @classmethod
    def load(cls: type[R], path: str | os.PathLike) -> R:
        """Read a result written by :meth:`save` (the stored type must be ``cls`` or a subclass)."""
        return _load(path, cls)


# ============================================================================ summaries

_SHORT_STR = 24
_SHORT_LIST = 8


def summarize(x: Any, *, depth: int = 0) -> str:
    """A short text for one field value, never the contents of a tensor or array:

    tensors/arrays -> ``float32[3, 2, 8]``; numbers rounded to 4 significant digits; short
    strings quoted (long ones cut); short flat lists shown (``[anger, joy]``, contiguous ints as
    ``[0..29]``), longer ones as ``list[30]``; dicts by their keys (a few with their values'
    summaries, ``{resid_post: float32[3, 2, 8]}``; many as ``dict[12]``); nested results by
    their class name."""
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')}[{', '.join(map(str, x.shape))}]"
    if isinstance(x, np.ndarray):
        return f"{x.dtype}[{', '.join(map(str, x.shape))}]"
    if isinstance(x, Result):
        return type(x).__name__
    if isinstance(x, (bool, np.bool_)) or x is None:
        return repr(x if x is None else bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.4g}"
    if isinstance(x, str):
        return repr(x if len(x) <= _SHORT_STR else x[:_SHORT_STR - 1] + "…")
    if isinstance(x, Mapping):
        if not x:
            return "{}"
        keys = [_key(k) for k in x]
        if len(keys) <= 4 and depth == 0:
            inner = [f"{k}: {summarize(v, depth=1)}" for k, v in zip(keys, x.values(), strict=True)]
            s = "{" + ", ".join(inner) + "}"
            if len(s) <= 90:
                return s
        if len(keys) <= 6:
            s = "{" + ", ".join(keys) + "}"
            if len(s) <= 60:
                return s
        return f"dict[{len(x)}]"
    if isinstance(x, (list, tuple, set, frozenset)):
        kind = type(x).__name__
        seq = list(x)
        if seq and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in seq):
            ints = [int(v) for v in seq]
            if len(ints) > 3 and ints == list(range(ints[0], ints[0] + len(ints))):
                return f"[{ints[0]}..{ints[-1]}]"
        if len(seq) <= _SHORT_LIST and all(_atomic(v) for v in seq):
            s = "[" + ", ".join(_key(v) for v in seq) + "]"
            if len(s) <= 60:
                return s
        if seq and len({type(v) for v in seq}) == 1 and not _atomic(seq[0]):
            return f"{kind}[{len(seq)}×{type(seq[0]).__name__}]"
        return f"{kind}[{len(seq)}]"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return type(x).__name__
    return type(x).__name__


def _atomic(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str, np.generic)) and (
        not isinstance(v, str) or len(v) <= _SHORT_STR)


_NAME = re.compile(r"[\w./+\-−]+")


def _key(k: Any) -> str:
    """A dict key or list item: names without quotes (``anger``, ``3``, ``(s1, positive)``),
    other strings quoted."""
    if isinstance(k, str):
        k = k if len(k) <= _SHORT_STR else k[:_SHORT_STR - 1] + "…"
        return k if _NAME.fullmatch(k) else repr(k)
    if isinstance(k, tuple):
        return "(" + ", ".join(_key(v) for v in k) + ")"
    if isinstance(k, (float, np.floating)):
        return f"{float(k):.4g}"
    return str(k) if _atomic(k) else summarize(k, depth=1)


def _fit(name: str, parts: list[str], limit: int) -> str:
    """``name(p1, p2, ...)`` with as many parts as fit in ``limit`` characters (then ``…``)."""
    out, used = [], len(name) + 2
    for i, p in enumerate(parts):
        tail = 0 if i == len(parts) - 1 else 3  # room for ", …"
        if used + len(p) + (2 if out else 0) + tail > limit:
            if not out:  # even the first part is too long: cut it
                out.append(p[:max(limit - used - 4, 8)] + "…")
            out.append("…")
            break
        out.append(p)
        used += len(p) + (2 if len(out) > 1 else 0)
    return f"{name}({', '.join(out)})"


def result_types() -> dict[str, type[Result]]:
    """The registered result types by name (what a load may instantiate)."""
    return dict(_REGISTRY)


def load_result(path: str | os.PathLike) -> Result:
    """Any saved result; errors name the file and what is wrong with it."""
    return _load(path, Result)


def _load(path: str | os.PathLike, expect: type[R]) -> R:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    stem = _stem(path)
    js = with_suffix(stem, ".json")
    if not js.is_file():
        raise ResultFileMissing(f"{js}: result file missing")
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultFileError(f"{js}: not a valid result file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ResultFileError(f"{js}: not an emocircuits result (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    tname = doc.get("type")
    cls = _REGISTRY.get(tname) if isinstance(tname, str) else None
    if cls is None:
        _import_result_modules()
        cls = _REGISTRY.get(tname) if isinstance(tname, str) else None
    if cls is None:
        raise ResultFileError(f"{js}: unknown result type {tname!r}")
    if not issubclass(cls, expect):
        raise ResultFileError(f"{js}: holds a {tname}, not a {expect.__name__}")
    if doc.get("version") != cls.VERSION:
        raise ResultFileError(f"{js}: {tname} version {doc.get('version')!r}, this emocircuits "
                              f"reads version {cls.VERSION}")
    tensors: dict[str, torch.Tensor] = {}
    meta = doc.get("tensors")
    if meta is not None:
        name = meta.get("file") if isinstance(meta, dict) else None
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise ResultFileError(f"{js}: bad tensor file entry {meta!r}")
        st = js.with_name(name)
        if not st.is_file():
            raise ResultFileMissing(f"{js}: its tensor file {st.name!r} is missing")
        data = st.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise ResultFileError(f"{st}: contents do not match the hash recorded in {js.name} "
                                  "(truncated, replaced or written by another run)")
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ResultFileError(f"{st}: unreadable safetensors file ({e})") from None
    body = doc.get("body")
    if not isinstance(body, dict) or body.get("__result__") != tname:
        raise ResultFileError(f"{js}: malformed result body (not a {tname})")
    try:
        return _decode(body, tensors)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError,
            RecursionError) as e:
        raise ResultFileError(f"{js}: malformed result body ({type(e).__name__}: {e})") from None


# ============================================================================ encoding


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in _SUFFIXES else p


def with_suffix(stem: str | os.PathLike, suffix: str) -> Path:
    """``<stem><suffix>``, keeping every dot of the stem (``Path.with_suffix`` would turn
    ``"α=0.25"`` and ``"α=0.5"`` both into ``"α=0.json"``)."""
    p = Path(stem)
    return p.parent / (p.name + suffix)


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.is_sparse:
            t = t.to_dense()
        ptr = t.data_ptr() if t.numel() else None
        shared = ptr is not None and (ptr in seen or t.storage_offset() != 0
                                      or t.untyped_storage().nbytes() != t.numel() * t.element_size())
        t = t.contiguous().clone() if shared else t.contiguous()
        if ptr is not None:
            seen[ptr] = key
        k = _free_key(key, tensors)
        tensors[k] = t
        return {"__tensor__": k}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            return {"__list__": _encode(obj.tolist(), key, tensors, seen)}
        k = _free_key(key, tensors)
        tensors[k] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": k}
    if isinstance(obj, Result) or (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        name = type(obj).__name__
        if _REGISTRY.get(name) is not type(obj):
            raise TypeError(f"cannot save field {key or '<root>'!r}: {type(obj).__module__}.{name} "
                            "is not a registered Result type")
        vals = obj._result_fields() if isinstance(obj, Result) else {
            f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        fields = {k: _encode(v, _join(key, k), tensors, seen) for k, v in vals.items()}
        return {"__result__": name, "fields": fields}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _encode(v, _join(key, k), tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, _join(key, f"k{i}"), tensors, seen),
                               _encode(v, _join(key, str(i)), tensors, seen)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(key, str(i)), tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [_encode(v, _join(key, str(i)), tensors, seen)
                            for i, v in enumerate(sorted(obj, key=repr))]}
    if isinstance(obj, list):
        return [_encode(v, _join(key, str(i)), tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        if obj.dtype.name in _NP_SCALARS:  # kept as a numpy scalar of its dtype
            return {"__scalar__": obj.dtype.name, "value": _encode(obj.item(), key, tensors, seen)}
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot save field {key or '<root>'!r} of type {type(obj).__name__}")


def _free_key(key: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """``key`` (or a variant of it) not yet used in ``tensors`` (field paths can collide:
    ``{"a.b": x}`` and ``{"a": {"b": y}}``)."""
    k, i = key or "_", 1
    while k in tensors:
        k, i = f"{key or '_'}#{i}", i + 1
    return k


_NP_SCALARS = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                         "uint64", "float16", "float32", "float64"})


def _join(key: str, part: str) -> str:
    return f"{key}.{part}" if key else part


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy()
    if "__list__" in node:
        return np.asarray(_decode(node["__list__"], tensors))
    if "__scalar__" in node:
        if node["__scalar__"] not in _NP_SCALARS:
            raise ValueError(f"bad numpy scalar type {node['__scalar__']!r}")
        return np.dtype(node["__scalar__"]).type(_decode(node["value"], tensors))
    if "__float__" in node:
        if node["__float__"] not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {node['__float__']!r}")
        return float(node["__float__"])
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    if "__set__" in node:
        return {_hashable(_decode(v, tensors)) for v in node["__set__"]}
    if "__items__" in node:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node["__items__"]}
    if "__result__" in node:
        name = node["__result__"]
        cls = _REGISTRY.get(name)
        if cls is None:
            _import_result_modules()
            cls = _REGISTRY.get(name)
        if cls is None:
            raise ValueError(f"unknown result type {name!r}")
        fields = node["fields"]
        if not isinstance(fields, dict):
            raise ValueError(f"{name}: fields must be a mapping")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in fields if k not in known or k.startswith("_")]
        if unknown:
            raise ValueError(f"{name} has no fields {unknown}")
        vals = {k: _decode(v, tensors) for k, v in fields.items()}
        obj = cls(**{k: v for k, v in vals.items() if known[k].init})
        for k, v in vals.items():
            if not known[k].init:
                object.__setattr__(obj, k, v)
        return obj
    return {k: _decode(v, tensors) for k, v in node.items()}


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


def _import_result_modules() -> None:
    """Import the modules that define result types (a load may come before their import)."""
    import importlib

    for m in ("activations", "directions", "components", "circuits", "patching", "probes",
              "control", "steering", "evaluate", "elicitation", "generation", "judges",
              "judges.readout", "interventions", "stats", "story_directions", "studies"):
        try:
            importlib.import_module(f"emocircuits.{m}")
        except ImportError:
            pass


def compact_json(obj: Any, max_numbers: int = 1024) -> Any:
    """A JSON value with every numeric array of more than ``max_numbers`` entries replaced by
    ``{"shape": [...], "stored": "safetensors"}`` (for summaries such as results.json; the
    full values stay in the result's tensor file)."""
    if isinstance(obj, dict):
        return {k: compact_json(v, max_numbers) for k, v in obj.items()}
    if isinstance(obj, list):
        shape = _numeric_shape(obj)
        if shape is not None and math.prod(shape) > max_numbers:
            return {"shape": list(shape), "stored": "safetensors"}
        return [compact_json(v, max_numbers) for v in obj]
    return obj


def _numeric_shape(x: Any) -> tuple[int, ...] | None:
    """The shape of a rectangular nested list of numbers/None, else None."""
    if not isinstance(x, list):
        return () if (x is None or isinstance(x, (int, float))) and not isinstance(x, bool) else None
    if not x:
        return (0,)
    first = _numeric_shape(x[0])
    if first is None:
        return None
    for v in x[1:]:
        if _numeric_shape(v) != first:
            return None
    return (len(x), *first)
