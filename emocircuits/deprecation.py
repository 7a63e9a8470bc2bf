"""Deprecated names and keywords: one way to keep them working for one release.

* ``deprecated_alias(func, "old.name")``: a thin function that warns and calls ``func``;
* ``renamed_keyword(where, old, new, old_value, new_value, new_default)``: resolve a renamed
  keyword (``alpha=`` -> ``strength=``, ``config=`` -> ``gen_config=``), warning when the old one
  is used and refusing both at once.

Every warning is a ``DeprecationWarning`` pointing at the caller (``stacklevel``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """``DeprecationWarning``: "``old`` is deprecated; use ``new``"."""
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def deprecated_alias(func: F, old: str, new: str | None = None) -> F:
    """A function named ``old`` that warns, then calls ``func`` with the same arguments."""
    target = new or f"{func.__module__}.{func.__qualname__}"

    @functools.wraps(func)
    def alias(*args, **kwargs):
        warn_deprecated(old, target)
        return func(*args, **kwargs)

    alias.__doc__ = f"Deprecated alias of ``{target}`` (kept one release).\n\n{func.__doc__ or ''}"
    alias.__name__ = old.rsplit(".", 1)[-1]
    alias.__qualname__ = alias.__name__
    return alias  # type: ignore[return-value]


def renamed_keyword(where: str, old: str, new: str, old_value: Any, new_value: Any,
                    new_default: Any, *, stacklevel: int = 3) -> Any:
    """The value of keyword ``new`` when the caller may have used the deprecated ``old``.

    ``old_value`` is None when ``old`` was not passed. Passing both (``new`` different from its
    default) is a ``TypeError``."""
    if old_value is None:
        return new_value
    if not _same(new_value, new_default):
        raise TypeError(f"{where}: pass {new}= only ({old}= is its deprecated name)")
    warnings.warn(f"{where}: {old}= is deprecated; use {new}=", DeprecationWarning,
                  stacklevel=stacklevel)
    return old_value


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor against a float
        return False


__all__ = ["deprecated_alias", "renamed_keyword", "warn_deprecated"]
