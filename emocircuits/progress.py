"""One switch for every progress bar of the package.

``emocircuits.set_progress(False)`` (or the environment variable ``EMOCIRCUITS_PROGRESS=0``)
turns every bar off; a call's own ``progress=False`` still turns its bar off. In Jupyter the
widget bar is used only when ``ipywidgets`` is installed (so no "IProgress not found" warning);
elsewhere the plain text bar.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

_enabled: bool | None = None  # None: follow EMOCIRCUITS_PROGRESS


def set_progress(enabled: bool) -> None:
    """Turn every emocircuits progress bar on or off (overrides ``EMOCIRCUITS_PROGRESS``)."""
    global _enabled
    _enabled = bool(enabled)


def progress_enabled() -> bool:
    """Whether bars are shown: ``set_progress``'s value, else ``EMOCIRCUITS_PROGRESS`` (0/false/off: no)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("EMOCIRCUITS_PROGRESS", "1").strip().lower() not in ("0", "false", "off", "no")


def _bar_class():
    from tqdm import std

    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        ip = None
    if ip is not None and getattr(ip, "kernel", None) is not None and importlib.util.find_spec("ipywidgets"):
        from tqdm.notebook import tqdm as nb

        return nb
    return std.tqdm


def tqdm(*args: Any, disable: bool = False, **kw: Any):
    """``tqdm`` with the package-wide switch applied."""
    return _bar_class()(*args, disable=disable or not progress_enabled(), **kw)


def _write(s: str, **kw: Any) -> None:
    """Print a line without breaking the active bars (``tqdm.write``)."""
    _bar_class().write(s, **kw)


tqdm.write = _write  # type: ignore[attr-defined]
